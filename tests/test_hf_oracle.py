"""Smoke tests for tests/hf_oracle.py (the PyTorch / HF-transformers side of the parity tests)."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402  (the test extra installs torch and transformers: a missing one is an error)

import hf_oracle as H  # noqa: E402

S = 64


@pytest.fixture(scope="module", params=sorted(H.SPECS))
def built(request):
    name = request.param
    spec = H.SPECS[name]
    model, cfg = H.make_hf_model(spec, H.MODEL_SEED)
    tokens = H.make_tokens(spec, H.TOKEN_SEEDS[(name, S)], B=2, S=S)
    logits = H.hf_logits(model, tokens)
    return name, spec, model, cfg, tokens, logits


def _expected_official_names(spec):
    n = spec["num_hidden_layers"]
    names = {"embed.weight", "head.weight", "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale"}
    for i in range(n):
        p = f"layers.{i}."
        names |= {p + s for s in ("attn_norm.weight", "ffn_norm.weight")}
        names |= {p + f"hc_{site}_{t}" for site in ("attn", "ffn") for t in ("fn", "base", "scale")}
        names |= {
            p + "attn." + s
            for s in (
                "attn_sink",
                "wq_a.weight",
                "q_norm.weight",
                "wq_b.weight",
                "wkv.weight",
                "kv_norm.weight",
                "wo_a.weight",
                "wo_b.weight",
            )
        }
        r = spec["compress_ratios"][i]
        if r:
            names |= {p + "attn.compressor." + s for s in ("wkv.weight", "wgate.weight", "ape", "norm.weight")}
        if r == 4:
            names |= {p + "attn.indexer." + s for s in ("wq_b.weight", "weights_proj.weight")}
            names |= {
                p + "attn.indexer.compressor." + s for s in ("wkv.weight", "wgate.weight", "ape", "norm.weight")
            }
        names.add(p + "ffn.gate.weight")
        names.add(p + ("ffn.gate.tid2eid" if i < spec["num_hash_layers"] else "ffn.gate.bias"))
        names |= {p + f"ffn.shared_experts.w{j}.weight" for j in (1, 2, 3)}
        names |= {p + f"ffn.experts.{e}.w{j}.weight" for e in range(spec["n_routed_experts"]) for j in (1, 2, 3)}
    return names


def test_logits_finite_and_nondegenerate(built):
    name, spec, model, cfg, tokens, logits = built
    assert logits.shape == (2, S, spec["vocab_size"])
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()
    assert 0.3 < logits.std() < 10.0
    # different positions / rows give different predictions
    assert len(np.unique(logits.argmax(-1))) > 5


def test_official_roundtrip(built, tmp_path):
    from safetensors import safe_open

    name, spec, model, cfg, tokens, logits = built
    d = str(tmp_path / "official")
    H.save_official(model, cfg, d, spec)
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    assert keys == _expected_official_names(spec)
    assert not any(k.startswith("mtp.") for k in keys)
    for k, dt in dtypes.items():
        assert dt == ("I64" if k.endswith("tid2eid") else "F32"), (k, dt)
    D, hd, R, I = spec["hidden_size"], spec["head_dim"], spec["hca_ratio"], spec["moe_intermediate_size"]
    for i, r in enumerate(spec["compress_ratios"][:-1]):
        p = f"layers.{i}.attn."
        if r == 4:
            assert shapes[p + "compressor.wkv.weight"] == (2 * hd, D)
            assert shapes[p + "compressor.ape"] == (4, 2 * hd)
            assert shapes[p + "indexer.compressor.ape"] == (4, 2 * spec["index_head_dim"])
            assert shapes[p + "indexer.wq_b.weight"] == (
                spec["index_n_heads"] * spec["index_head_dim"],
                spec["q_lora_rank"],
            )
        elif r:
            assert shapes[p + "compressor.wgate.weight"] == (hd, D)
            assert shapes[p + "compressor.ape"] == (R, hd)
        g, H_ = spec["o_groups"], spec["num_attention_heads"]
        assert shapes[p + "wo_a.weight"] == (g * spec["o_lora_rank"], H_ * hd // g)
        assert shapes[f"layers.{i}.ffn.experts.0.w1.weight"] == (I, D)
        assert shapes[f"layers.{i}.ffn.experts.0.w2.weight"] == (D, I)
    tid = [k for k in keys if k.endswith("tid2eid")]
    assert len(tid) == spec["num_hash_layers"]

    conf = json.load(open(os.path.join(d, "config.json")))
    assert conf["model_type"] == "deepseek_v4"
    assert conf["compress_ratios"] == spec["compress_ratios"]
    assert conf["tie_word_embeddings"] is False
    assert conf["rope_scaling"]["type"] == "yarn"

    model2, info = H.load_official(d)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    assert model2.config.layer_types == cfg.layer_types
    assert model2.config.compress_rates == cfg.compress_rates
    assert model2.config.mlp_layer_types == cfg.mlp_layer_types
    logits2 = H.hf_logits(model2, tokens)
    assert np.abs(logits2 - logits).max() == 0.0

    # official tensors are exactly the HF tensors (w1/w3 halves of gate_up_proj, etc.)
    sd = model.state_dict()
    off = H.official_state_dict(model)
    inter = spec["moe_intermediate_size"]
    gu = sd["model.layers.0.mlp.experts.gate_up_proj"]
    assert torch.equal(off["layers.0.ffn.experts.1.w1.weight"], gu[1, :inter])
    assert torch.equal(off["layers.0.ffn.experts.1.w3.weight"], gu[1, inter:])
    assert torch.equal(off["layers.0.ffn.experts.1.w2.weight"], sd["model.layers.0.mlp.experts.down_proj"][1])
    for k in off:
        if ".experts." not in k or "shared" in k:
            assert torch.equal(off[k], sd[H.official_to_hf_name(k)]), k


def test_hf_named_roundtrip(built, tmp_path):
    from safetensors import safe_open

    from transformers import DeepseekV4ForCausalLM

    name, spec, model, cfg, tokens, logits = built
    d = str(tmp_path / "hfnamed")
    H.save_hf_named(model, d)
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(model.state_dict())
    m2, info = DeepseekV4ForCausalLM.from_pretrained(
        d, dtype=torch.float32, experts_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert np.abs(H.hf_logits(m2, tokens) - logits).max() == 0.0


def test_clamp_active(built):
    name, spec, model, cfg, tokens, logits = built
    fr = H.swiglu_clamp_fraction(model, tokens)
    for k, v in fr.items():
        assert 0.01 < v < 0.5, (k, fr)


def test_topk_margins(built):
    name, spec, model, cfg, tokens, logits = built
    st = H.indexer_stats(model, tokens)
    assert st["n_selecting"] > 0  # the indexer really selects fewer entries than are visible
    assert st["min_rel_margin"] > 1e-3, st
    assert H.router_tie_margin(model, tokens) > 1e-4


def test_greedy_matches_teacher_forced(built):
    name, spec, model, cfg, tokens, logits = built
    prompt = tokens[:, :37]
    new, step_logits = H.hf_greedy(model, prompt, 8, return_logits=True)
    assert new.shape == (2, 8) and step_logits.shape == (2, 8, spec["vocab_size"])
    full = np.concatenate([prompt, new], axis=1)
    tf = H.hf_logits(model, full)
    assert np.abs(tf[:, 36:44] - step_logits).max() < 1e-4
    assert (tf[:, 36:44].argmax(-1) == new).all()
    assert H.indexer_tie_margin(model, full) > 1e-4


def test_token_seed_table_and_determinism():
    for name, spec in sorted(H.SPECS.items()):
        model, _ = H.make_hf_model(spec, H.MODEL_SEED)
        model_b, _ = H.make_hf_model(spec, H.MODEL_SEED)
        sa, sb = model.state_dict(), model_b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        for (n, s), seed in H.TOKEN_SEEDS.items():
            if n != name:
                continue
            tok = H.make_tokens(spec, seed, B=2, S=s)
            assert H.indexer_tie_margin(model, tok) > 1e-3, (n, s)
            assert H.router_tie_margin(model, tok) > 1e-4, (n, s)
