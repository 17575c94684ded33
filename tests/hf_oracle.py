"""PyTorch / HF-transformers oracle for DeepSeek-V4 parity tests (pure torch + numpy, no jax).

Builds tiny ``transformers.DeepseekV4ForCausalLM`` models (transformers==5.24.0, torch==2.13.0 CPU,
float32, eager attention, eager experts, no quantisation simulation), re-randomises every parameter
deterministically, and writes them in the OFFICIAL DeepSeek checkpoint format (architecture.md §5.1)
or with HF names (§5.4).

Public API
----------
``SPEC_A``, ``SPEC_B``, ``SPEC_C``, ``SPECS``           tiny model specs (dicts, see ``make_hf_config``)
``make_hf_config(spec) -> DeepseekV4Config``
``make_hf_model(spec, seed) -> (model, hf_config)``
``official_state_dict(model, spec=None) -> dict[str, torch.Tensor]``
``official_config_dict(spec) -> dict``                   hub-format config.json content
``save_official(model, hf_config, out_dir, spec) -> str``
``load_official(out_dir) -> (model, loading_info)``      HF ``from_pretrained`` on an official dir
``save_hf_named(model, out_dir) -> str``                 genuine HF names (save_original_format=False)
``save_hf_default(model, out_dir) -> str``               plain save_pretrained (HF's half-reverted names)
``make_tokens(spec, seed, B=2, S=64) -> np.ndarray[int64] [B, S]``
``MODEL_SEED``, ``TOKEN_SEEDS[(spec_name, S)]``          seeds with checked top-k margins
``hf_logits(model, tokens) -> np.ndarray float32 [B, S, V]``
``hf_greedy(model, prompt, max_new_tokens, return_logits=False)``
``indexer_tie_margin(model, tokens) -> float`` / ``indexer_stats(model, tokens) -> dict``
``router_tie_margin(model, tokens) -> float``, ``find_token_seed(model, spec, B, S, ...) -> int``
``swiglu_clamp_fraction(model, tokens) -> dict``
``OFFICIAL_TO_HF`` (documentation table), ``official_to_hf_name(name)``

Spec -> HF config translation
-----------------------------
* ``compress_ratios`` (len n_layers + 1, entries 0 / 4 / R, last entry = MTP layer) is translated to an
  explicit ``layer_types`` list (0 -> sliding_attention, 4 -> compressed_sparse_attention,
  R -> heavily_compressed_attention; MTP entry dropped) plus
  ``compress_rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": R}``.
  HF's own ``compress_ratios`` parsing only accepts the labels 0/4/128; when ``layer_types`` is given it
  pops and ignores ``compress_ratios``, so the hub ``config.json`` we write keeps the TRUE ratios
  (e.g. ``[0, 4, 8, 4, 0]``) in ``compress_ratios`` (what the official ModelArgs would hold) and adds
  ``layer_types`` + ``compress_rates`` only so HF can load it.  A JAX loader should read the per-layer
  ratio straight from ``compress_ratios``; if it also wants to accept real hub configs (labels 0/4/128,
  no ``compress_rates``) the rule "ratio = compress_rates[HCA] if present and label == 128" is harmless
  here because our files never contain the label 128 unless R == 128.
* ``qk_rope_head_dim`` -> HF ``partial_rotary_factor = qk_rope_head_dim / head_dim`` (the legacy key is
  accepted by HF directly); ``num_hash_layers`` -> ``mlp_layer_types`` (first N are ``hash_moe``).
* ``rope_scaling`` (type yarn, factor, original_max_position_embeddings, beta_fast, beta_slow) is only
  used for the "compress" rope (compressor layers, theta = compress_rope_theta); HF forces
  ``attention_factor = 1.0`` (no mscale), same as the reference.  Sliding-only layers use plain RoPE
  with ``rope_theta``.
* scoring_func = sqrtsoftplus, norm_topk_prob = True, topk_method = noaux_tc, hidden_act = silu,
  ``_attn_implementation = "eager"``, ``_experts_implementation = "eager"`` (HF's per-expert loop), no
  ``quantization_config`` (so no FP8/FP4 path at all), dtype float32, tie_word_embeddings False.

Official name <-> HF name (see ``OFFICIAL_TO_HF``; prefix ``model.`` on the HF side for everything except
``lm_head``; ``N`` = layer, ``E`` = expert):
    embed.weight                               model.embed_tokens.weight
    head.weight                                lm_head.weight
    norm.weight                                model.norm.weight
    hc_head_fn / hc_head_base / hc_head_scale  model.hc_head.hc_fn / hc_base / hc_scale
    layers.N.attn_norm.weight                  model.layers.N.input_layernorm.weight
    layers.N.ffn_norm.weight                   model.layers.N.post_attention_layernorm.weight
    layers.N.hc_attn_{fn,base,scale}           model.layers.N.attn_hc.{fn,base,scale}
    layers.N.hc_ffn_{fn,base,scale}            model.layers.N.ffn_hc.{fn,base,scale}
    layers.N.attn.attn_sink                    model.layers.N.self_attn.sinks
    layers.N.attn.wq_a.weight                  model.layers.N.self_attn.q_a_proj.weight
    layers.N.attn.q_norm.weight                model.layers.N.self_attn.q_a_norm.weight
    layers.N.attn.wq_b.weight                  model.layers.N.self_attn.q_b_proj.weight
    layers.N.attn.wkv.weight                   model.layers.N.self_attn.kv_proj.weight
    layers.N.attn.kv_norm.weight               model.layers.N.self_attn.kv_norm.weight
    layers.N.attn.wo_a.weight                  model.layers.N.self_attn.o_a_proj.weight   [g*o_lora, H*hd/g], same layout
    layers.N.attn.wo_b.weight                  model.layers.N.self_attn.o_b_proj.weight
    layers.N.attn.compressor.wkv.weight        model.layers.N.self_attn.compressor.kv_proj.weight
    layers.N.attn.compressor.wgate.weight      model.layers.N.self_attn.compressor.gate_proj.weight
    layers.N.attn.compressor.ape               model.layers.N.self_attn.compressor.position_bias
    layers.N.attn.compressor.norm.weight       model.layers.N.self_attn.compressor.kv_norm.weight
    layers.N.attn.indexer.wq_b.weight          model.layers.N.self_attn.compressor.indexer.q_b_proj.weight
    layers.N.attn.indexer.weights_proj.weight  model.layers.N.self_attn.compressor.indexer.scorer.weights_proj.weight
    layers.N.attn.indexer.compressor.wkv.weight    model.layers.N.self_attn.compressor.indexer.kv_proj.weight
    layers.N.attn.indexer.compressor.wgate.weight  model.layers.N.self_attn.compressor.indexer.gate_proj.weight
    layers.N.attn.indexer.compressor.ape           model.layers.N.self_attn.compressor.indexer.position_bias
    layers.N.attn.indexer.compressor.norm.weight   model.layers.N.self_attn.compressor.indexer.kv_norm.weight
    layers.N.ffn.gate.weight                   model.layers.N.mlp.gate.weight
    layers.N.ffn.gate.bias     (score layers)  model.layers.N.mlp.gate.e_score_correction_bias   (buffer)
    layers.N.ffn.gate.tid2eid  (hash layers)   model.layers.N.mlp.gate.tid2eid   int64 [V, topk]  (buffer)
    layers.N.ffn.experts.E.w1.weight           model.layers.N.mlp.experts.gate_up_proj[E, :I, :]   (stacked)
    layers.N.ffn.experts.E.w3.weight           model.layers.N.mlp.experts.gate_up_proj[E, I:, :]
    layers.N.ffn.experts.E.w2.weight           model.layers.N.mlp.experts.down_proj[E]              [D, I]
    layers.N.ffn.shared_experts.w1.weight      model.layers.N.mlp.shared_experts.gate_proj.weight
    layers.N.ffn.shared_experts.w3.weight      model.layers.N.mlp.shared_experts.up_proj.weight
    layers.N.ffn.shared_experts.w2.weight      model.layers.N.mlp.shared_experts.down_proj.weight
No transposes anywhere (all [out, in] as nn.Linear); the only structural change is the stacking of the
routed experts (gate_up_proj = cat([w1, w3], dim=0) per expert, stacked over experts; down_proj = stack
of w2).  ``mtp.*`` is not written (HF has no MTP and ignores ``mtp.*`` on load).  HF's rotary
``*_inv_freq`` buffers are non-persistent and not part of any checkpoint.

HF implementation notes vs architecture.md (transformers 5.24.0, read from modeling_deepseek_v4.py)
-----------------------------------------------------------------------------------------------------
1. Compressor overlap halves (CSA main compressor and indexer compressor): HF lays out
   ``new_kv[:, w, :m] = C[window w-1, :, :c]`` and ``new_kv[:, w, m:] = C[window w, :, c:]`` (same for the
   gate, whose first-window previous slots are -inf / kv 0).  I.e. the FIRST half of wkv/wgate/ape
   channels (rows ``[:c]`` of wkv/wgate, columns ``[:c]`` of ape) feeds the NEXT window's entry (paper
   C^b) and the second half feeds its own window -- identical to architecture.md §2.6 and to the
   official order, so NO permutation is applied when writing the official file.  (HF's docstrings call
   the first half "Ca" and the second "Cb", the reverse of the paper's letters; the code is what counts.)
   ``ape``/``position_bias`` rows are indexed by t mod m for both halves (HF adds position_bias
   [m, 2c] to the per-window gate [n_win, m, 2c] before the split), as in §2.6.
2. Compressed entry post-processing: pooled = sum(softmax_over_slots(gate, fp32) * kv) per channel,
   then ``kv_norm`` (weighted RMSNorm, weight multiplied in fp32), then RoPE on the LAST rope_dim
   channels at position ``i * m`` (first token of the window; + first_window_position with a cache),
   using the "compress" rope (compress_rope_theta + YaRN).  The indexer's compressed keys: same, with
   index_head_dim and its own kv_norm.  No Hadamard / FP4 / FP8 anywhere.
3. RoPE is interleaved (pairs (2i, 2i+1)) on the trailing rope_dim channels of every head: main q
   (after the unweighted per-head RMS rescale), kv (after kv_norm), compressed entries, indexer q,
   indexer keys; attention output is de-rotated with (cos, -sin) at the query position.
   cos/sin are computed in fp32 as fp32(pos) * inv_freq then cast to the model dtype (fp32 here).
4. Indexer: q_I = indexer.q_b_proj(q_residual) where q_residual = q_a_norm(q_a_proj(x)) (shared with
   the main q path), RoPE'd with the compress rope.  score[t,s] = sum_h relu(q_I[t,h].k[s]) *
   index_head_dim^-0.5 * (weights_proj(x)[t,h] * index_n_heads^-0.5), in fp32 -- same value as the
   reference's 128^-0.5 * 64^-0.5 factor.  Future entries (s >= (t+1)//4) are set to -inf BEFORE
   top-k, k = min(index_topk, n_compressed); picks that are not visible become -1 (masked).
   Selected compressed entries and all visible HCA entries are appended after the window keys; the
   window is kv positions (t - sliding_window, t], i.e. sliding_window entries including t.
5. Attention: eager, logits * head_dim^-0.5, additive mask, sink column appended per head, softmax
   (max-subtracted) in the logits dtype, sink probability dropped; K = V (shared single KV head).
6. Grouped output projection: o (after de-rotation) reshaped [B,S,g,H*hd/g] (contiguous heads per
   group); o_a_proj.weight viewed as [g, o_lora_rank, H*hd/g] -- identical to official wo_a layout.
7. MoE: router logits = x @ W^T in the model dtype, sqrt(softplus()), top-k on (score + bias)
   (hash layers: tid2eid[input_ids]); weights = s.gather / (sum + 1e-20) * routed_scaling_factor.
   Routed experts: gate_up = x @ gate_up_proj[E]^T, ``gate, up = chunk(2)`` -> gate = w1 (first I
   rows), up = w3; gate.clamp(max=limit), up.clamp(-limit, limit), silu(gate)*up, down_proj, THEN
   multiplied by the routing weight (reference multiplies before w2).  Experts are accumulated with
   index_add_ in order of expert id; the shared expert (same clamp) is added after.
8. mHC: identical to §2.3 (pre = sigmoid(.)+eps, post = 2*sigmoid, comb = softmax rows + eps, column
   normalise, then (iters-1) x (row, column)); hc_post: new[k] = post[k]*f + sum_j comb[j,k] X[j].
   hc_head: pre = sigmoid(mix*scale+base)+eps, no Sinkhorn.  Final: norm(hc_head(X)) @ head^T.
9. Checkpoint naming on the HF side: ``save_pretrained`` in 5.24 defaults to
   ``save_original_format=True`` and writes half-reverted names (official names with a ``model.``
   prefix, but ``head.weight``, ``model.embed_tokens.weight``, ``model.hc_head.hc_*`` and the main
   ``attn.kv_norm`` saved as ``model.layers.N.attn.norm.weight``) -- see ``save_hf_default``.
   Genuine HF names need ``save_original_format=False`` (``save_hf_named``).  HF's own config.json
   has no ``compress_ratios`` / ``num_hash_layers`` / ``rope_scaling``; it carries ``layer_types``,
   ``compress_rates``, ``mlp_layer_types``, ``qk_rope_head_dim``, ``partial_rotary_factor`` and a
   nested ``rope_parameters = {"main": {...}, "compress": {... yarn ..., "attention_factor": 1.0}}``.
10. HF self-consistency in fp32 on these specs: cached greedy decode logits match teacher-forced
   logits of the same sequence to ~6e-6 abs (logit std ~1); teacher-forced logits are bit-identical
   between the original model and a from_pretrained round trip (with experts_implementation="eager";
   the default "grouped_mm" experts path differs by ~5e-6).
11. Decode cache (hf_greedy): HF keeps sliding_window-1 past raw KV entries plus the new token, an
   incomplete-window buffer per compressor, the previous complete window's first-half (C^b) channels
   as overlap state, and the running list of compressed entries; a compressed entry is emitted as soon
   as its window closes and is visible to the token that closed it.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any

import numpy as np
import torch

from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

__all__ = [
    "SPEC_A",
    "SPEC_B",
    "SPEC_C",
    "SPECS",
    "OFFICIAL_TO_HF",
    "official_to_hf_name",
    "make_hf_config",
    "make_hf_model",
    "official_state_dict",
    "official_config_dict",
    "save_official",
    "load_official",
    "save_hf_named",
    "save_hf_default",
    "MODEL_SEED",
    "TOKEN_SEEDS",
    "make_tokens",
    "hf_logits",
    "hf_greedy",
    "indexer_stats",
    "indexer_tie_margin",
    "router_tie_margin",
    "find_token_seed",
    "swiglu_clamp_fraction",
]

# ---------------------------------------------------------------------------------------------------
# Tiny specs
# ---------------------------------------------------------------------------------------------------

_YARN_FLASH = {
    "type": "yarn",
    "factor": 16,
    "original_max_position_embeddings": 65536,
    "beta_fast": 32,
    "beta_slow": 1,
}

# Flash-like: sliding, CSA, HCA(R=8), CSA (+ MTP entry 0); 1 hash layer.
SPEC_A: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "head_dim": 128,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 32,
    "o_groups": 2,
    "o_lora_rank": 32,
    "sliding_window": 16,
    "compress_ratios": [0, 4, 8, 4, 0],
    "hca_ratio": 8,
    "index_n_heads": 16,
    "index_head_dim": 128,
    "index_topk": 4,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "num_hash_layers": 1,
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 2.0,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "rope_scaling": dict(_YARN_FLASH),
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6,
}

# Pro-like pattern starting with HCA (R=16), head_dim 192 (nope 128 + rope 64), 2 hash layers, o_groups 1.
SPEC_B: dict[str, Any] = {
    "vocab_size": 384,
    "hidden_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "head_dim": 192,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 48,
    "o_groups": 1,
    "o_lora_rank": 64,
    "sliding_window": 32,
    "compress_ratios": [16, 16, 4, 16, 0],
    "hca_ratio": 16,
    "index_n_heads": 16,
    "index_head_dim": 128,
    "index_topk": 6,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "num_experts_per_tok": 3,
    "moe_intermediate_size": 48,
    "num_hash_layers": 2,
    "routed_scaling_factor": 2.5,
    "swiglu_limit": 2.0,
    "rope_theta": 10000.0,
    "compress_rope_theta": 40000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 4,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6,
}

# Deeper Flash-like stack: 2 sliding, then CSA/HCA(R=8) interleaved, o_groups 4, 3 hash layers.
SPEC_C: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "head_dim": 128,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 64,
    "o_groups": 4,
    "o_lora_rank": 32,
    "sliding_window": 24,
    "compress_ratios": [0, 0, 4, 8, 4, 8, 0],
    "hca_ratio": 8,
    "index_n_heads": 32,
    "index_head_dim": 128,
    "index_topk": 8,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 32,
    "num_hash_layers": 3,
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 2.0,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "rope_scaling": dict(_YARN_FLASH),
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6,
}

SPECS: dict[str, dict[str, Any]] = {"A": SPEC_A, "B": SPEC_B, "C": SPEC_C}

#: Parameter seed used by the tests for every spec.
MODEL_SEED = 0
#: Token seeds (``make_tokens(spec, seed, B=2, S)``) checked for top-k margins on
#: ``make_hf_model(spec, MODEL_SEED)``: indexer relative margin >= 1e-3 and router margin >= 1e-4
#: (found with ``find_token_seed``; asserted in tests/test_hf_oracle.py).
TOKEN_SEEDS: dict[tuple[str, int], int] = {
    ("A", 37): 0, ("A", 45): 0, ("A", 64): 0, ("A", 70): 10,
    ("B", 37): 0, ("B", 45): 2, ("B", 64): 6, ("B", 70): 6,
    ("C", 37): 0, ("C", 45): 0, ("C", 64): 0, ("C", 70): 8,
}

_LAYER_TYPE = {
    "sliding": "sliding_attention",
    "csa": "compressed_sparse_attention",
    "hca": "heavily_compressed_attention",
}

# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------


def _layer_types(spec: dict) -> list[str]:
    n = spec["num_hidden_layers"]
    ratios = list(spec["compress_ratios"])
    R = int(spec["hca_ratio"])
    if len(ratios) != n + 1:
        raise ValueError(f"compress_ratios must have num_hidden_layers+1={n + 1} entries, got {len(ratios)}")
    if R == 4:
        raise ValueError("hca_ratio must differ from the CSA ratio 4")
    out = []
    for r in ratios[:n]:
        if r == 0:
            out.append(_LAYER_TYPE["sliding"])
        elif r == 4:
            out.append(_LAYER_TYPE["csa"])
        elif r == R:
            out.append(_LAYER_TYPE["hca"])
        else:
            raise ValueError(f"compress ratio {r} is neither 0, 4 nor hca_ratio={R}")
    if ratios[n] != 0:
        raise ValueError("the last compress_ratios entry (MTP layer) must be 0")
    return out


def _max_positions(spec: dict) -> int:
    """factor * original_max_position_embeddings (1048576 for the real models); keeps HF's YaRN check quiet."""
    rs = spec["rope_scaling"]
    return int(rs["factor"] * rs["original_max_position_embeddings"])


