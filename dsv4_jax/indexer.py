"""Lightning indexer: picks the top-k compressed entries for each query of a CSA layer
(docs/architecture.md §2.7).

    qI = wq_b(qr) [B,S,nI,cI] (RoPE on the last r dims; Hadamard + FP4 under quant_sim)
    w  = weights_proj(x) * cI^-0.5 * nI^-0.5                       [B,S,nI]
    score[t, s] = sum_h relu(qI[t,h] . KI[s]) * w[t,h]              [B,S,C]
    select top-k among entries s < (t+1)//4; chosen but invisible entries become -1.
"""
from __future__ import annotations

import jax
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


def index_scores(qI: jnp.ndarray, w: jnp.ndarray, keys: jnp.ndarray) -> jnp.ndarray:
  """qI: [B,S,nI,cI], w: [B,S,nI], keys: [B,C,cI] -> scores [B,S,C] in the compute dtype."""
  logits = jnp.einsum("bshd,bcd->bshc", qI, keys, preferred_element_type=F32).astype(qI.dtype)
  weighted = jax.nn.relu(logits) * w[..., None]
  return jnp.sum(weighted.astype(F32), axis=2).astype(qI.dtype)


def select_topk(scores: jnp.ndarray, positions: jnp.ndarray, k: int) -> jnp.ndarray:
  """scores: [B,S,C], positions: [B,S] (absolute query positions) -> [B,S,min(k,C)] int32 entry ids,
  -1 where fewer than k entries are visible. Ties go to the lower entry id."""
  C = scores.shape[-1]
  k = min(k, C)
  visible = jnp.arange(C) < compressor.visible_count(positions, CSA_RATIO)[..., None]
  masked = jnp.where(visible, scores.astype(F32), -jnp.inf)
  _, idx = jax.lax.top_k(masked, k)
  ok = idx < compressor.visible_count(positions, CSA_RATIO)[..., None]
  return jnp.where(ok, idx, -1).astype(jnp.int32)
