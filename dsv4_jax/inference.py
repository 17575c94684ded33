"""Cached inference: `prefill` appends a chunk of tokens per sequence, `decode_step` one token.

Both are the same function, `step`: every batch row appends `lengths[b]` tokens (right-padded in
`tokens`) at its own position `cache["length"][b]`, so a batch may mix prompts of different lengths,
prompts may be prefilled in chunks, and several tokens may be verified at once. The jitted entry points
donate the cache: decoding updates it in place.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax import block, head
from dsv4_jax.config import ModelConfig
from dsv4_jax.transformer import check_tokens, embed_streams, layer_plan


def run_layers_cached(layers: dict, caches: dict, cfg: ModelConfig, X, tokens, start, lengths):
  """The main stack over the cache: X [B,S,nh,D] -> (X, new layer caches)."""
  plan = layer_plan(cfg)

  def apply(p, c, i, X):
    return block.block_step(p, cfg, cfg.layer_ratio(i), X, tokens, start, lengths, c)

  new = {"prefix": [], "stack": [], "suffix": []}
  for p, c, i in zip(layers["prefix"], caches["prefix"], plan.prefix):
    X, c = apply(p, c, i, X)
    new["prefix"].append(c)
  if plan.reps:
    def body(X, pc):
      ps, cs = pc
      out = []
      for p, c, i in zip(ps, cs, plan.period):
        X, c = apply(p, c, i, X)
        out.append(c)
      return X, out
    X, new["stack"] = jax.lax.scan(body, X, (list(layers["stack"]), list(caches["stack"])))
  for p, c, i in zip(layers["suffix"], caches["suffix"], plan.suffix):
    X, c = apply(p, c, i, X)
    new["suffix"].append(c)
  return X, new


def step(params: dict, cfg: ModelConfig, tokens: jnp.ndarray, lengths: jnp.ndarray, cache: dict):
  """tokens [B,S] (row b's first lengths[b] are real), lengths [B] -> (logits [B,V] fp32 at each row's last
  new token, updated cache). Pure; see `prefill` / `decode_step` for the checked, jitted entry points."""
  tokens = tokens.astype(jnp.int32)
  lengths = lengths.astype(jnp.int32)
  start = cache["length"]
  X = embed_streams(params, cfg, tokens)
  X, layer_caches = run_layers_cached(params["layers"], cache["layers"], cfg, X, tokens, start, lengths)
  last = jnp.clip(lengths - 1, 0, tokens.shape[1] - 1)
  X_last = jnp.take_along_axis(X, last[:, None, None, None], axis=1)              # [B,1,nh,D]
  logits = head.logits(X_last, params["hc_head"], params["norm"], params["head"], cfg)[:, 0]
  new_cache = dict(cache, length=start + lengths, layers=layer_caches)
  return logits, new_cache


_step_jit = jax.jit(step, static_argnums=1, donate_argnums=4)


def check_append(cfg: ModelConfig, tokens, lengths, cache: dict) -> None:
  """Host-side checks before any compute: ids in the vocabulary, lengths within the chunk, the batch and
  the capacity of the cache. JAX would otherwise clamp or drop silently."""
  check_tokens(tokens, cfg)
  B, S = tokens.shape
  lengths = np.asarray(lengths)
  if lengths.shape != (B,):
    raise ValueError(f"lengths must have shape [batch]=({B},); got {lengths.shape}.")
  if (lengths < 0).any() or (lengths > S).any():
    raise ValueError(f"lengths {lengths.tolist()} must lie in [0, {S}] (the chunk length).")
  cache_b = cache["length"].shape[0]
  if B != cache_b:
    raise ValueError(f"batch of {B} sequences does not match the cache's batch of {cache_b}; build the cache "
                     f"with init_cache(cfg, batch_size={B}, ...).")
  used = np.asarray(jax.device_get(cache["length"]))
  cap = int(jax.device_get(cache["max_seq_len"]))
  over = np.nonzero(used + lengths > cap)[0]
  if over.size:
    b = int(over[0])
    raise ValueError(f"sequence {b}: {int(used[b])} cached + {int(lengths[b])} new tokens exceed the cache's "
                     f"max_seq_len={cap}; build a larger cache (init_cache(..., max_seq_len=...)).")


def prefill(params: dict, cfg: ModelConfig, tokens, lengths, cache: dict):
  """Appends prompts (or a chunk of them) to the cache: tokens [B,S] right-padded, lengths [B].

  Returns (logits [B,V] at each row's last token, cache). The input cache is donated (invalid afterwards).
  """
  tokens = np.asarray(tokens) if not isinstance(tokens, jax.Array) else tokens
  check_append(cfg, tokens, lengths, cache)
  return _step_jit(params, cfg, jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32), cache)


def decode_step(params: dict, cfg: ModelConfig, next_tokens, cache: dict):
  """One token per sequence: next_tokens [B] -> (logits [B,V], cache). Unchecked hot path: the caller
  (e.g. `generate`) guarantees ids and capacity."""
  next_tokens = jnp.asarray(next_tokens, jnp.int32)
  ones = jnp.ones(next_tokens.shape, jnp.int32)
  return _step_jit(params, cfg, next_tokens[:, None], ones, cache)