def make_hf_config(spec: dict) -> DeepseekV4Config:
    """Translate a tiny ``spec`` into an HF ``DeepseekV4Config`` (fp32, eager, no quantisation)."""
    n = spec["num_hidden_layers"]
    if spec["num_attention_heads"] % spec["o_groups"]:
        raise ValueError("num_attention_heads must be divisible by o_groups")
    if spec.get("n_shared_experts", 1) != 1:
        raise ValueError("HF DeepseekV4 implements exactly one shared expert")
    cfg = DeepseekV4Config(
        vocab_size=spec["vocab_size"],
        hidden_size=spec["hidden_size"],
        num_hidden_layers=n,
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=1,
        head_dim=spec["head_dim"],
        partial_rotary_factor=spec["qk_rope_head_dim"] / spec["head_dim"],
        q_lora_rank=spec["q_lora_rank"],
        o_groups=spec["o_groups"],
        o_lora_rank=spec["o_lora_rank"],
        sliding_window=spec["sliding_window"],
        layer_types=_layer_types(spec),
        compress_rates={
            "compressed_sparse_attention": 4,
            "heavily_compressed_attention": int(spec["hca_ratio"]),
        },
        mlp_layer_types=["hash_moe"] * min(n, spec["num_hash_layers"])
        + ["moe"] * max(0, n - spec["num_hash_layers"]),
        index_n_heads=spec["index_n_heads"],
        index_head_dim=spec["index_head_dim"],
        index_topk=spec["index_topk"],
        n_routed_experts=spec["n_routed_experts"],
        n_shared_experts=spec.get("n_shared_experts", 1),
        num_experts_per_tok=spec["num_experts_per_tok"],
        moe_intermediate_size=spec["moe_intermediate_size"],
        routed_scaling_factor=float(spec["routed_scaling_factor"]),
        swiglu_limit=float(spec["swiglu_limit"]),
        scoring_func="sqrtsoftplus",
        norm_topk_prob=True,
        rope_theta=float(spec["rope_theta"]),
        compress_rope_theta=float(spec["compress_rope_theta"]),
        rope_scaling=copy.deepcopy(spec["rope_scaling"]),
        max_position_embeddings=_max_positions(spec),
        hc_mult=spec["hc_mult"],
        hc_sinkhorn_iters=spec["hc_sinkhorn_iters"],
        hc_eps=float(spec["hc_eps"]),
        rms_norm_eps=float(spec["rms_norm_eps"]),
        num_nextn_predict_layers=1,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        use_cache=True,
        attn_implementation="eager",
        experts_implementation="eager",
    )
    assert cfg.qk_rope_head_dim == spec["qk_rope_head_dim"], (cfg.qk_rope_head_dim, spec["qk_rope_head_dim"])
    assert cfg.rope_parameters["compress"]["rope_type"] == "yarn"
    assert cfg.rope_parameters["compress"]["attention_factor"] == 1.0
    return cfg


