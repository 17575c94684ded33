"""Multi-token prediction block, depth 1 (docs/architecture.md §2.13).

Position i combines the main model's final streams h_i with the embedding of token i+1 and predicts
token i+2. It shares the embedding and the output head with the main model; its block is sliding-window
only and score-routed.
"""
from __future__ import annotations

import jax.numpy as jnp

from dsv4_jax import block, head, mhc
from dsv4_jax.config import ModelConfig
from dsv4_jax.linear import fp8_linear
from dsv4_jax.norm import rms_norm
from dsv4_jax.params import ParamSpec


def mtp_specs(cfg: ModelConfig, layer_id: int) -> dict:
  D = cfg.dim
  specs = block.block_specs(cfg, cfg.layer_ratio(layer_id), hash_routed=False)
  specs.update({
      "e_proj": ParamSpec((D, D), ("embed", "embed_out")),
      "h_proj": ParamSpec((D, D), ("embed", "embed_out")),
      "enorm": ParamSpec((D,), ("embed",), "f32", ("normal_plus_one", 0.1)),
      "hnorm": ParamSpec((D,), ("embed",), "f32", ("normal_plus_one", 0.1)),
      "norm": ParamSpec((D,), ("embed",), "f32", ("normal_plus_one", 0.1)),
      "hc_head": mhc.head_specs(cfg.hc_mult, D),
  })
  return specs


def mtp_input(p: dict, cfg: ModelConfig, embed: jnp.ndarray, X_main: jnp.ndarray, next_ids: jnp.ndarray):
  """X_main: [B,S,nh,D] main-model streams at positions i; next_ids: [B,S] tokens i+1 -> [B,S,nh,D]."""
  e = rms_norm(embed[next_ids].astype(X_main.dtype), p["enorm"], cfg.norm_eps)
  h = fp8_linear(rms_norm(X_main, p["hnorm"], cfg.norm_eps), p["h_proj"], cfg.quant_sim)
  return fp8_linear(e, p["e_proj"], cfg.quant_sim)[:, :, None, :] + h


def mtp_streams(p: dict, cfg: ModelConfig, layer_id: int, embed: jnp.ndarray, X_main: jnp.ndarray,
                tokens: jnp.ndarray, stats: bool = False):
  """Teacher-forced MTP block. X_main: [B,S,nh,D], tokens: [B,S] -> its streams [B,S-1,nh,D] (position i
  predicts token i+2); with `stats`, (streams, the block's `moe.MoEStats`)."""
  next_ids = tokens[:, 1:]
  X = mtp_input(p, cfg, embed, X_main[:, :-1], next_ids)
  out = block.block(p, cfg, cfg.layer_ratio(layer_id), X, next_ids, stats=stats)
  return (out[0], out[2]) if stats else out[0]


def mtp_forward(p: dict, cfg: ModelConfig, layer_id: int, embed: jnp.ndarray, head_w: jnp.ndarray,
                X_main: jnp.ndarray, tokens: jnp.ndarray) -> jnp.ndarray:
  """Teacher-forced MTP logits. X_main: [B,S,nh,D], tokens: [B,S] -> [B,S-1,V] fp32."""
  X = mtp_streams(p, cfg, layer_id, embed, X_main, tokens)
  return head.logits(X, p["hc_head"], p["norm"], head_w, cfg)


def mtp_step(p: dict, cfg: ModelConfig, layer_id: int, embed: jnp.ndarray, X_main: jnp.ndarray,
             next_ids: jnp.ndarray, start: jnp.ndarray, lengths: jnp.ndarray, layer_cache: dict, live: int):
  """The MTP block over its window cache: row b appends lengths[b] positions at start[b].. (position i
  combines the streams X_main[:, i] with the embedding of the token after it, next_ids[:, i]).

  X_main: [B,S,nh,D], next_ids: [B,S], start/lengths: [B], layer_cache: the block's cache tree (cache.py)
  -> (the block's output streams [B,S,nh,D], the updated cache tree). The head of those streams predicts
  the token two after each position; speculative decoding also feeds them back as X_main to draft further.
  """
  from dsv4_jax.cache import LayerCache          # cache.py builds on the model's modules
  X = mtp_input(p, cfg, embed, X_main, next_ids)
  positions = start[:, None] + jnp.arange(X.shape[1], dtype=jnp.int32)
  X, view = block.block(p, cfg, cfg.layer_ratio(layer_id), X, next_ids, positions, lengths,
                        LayerCache(layer_cache, None, live, cfg))
  return X, view.tree
