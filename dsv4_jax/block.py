"""One transformer block: attention and MoE sublayers, each wrapped by mHC (docs/architecture.md §2.11).

    x, post, comb = hc_pre(X);  X = hc_post(attention(attn_norm(x)), X, post, comb)
    x, post, comb = hc_pre(X);  X = hc_post(moe(ffn_norm(x)), X, post, comb)
"""
from __future__ import annotations

import jax.numpy as jnp

from dsv4_jax import attention, mhc, moe
from dsv4_jax.config import ModelConfig
from dsv4_jax.norm import rms_norm
from dsv4_jax.params import ParamSpec
from dsv4_jax.sharding import constrain


def block_specs(cfg: ModelConfig, ratio: int, hash_routed: bool) -> dict:
  D, nh = cfg.dim, cfg.hc_mult
  return {
      "attn_norm": ParamSpec((D,), ("embed",), "f32", ("normal_plus_one", 0.1)),
      "ffn_norm": ParamSpec((D,), ("embed",), "f32", ("normal_plus_one", 0.1)),
      "hc_attn": mhc.hc_specs(nh, D),
      "hc_ffn": mhc.hc_specs(nh, D),
      "attn": attention.attention_specs(cfg, ratio),
      "ffn": moe.moe_specs(cfg, hash_routed),
  }


def mhc_sublayer(X: jnp.ndarray, hc: dict, cfg: ModelConfig, sublayer) -> jnp.ndarray:
  """X: [B,S,nh,D] -> hc_post(sublayer(hc_pre(X)), X)."""
  x, post, comb = mhc.hc_pre(X, hc, cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps)
  return mhc.hc_post(sublayer(x), X, post, comb)


def ffn_sublayer(p: dict, cfg: ModelConfig, X: jnp.ndarray, token_ids: jnp.ndarray, valid=None,
                 stats: bool = False):
  """X: [B,S,nh,D] -> [B,S,nh,D]; with `stats`, (X, the MoE's `moe.MoEStats`)."""
  out = {}

  def ffn(x):
    y = moe.moe(p["ffn"], cfg, rms_norm(x, p["ffn_norm"], cfg.norm_eps), token_ids, valid=valid, stats=stats)
    if stats:
      y, out["stats"] = y
    return y

  X = mhc_sublayer(X, p["hc_ffn"], cfg, ffn)
  return (X, out["stats"]) if stats else X


def block(p: dict, cfg: ModelConfig, ratio: int, X: jnp.ndarray, token_ids: jnp.ndarray,
          positions: jnp.ndarray | None = None, lengths: jnp.ndarray | None = None, cache=None,
          stats: bool = False):
  """X: [B,S,nh,D] streams, token_ids: [B,S] (hash routing) -> ([B,S,nh,D], cache), or with `stats`
  (training) ([B,S,nh,D], cache, the MoE's `moe.MoEStats`).

  Without a cache: the whole sequence from position 0. With one (`cache.LayerCache`): row b appends
  lengths[b] tokens at `positions[b]`; its padded positions skip the MoE.
  """
  out = {}

  def attn(x):
    y, out["cache"] = attention.attention(p["attn"], cfg, ratio, rms_norm(x, p["attn_norm"], cfg.norm_eps),
                                          positions, lengths, cache)
    return y

  X = mhc_sublayer(X, p["hc_attn"], cfg, attn)
  valid = None if lengths is None else jnp.arange(X.shape[1])[None] < lengths[:, None]
  X = ffn_sublayer(p, cfg, X, token_ids, valid, stats)
  if stats:
    X, out["stats"] = X
  X = constrain(X, ("batch", "seq", None, "act_embed"))
  return (X, out["cache"], out["stats"]) if stats else (X, out["cache"])