# ---------------------------------------------------------------------------------------------------
# Model + deterministic re-randomisation
# ---------------------------------------------------------------------------------------------------


def _randomise_(model: DeepseekV4ForCausalLM, spec: dict, seed: int) -> None:
    """Overwrite every parameter / persistent buffer deterministically from ``seed``."""
    g = torch.Generator().manual_seed(int(seed))

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std + mean

    def uniform(shape, lo, hi):
        return torch.rand(shape, generator=g, dtype=torch.float32) * (hi - lo) + lo

    sd = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    E = spec["n_routed_experts"]
    k = spec["num_experts_per_tok"]
    V = spec["vocab_size"]
    # Iterate in state_dict order (deterministic).
    for name, t in sd.items():
        shape = tuple(t.shape)
        leaf = name.split(".")[-1]
        if name.endswith("tid2eid"):
            rows = [torch.randperm(E, generator=g)[:k] for _ in range(V)]
            new[name] = torch.stack(rows).to(torch.int64)
        elif name.endswith("e_score_correction_bias"):
            new[name] = normal(shape, 0.1)
        elif name.endswith("embed_tokens.weight"):
            new[name] = normal(shape, 1.0)
        elif name.endswith(("layernorm.weight", "norm.weight")):
            # every RMSNorm weight (input/post_attention_layernorm, q_a_norm, kv_norm, compressor
            # kv_norm, indexer kv_norm, final norm)
            new[name] = normal(shape, 0.1, mean=1.0)
        elif leaf in ("fn", "hc_fn"):
            # mix = fn @ unit-RMS vector of length hc*D  ->  std(mix) ~ 0.7
            new[name] = normal(shape, 0.7 / math.sqrt(shape[1]))
        elif leaf in ("base", "hc_base"):
            new[name] = normal(shape, 0.5)
        elif leaf in ("scale", "hc_scale"):
            new[name] = uniform(shape, 0.3, 1.2)
        elif leaf == "sinks":
            new[name] = normal(shape, 1.0)
        elif leaf == "position_bias":
            new[name] = normal(shape, 0.5)
        elif name.endswith("experts.gate_up_proj"):
            # [E, 2I, D]; x is unit-RMS -> pre-activations ~ N(0, 1.3^2): |.| > limit=2 for ~12%
            new[name] = normal(shape, 1.3 / math.sqrt(shape[2]))
        elif name.endswith("experts.down_proj"):
            new[name] = normal(shape, 1.0 / math.sqrt(shape[2]))
        elif name.endswith(("shared_experts.gate_proj.weight", "shared_experts.up_proj.weight")):
            new[name] = normal(shape, 1.3 / math.sqrt(shape[1]))
        elif name.endswith("compressor.gate_proj.weight") or name.endswith("indexer.gate_proj.weight"):
            # gate logits O(1.5) so the per-channel softmax pooling is far from uniform
            new[name] = normal(shape, 1.5 / math.sqrt(shape[1]))
        elif leaf == "weight" and t.dim() == 2:
            # every other nn.Linear [out, in] (incl. lm_head, router, o_a_proj grouped [g*r, H*hd/g])
            new[name] = normal(shape, 1.0 / math.sqrt(shape[1]))
        else:
            raise RuntimeError(f"_randomise_: no rule for {name} {shape}")
    missing, unexpected = model.load_state_dict(new, strict=True)
    assert not missing and not unexpected
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise RuntimeError(f"non-finite parameter {name}")


