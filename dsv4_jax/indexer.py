"""Lightning indexer: picks the top-k compressed entries for each query of a CSA layer
(docs/architecture.md §2.7).

    qI = wq_b(qr) [B,S,nI,cI] (RoPE on the last r dims; Hadamard + FP4 under quant_sim)
    w  = weights_proj(x) * cI^-0.5 * nI^-0.5                       [B,S,nI]
    score[t, s] = sum_h relu(qI[t,h] . KI[s]) * w[t,h]              [B,S,C]
    select top-k among entries s < (t+1)//4; chosen but invisible entries become -1.

Scoring and selection are the op `ops.indexer_topk` (one implementation switch for every caller).
"""
from __future__ import annotations

import jax.numpy as jnp

from dsv4_jax import compressor, quant
from dsv4_jax.config import ModelConfig
from dsv4_jax.linear import fp8_linear, plain_linear
from dsv4_jax.params import ParamSpec
from dsv4_jax.rope import apply_rope

F32 = jnp.float32
CSA_RATIO = 4


def indexer_specs(cfg: ModelConfig) -> dict:
  nI, cI = cfg.index_n_heads, cfg.index_head_dim
  return {
      "wq_b": ParamSpec((nI * cI, cfg.q_lora_rank), ("index_heads", "q_lora")),
      "weights_proj": ParamSpec((nI, cfg.dim), ("index_heads", "embed")),
      "compressor": compressor.compressor_specs(cfg, CSA_RATIO, cI),
  }


def index_queries(p: dict, cfg: ModelConfig, x: jnp.ndarray, qr: jnp.ndarray, cos, sin):
  """x: [B,S,D], qr: [B,S,dc], cos/sin: [B,S,r/2] -> qI [B,S,nI,cI], weights [B,S,nI]."""
  B, S, _ = x.shape
  qI = fp8_linear(qr, p["wq_b"], cfg.quant_sim).reshape(B, S, cfg.index_n_heads, cfg.index_head_dim)
  qI = apply_rope(qI, cos[:, :, None], sin[:, :, None])
  if cfg.quant_sim:
    qI = quant.indexer_fp4_sim(qI)
  w = plain_linear(x, p["weights_proj"]) * jnp.asarray(
      cfg.index_head_dim ** -0.5 * cfg.index_n_heads ** -0.5, x.dtype)
  return qI, w