def make_hf_model(spec: dict, seed: int) -> tuple[DeepseekV4ForCausalLM, DeepseekV4Config]:
    """Build a float32 ``DeepseekV4ForCausalLM`` for ``spec`` with every parameter re-randomised from ``seed``."""
    cfg = make_hf_config(spec)
    torch.manual_seed(int(seed))  # construction-time init (overwritten below anyway)
    model = DeepseekV4ForCausalLM(cfg).to(torch.float32)
    model.eval()
    _randomise_(model, spec, seed)
    return model, cfg


# ---------------------------------------------------------------------------------------------------
# Official names
# ---------------------------------------------------------------------------------------------------

# (official suffix, HF suffix) inside a layer; "attn." prefix is "self_attn." on HF side etc.
_LAYER_MAP: list[tuple[str, str]] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("hc_attn_fn", "attn_hc.fn"),
    ("hc_attn_base", "attn_hc.base"),
    ("hc_attn_scale", "attn_hc.scale"),
    ("hc_ffn_fn", "ffn_hc.fn"),
    ("hc_ffn_base", "ffn_hc.base"),
    ("hc_ffn_scale", "ffn_hc.scale"),
    ("attn.attn_sink", "self_attn.sinks"),
    ("attn.wq_a.weight", "self_attn.q_a_proj.weight"),
    ("attn.q_norm.weight", "self_attn.q_a_norm.weight"),
    ("attn.wq_b.weight", "self_attn.q_b_proj.weight"),
    ("attn.wkv.weight", "self_attn.kv_proj.weight"),
    ("attn.kv_norm.weight", "self_attn.kv_norm.weight"),
    ("attn.wo_a.weight", "self_attn.o_a_proj.weight"),
    ("attn.wo_b.weight", "self_attn.o_b_proj.weight"),
    ("attn.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight"),
    ("attn.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight"),
    ("attn.compressor.ape", "self_attn.compressor.position_bias"),
    ("attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight"),
    ("attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight"),
    ("attn.indexer.weights_proj.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight"),
    ("attn.indexer.compressor.wkv.weight", "self_attn.compressor.indexer.kv_proj.weight"),
    ("attn.indexer.compressor.wgate.weight", "self_attn.compressor.indexer.gate_proj.weight"),
    ("attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"),
    ("attn.indexer.compressor.norm.weight", "self_attn.compressor.indexer.kv_norm.weight"),
    ("ffn.gate.weight", "mlp.gate.weight"),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.gate.tid2eid", "mlp.gate.tid2eid"),
    ("ffn.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight"),
    ("ffn.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight"),
    ("ffn.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight"),
]
_TOP_MAP: list[tuple[str, str]] = [
    ("embed.weight", "model.embed_tokens.weight"),
    ("head.weight", "lm_head.weight"),
    ("norm.weight", "model.norm.weight"),
    ("hc_head_fn", "model.hc_head.hc_fn"),
    ("hc_head_base", "model.hc_head.hc_base"),
    ("hc_head_scale", "model.hc_head.hc_scale"),
]

#: Documentation / loader table: official name pattern -> HF name pattern ({N} layer, {E} expert).
OFFICIAL_TO_HF: dict[str, str] = {
    **dict(_TOP_MAP),
    **{f"layers.{{N}}.{o}": f"model.layers.{{N}}.{h}" for o, h in _LAYER_MAP},
    "layers.{N}.ffn.experts.{E}.w1.weight": "model.layers.{N}.mlp.experts.gate_up_proj[{E}, :I, :]",
    "layers.{N}.ffn.experts.{E}.w3.weight": "model.layers.{N}.mlp.experts.gate_up_proj[{E}, I:, :]",
    "layers.{N}.ffn.experts.{E}.w2.weight": "model.layers.{N}.mlp.experts.down_proj[{E}]",
}


def official_to_hf_name(name: str) -> str:
    """Map one official tensor name to its HF name (experts -> 'gate_up_proj[E, :I, :]' style string)."""
    for o, h in _TOP_MAP:
        if name == o:
            return h
    parts = name.split(".")
    if parts[0] != "layers":
        raise KeyError(name)
    n, rest = parts[1], ".".join(parts[2:])
    if rest.startswith("ffn.experts."):
        e, w = parts[4], parts[5]
        return {
            "w1": f"model.layers.{n}.mlp.experts.gate_up_proj[{e}, :I, :]",
            "w3": f"model.layers.{n}.mlp.experts.gate_up_proj[{e}, I:, :]",
            "w2": f"model.layers.{n}.mlp.experts.down_proj[{e}]",
        }[w]
    for o, h in _LAYER_MAP:
        if rest == o:
            return f"model.layers.{n}.{h}"
    raise KeyError(name)


def official_state_dict(model: DeepseekV4ForCausalLM, spec: dict | None = None) -> dict[str, torch.Tensor]:
    """Return the model's weights under OFFICIAL names (§5.1), fp32 (tid2eid int64), contiguous clones.

    Inverse of HF's ``conversion_mapping['deepseek_v4']``.  No permutation is needed: HF's compressor
    channel order (first half of wkv/wgate/ape = previous-window C^b) equals the official one.
    """
    sd = model.state_dict()
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def put(off: str, hf: str):
        out[off] = sd[hf].detach().clone().contiguous()
        used.add(hf)

    for o, h in _TOP_MAP:
        put(o, h)
    n_layers = model.config.num_hidden_layers
    inter = model.config.moe_intermediate_size
    for n in range(n_layers):
        for o, h in _LAYER_MAP:
            hf = f"model.layers.{n}.{h}"
            if hf in sd:
                put(f"layers.{n}.{o}", hf)
        gu = sd[f"model.layers.{n}.mlp.experts.gate_up_proj"]  # [E, 2I, D]
        dn = sd[f"model.layers.{n}.mlp.experts.down_proj"]  # [E, D, I]
        assert gu.shape[1] == 2 * inter
        for e in range(gu.shape[0]):
            out[f"layers.{n}.ffn.experts.{e}.w1.weight"] = gu[e, :inter].clone().contiguous()
            out[f"layers.{n}.ffn.experts.{e}.w3.weight"] = gu[e, inter:].clone().contiguous()
            out[f"layers.{n}.ffn.experts.{e}.w2.weight"] = dn[e].clone().contiguous()
        used.add(f"model.layers.{n}.mlp.experts.gate_up_proj")
        used.add(f"model.layers.{n}.mlp.experts.down_proj")
    left = sorted(set(sd) - used)
    if left:
        raise RuntimeError(f"official_state_dict: HF tensors without an official name: {left}")
    for k, v in out.items():
        if k.endswith("tid2eid"):
            assert v.dtype == torch.int64, k
        else:
            out[k] = v.to(torch.float32)
    return out


def official_config_dict(spec: dict) -> dict:
    """HF-hub style config.json (as shipped with the released models) for ``spec``.

    ``compress_ratios`` keeps the true per-layer ratios (0 / 4 / R); ``layer_types`` and
    ``compress_rates`` are extra keys that let HF load a small HCA ratio R (HF ignores
    ``compress_ratios`` when ``layer_types`` is present).
    """
    n = spec["num_hidden_layers"]
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": spec["vocab_size"],
        "hidden_size": spec["hidden_size"],
        "moe_intermediate_size": spec["moe_intermediate_size"],
        "num_hidden_layers": n,
        "num_attention_heads": spec["num_attention_heads"],
        "num_key_value_heads": 1,
        "head_dim": spec["head_dim"],
        "qk_rope_head_dim": spec["qk_rope_head_dim"],
        "q_lora_rank": spec["q_lora_rank"],
        "o_groups": spec["o_groups"],
        "o_lora_rank": spec["o_lora_rank"],
        "sliding_window": spec["sliding_window"],
        "compress_ratios": [int(r) for r in spec["compress_ratios"]],
        "compress_rope_theta": spec["compress_rope_theta"],
        "rope_theta": spec["rope_theta"],
        "rope_scaling": copy.deepcopy(spec["rope_scaling"]),
        "max_position_embeddings": _max_positions(spec),
        "index_n_heads": spec["index_n_heads"],
        "index_head_dim": spec["index_head_dim"],
        "index_topk": spec["index_topk"],
        "n_routed_experts": spec["n_routed_experts"],
        "n_shared_experts": spec.get("n_shared_experts", 1),
        "num_experts_per_tok": spec["num_experts_per_tok"],
        "num_hash_layers": spec["num_hash_layers"],
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": spec["routed_scaling_factor"],
        "swiglu_limit": spec["swiglu_limit"],
        "hidden_act": "silu",
        "hc_mult": spec["hc_mult"],
        "hc_sinkhorn_iters": spec["hc_sinkhorn_iters"],
        "hc_eps": spec["hc_eps"],
        "rms_norm_eps": spec["rms_norm_eps"],
        "num_nextn_predict_layers": 1,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        # --- extra keys for HF (small HCA ratio); not in the released configs ---
        "layer_types": _layer_types(spec),
        "compress_rates": {
            "compressed_sparse_attention": 4,
            "heavily_compressed_attention": int(spec["hca_ratio"]),
        },
    }


def save_official(model: DeepseekV4ForCausalLM, hf_config: DeepseekV4Config, out_dir: str, spec: dict) -> str:
    """Write ``out_dir/model.safetensors`` (official names, fp32, tid2eid int64) + hub ``config.json``."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    # consistency between the spec and the model's config
    assert hf_config.layer_types == _layer_types(spec)
    assert hf_config.compress_rates["heavily_compressed_attention"] == int(spec["hca_ratio"])
    sd = official_state_dict(model, spec)
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(official_config_dict(spec), f, indent=2)
    return out_dir


def load_official(out_dir: str) -> tuple[DeepseekV4ForCausalLM, dict]:
    """``DeepseekV4ForCausalLM.from_pretrained(out_dir)`` in fp32/eager; returns (model, loading_info)."""
    model, info = DeepseekV4ForCausalLM.from_pretrained(
        out_dir,
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",
        output_loading_info=True,
    )
    model.eval()
    return model, info


def save_hf_named(model: DeepseekV4ForCausalLM, out_dir: str) -> str:
    """Write the checkpoint with genuine HF parameter names (§5.4: ``model.layers.N.self_attn.q_a_proj.weight``,
    stacked ``mlp.experts.gate_up_proj`` / ``down_proj`` ...) plus HF's own config.json.

    NOTE: this needs ``save_original_format=False``.  transformers 5.24's default ``save_pretrained``
    REVERTS the conversion mapping and writes a mixed format instead (see ``save_hf_default``)."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True, save_original_format=False)
    return out_dir


def save_hf_default(model: DeepseekV4ForCausalLM, out_dir: str) -> str:
    """Plain ``model.save_pretrained(out_dir)`` (transformers 5.24 default ``save_original_format=True``).

    This writes what HF-saved DeepSeek-V4 checkpoints look like in the wild: the conversion mapping is
    run backwards, but only partially -- official names with a ``model.`` prefix
    (``model.layers.N.attn.wq_a.weight``, ``model.layers.N.ffn.experts.E.w1.weight``,
    ``model.layers.N.hc_attn_fn``, ``model.norm.weight`` ...), EXCEPT ``head.weight`` (no prefix),
    ``model.embed_tokens.weight`` and ``model.hc_head.hc_{fn,base,scale}`` (not reverted, the patterns
    are anchored at ^), and the main attention's kv_norm which comes out as
    ``model.layers.N.attn.norm.weight`` (official: ``attn.kv_norm.weight``; the reverse of the
    ``.norm. -> .kv_norm.`` rename).  HF loads it back fine; a JAX loader that wants to accept HF-saved
    checkpoints must handle these quirks."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# ---------------------------------------------------------------------------------------------------
# Running the oracle
# ---------------------------------------------------------------------------------------------------


def make_tokens(spec: dict, seed: int, B: int = 2, S: int = 64) -> np.ndarray:
    """Deterministic random token ids in [2, vocab) (avoids bos=0 / eos=1), int64 [B, S]."""
    rng = np.random.default_rng(int(seed))
    return rng.integers(2, spec["vocab_size"], size=(B, S), dtype=np.int64)


def _as_ids(tokens) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    if t.dim() != 2:
        raise ValueError("tokens must be [B, S]")
    return t


@torch.no_grad()
def hf_logits(model: DeepseekV4ForCausalLM, tokens: np.ndarray) -> np.ndarray:
    """Teacher-forced full-sequence logits (no cache, attention mask all ones): float32 [B, S, V]."""
    ids = _as_ids(tokens)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return out.logits.float().cpu().numpy()


@torch.no_grad()
def hf_greedy(model: DeepseekV4ForCausalLM, prompt: np.ndarray, max_new_tokens: int, return_logits: bool = False):
    """Greedy decoding with HF's (DeepSeek-V4) dynamic cache.

    Prefill the whole prompt in one call, then feed one token at a time (S = 1 decode steps), argmax
    of the last logits each step (no EOS stopping).  Returns the NEW tokens int64 [B, max_new_tokens]
    (prompt excluded); with ``return_logits=True`` returns ``(tokens, logits)`` where ``logits[:, i]``
    float32 [B, max_new_tokens, V] is the distribution that produced ``tokens[:, i]`` (i = 0 comes
    from the prefill's last position).
    """
    from transformers import DynamicCache

    ids = _as_ids(prompt)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, cache=cache, use_cache=True)
    cache = out.cache
    step_logits = out.logits[:, -1].float()
    toks, logs = [], []
    for i in range(max_new_tokens):
        nxt = step_logits.argmax(-1)
        toks.append(nxt)
        logs.append(step_logits)
        if i + 1 == max_new_tokens:
            break
        out = model(input_ids=nxt[:, None], cache=cache, use_cache=True)
        cache = out.cache
        step_logits = out.logits[:, -1].float()
    tokens = torch.stack(toks, 1).cpu().numpy().astype(np.int64)
    if return_logits:
        return tokens, torch.stack(logs, 1).cpu().numpy()
    return tokens


# ---------------------------------------------------------------------------------------------------
# Diagnostics: indexer top-k ties, SwiGLU clamp activity
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def indexer_stats(model: DeepseekV4ForCausalLM, tokens: np.ndarray) -> dict:
    """Top-k boundary margins of every CSA indexer on a no-cache forward over ``tokens``.

    For each CSA layer, batch row and query t with visible = (t+1)//4 > index_topk, sort the visible
    scores descending and take gap = s[k-1] - s[k] (k = index_topk); ``rel`` = gap / max|visible
    scores of that query| (so a near-zero pair is not flattered).  Also reports a duplicate check of the
    whole top-k set (gaps among the top-k+1 values).  Returns a dict with min_rel_margin, min_abs_margin,
    n_selecting (#queries with visible > k), n_queries, per_layer {layer: min_rel}.
    """
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4IndexerScorer

    captured: dict[int, torch.Tensor] = {}
    handles = []
    for li, layer in enumerate(model.model.layers):
        comp = layer.self_attn.compressor
        if comp is None or not hasattr(comp, "indexer"):
            continue
        scorer = comp.indexer.scorer
        assert isinstance(scorer, DeepseekV4IndexerScorer)

        def hook(mod, args, output, li=li):
            captured[li] = output.detach().float().clone()

        handles.append(scorer.register_forward_hook(hook))
    try:
        ids = _as_ids(tokens)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    k = model.config.index_topk
    m = model.config.compress_rates["compressed_sparse_attention"]
    S = ids.shape[1]
    min_rel, min_abs, n_sel, n_q = math.inf, math.inf, 0, 0
    per_layer = {}
    for li, sc in sorted(captured.items()):
        B, S_, T = sc.shape
        assert S_ == S
        lay_min = math.inf
        for t in range(S):
            vis = (t + 1) // m
            n_q += B
            if vis <= k:
                continue
            v = sc[:, t, :vis]  # [B, vis]
            srt = v.sort(dim=-1, descending=True).values
            gap = srt[:, k - 1] - srt[:, k]
            scale = v.abs().amax(-1).clamp_min(1e-30)
            rel = (gap / scale).min().item()
            min_rel = min(min_rel, rel)
            min_abs = min(min_abs, gap.min().item())
            lay_min = min(lay_min, rel)
            n_sel += B
        per_layer[li] = lay_min
    return {
        "min_rel_margin": min_rel,
        "min_abs_margin": min_abs,
        "n_selecting": n_sel,
        "n_queries": n_q,
        "per_layer": per_layer,
    }


def indexer_tie_margin(model: DeepseekV4ForCausalLM, tokens: np.ndarray) -> float:
    """Smallest relative gap between the k-th and (k+1)-th visible indexer score over every CSA layer,
    batch row and query that actually has to choose (visible > index_topk); ``inf`` if none does.
    Values well above 1e-4 mean torch / jax top-k cannot disagree through tie-breaking."""
    return indexer_stats(model, tokens)["min_rel_margin"]


@torch.no_grad()
def router_tie_margin(model: DeepseekV4ForCausalLM, tokens: np.ndarray) -> float:
    """Smallest gap between the k-th and (k+1)-th value of (sqrtsoftplus(router logits) + bias) over
    every score-routed (non-hash) MoE layer and token, on a no-cache forward (k = num_experts_per_tok).
    A gap well above ~1e-5 means the expert choice cannot flip between torch and jax fp32."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4TopKRouter

    gaps: list[float] = []
    handles = []
    for layer in model.model.layers:
        gate = layer.mlp.gate
        if not isinstance(gate, DeepseekV4TopKRouter):
            continue

        def hook(mod, args, output):
            logits = output[0].float()
            sel = mod.score_fn(logits) + mod.e_score_correction_bias.float()
            srt = sel.sort(dim=-1, descending=True).values
            gaps.append((srt[:, mod.top_k - 1] - srt[:, mod.top_k]).min().item())

        handles.append(gate.register_forward_hook(hook))
    try:
        ids = _as_ids(tokens)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return min(gaps) if gaps else math.inf


def find_token_seed(
    model: DeepseekV4ForCausalLM,
    spec: dict,
    B: int = 2,
    S: int = 64,
    min_indexer_margin: float = 1e-3,
    min_router_margin: float = 1e-4,
    seeds=range(200),
) -> int:
    """First token seed (for ``make_tokens(spec, seed, B, S)``) whose indexer top-k boundaries and
    router top-k boundaries both have comfortable margins on ``model``."""
    for sd in seeds:
        tok = make_tokens(spec, sd, B, S)
        if indexer_tie_margin(model, tok) >= min_indexer_margin and router_tie_margin(model, tok) >= min_router_margin:
            return int(sd)
    raise RuntimeError("no token seed with comfortable top-k margins found")


@torch.no_grad()
def swiglu_clamp_fraction(model: DeepseekV4ForCausalLM, tokens: np.ndarray) -> dict:
    """Fraction of SwiGLU pre-activations hit by the clamp (gate > limit, |up| > limit), routed and
    shared experts, on a no-cache forward.  Returns {"routed_gate", "routed_up", "shared_gate",
    "shared_up"} fractions."""
    limit = model.config.swiglu_limit
    cnt = {k: [0, 0] for k in ("routed_gate", "routed_up", "shared_gate", "shared_up")}
    handles, patched = [], []
    for layer in model.model.layers:
        experts = layer.mlp.experts
        orig = experts._apply_gate

        def wrapped(gate_up, orig=orig):
            gate, up = gate_up.chunk(2, dim=-1)
            cnt["routed_gate"][0] += int((gate > limit).sum())
            cnt["routed_gate"][1] += gate.numel()
            cnt["routed_up"][0] += int((up.abs() > limit).sum())
            cnt["routed_up"][1] += up.numel()
            return orig(gate_up)

        experts._apply_gate = wrapped
        patched.append(experts)
        sh = layer.mlp.shared_experts

        def hg(mod, args, out):
            cnt["shared_gate"][0] += int((out > limit).sum())
            cnt["shared_gate"][1] += out.numel()

        def hu(mod, args, out):
            cnt["shared_up"][0] += int((out.abs() > limit).sum())
            cnt["shared_up"][1] += out.numel()

        handles.append(sh.gate_proj.register_forward_hook(hg))
        handles.append(sh.up_proj.register_forward_hook(hu))
    try:
        ids = _as_ids(tokens)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        for ex in patched:
            del ex._apply_gate  # drop the instance attribute, back to the class method
    return {k: (a / b if b else 0.0) for k, (a, b) in cnt.items()}
