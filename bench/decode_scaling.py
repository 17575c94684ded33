"""Decode step time against context length: the sparse model against a dense-mask baseline, same process;
and against the cache's capacity at a fixed live context.

    python bench/decode_scaling.py [--max_len=65536] [--repeats=5] [--live=1024] [--max_capacity=65536]

Both run the same small model (Flash's attention shape: 512-d shared KV, window 128, CSA top-k over 4x
entries, HCA over 128x entries, at toy width) through `decode_step` on a cache holding L tokens (filled with
random entries: step time does not depend on their values).
- sparse: our attention. Per token it gathers window + top-k (CSA) or window + L/128 entries (HCA); only
  the indexer scan over L/4 keys grows with L.
- dense:  the same layers, but every layer keeps the raw KV of all L tokens and computes the full row of
  scores (all L positions + all compressed entries), masking everything outside the sparse selection
  (how a dense-mask implementation applies the CSA/HCA pattern). Same outputs, O(L) main attention.
The two must agree numerically (checked at the smallest L); the table shows how their costs grow.

The second table holds the live context at --live tokens and grows the cache's capacity: the step reads
the stores only up to the live bucket (dsv4_jax/cache.py), so its time must stay flat (target: the
64K-capacity step within 1.3x of the 2K one).
"""
import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dsv4_jax import (attention, compressor, indexer, inference, init_cache, init_params, kv_format, load_config,  # noqa: E402
                      ops)
from dsv4_jax.cache import live_bucket  # noqa: E402
from dsv4_jax.kv_format import Store  # noqa: E402
from dsv4_jax.rope import rope_angles  # noqa: E402

F32 = jnp.float32


def bench_config():
  return dataclasses.replace(
      load_config("tiny"), name="bench", dim=256, n_heads=8, head_dim=512, rope_head_dim=64, q_lora_rank=128,
      o_groups=2, o_lora_rank=128, window_size=128, index_n_heads=16, index_head_dim=128, index_topk=512,
      compress_ratios=(0, 4, 128, 4, 128, 0), n_layers=5, n_hash_layers=1, moe_inter_dim=128,
      dtype="float32", original_seq_len=65536)


def dense_attention(p, cfg, ratio, x, positions, lengths, cache):
  """The dense-mask baseline for one decode token: full scores over every raw position and every compressed
  entry, masked to the sparse selection (window + indexer top-k or all visible HCA entries)."""
  B, S, _ = x.shape
  start = positions[:, 0]
  cos, sin = rope_angles(cfg, ratio > 0, positions)
  q, qr = attention.project_q(p, cfg, x, cos, sin)
  kv = attention.project_kv(p, cfg, x, cos, sin)
  raw = cache._get(cache.tree["dense_kv"])
  raw = jax.vmap(lambda d, s, v: jax.lax.dynamic_update_slice_in_dim(d, v, s, 0))(raw, start, kv)
  cache = dataclasses.replace(cache, tree=dict(cache.tree, dense_kv=cache._set(cache.tree["dense_kv"], raw)))
  L = raw.shape[1]
  pos = jnp.arange(L)
  mask = (pos <= positions[..., None]) & (pos > positions[..., None] - cfg.window_size)      # [B,S,L]
  rows, masks = [raw], [mask]
  if ratio:
    cache = attention._append(cache, "comp", p["compressor"], cfg, x, ratio, start, lengths, False)
    comp = cache.rows("comp", ratio).all(x.dtype)
    C = comp.shape[1]
    if ratio == indexer.CSA_RATIO:
      cache = attention._append(cache, "idx", p["indexer"]["compressor"], cfg, x, ratio, start, lengths, True)
      qI, w = indexer.index_queries(p["indexer"], cfg, x, qr, cos, sin)
      sel = ops.indexer_topk(cfg, qI, w, cache.rows("idx", ratio), compressor.visible_count(positions, ratio),
                             cfg.index_topk)
      cmask = jnp.any(sel[..., None] == jnp.arange(C), axis=-2)                               # [B,S,C]
    else:
      cmask = jnp.arange(C) < compressor.visible_count(positions, ratio)[..., None]
    rows.append(comp)
    masks.append(cmask)
  keys, mask = jnp.concatenate(rows, 1), jnp.concatenate(masks, -1)
  z = jnp.einsum("bshk,btk->bsht", q, keys, preferred_element_type=F32) * cfg.softmax_scale
  z = jnp.where(mask[:, :, None, :], z, -jnp.inf)
  m = jnp.max(z, -1, keepdims=True)
  e = jnp.exp(z - m)
  denom = jnp.sum(e, -1, keepdims=True) + jnp.exp(p["attn_sink"].astype(F32)[:, None] - m)
  o = (jnp.einsum("bsht,btk->bshk", e.astype(q.dtype), keys, preferred_element_type=F32) / denom).astype(q.dtype)
  W = cfg.window_size
  cache = cache.write("win", jnp.where(lengths[:, None] > 0, (start[:, None]) % W, W), kv)
  return attention.output_projection(p, cfg, o, cos, sin), cache


def filled_cache(cfg, L, key, dense, capacity=None):
  """A cache of `capacity` (default L + 64) holding L random tokens' worth of entries (length = L)."""
  cache = init_cache(cfg, 1, capacity or L + 64)
  leaves, tree = jax.tree.flatten(cache, is_leaf=lambda x: isinstance(x, Store))
  keys = jax.random.split(key, len(leaves))

  def fill(k, x):
    if isinstance(x, Store):
      values = jax.random.normal(k, x.words.shape[:-2] + (x.n_rows, x.layout.width), F32)
      return kv_format.from_rows(x.layout.encode(values), x.layout, x.planes)
    return jax.random.normal(k, x.shape, x.dtype) if x.ndim >= 3 else x
  cache = jax.tree.unflatten(tree, [fill(k, x) for k, x in zip(keys, leaves)])
  cache["length"] = jnp.full((1,), L, jnp.int32)
  if dense:
    W, p = cfg.window_size, jnp.arange(max(0, L - cfg.window_size), L)

    def add(c):   # all L raw entries; the last W equal the ring's, so both paths see the same window
      win = c["win"].decode(F32)
      dense = jax.random.normal(key, win.shape[:-2] + (L + 64, cfg.head_dim), F32)
      return dict(c, dense_kv=dense.at[..., p, :].set(win[..., p % W, :]))
    cache["layers"] = jax.tree.map(add, cache["layers"], is_leaf=lambda c: isinstance(c, dict) and "win" in c)
  return cache


def time_steps(params, cfg, cache, tokens, repeats, live):
  step = jax.jit(inference.step, static_argnums=(1, 5), donate_argnums=4)
  ones = jnp.ones((1,), jnp.int32)
  logits, cache = step(params, cfg, tokens[:, :1], ones, cache, live)      # compile + warm up
  logits.block_until_ready()
  times = []
  for i in range(repeats):
    t0 = time.perf_counter()
    logits, cache = step(params, cfg, tokens[:, i + 1: i + 2], ones, cache, live)
    logits.block_until_ready()
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), logits


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--max_len", type=int, default=65536)
  ap.add_argument("--min_len", type=int, default=1024)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--live", type=int, default=1024)
  ap.add_argument("--max_capacity", type=int, default=65536)
  args = ap.parse_args()
  cfg = bench_config()
  params = init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (1, args.repeats + 2), 0, cfg.vocab_size)
  sparse_fn = attention.attention
  print(f"decode step, batch 1, config: D={cfg.dim} H={cfg.n_heads}x{cfg.head_dim} window={cfg.window_size} "
        f"top-k={cfg.index_topk} layers {cfg.compress_ratios[:cfg.n_layers]}; backend {jax.default_backend()}, "
        f"median of {args.repeats}")
  print(f"{'context L':>10} {'sparse ms':>10} {'dense ms':>10} {'dense/sparse':>12}")
  L, first = args.min_len, True
  while L <= args.max_len:
    key = jax.random.key(L)
    live = live_bucket(L + args.repeats + 2, L + 64)
    t_sparse, out_s = time_steps(params, cfg, filled_cache(cfg, L, key, dense=False), tokens, args.repeats, live)
    attention.attention = dense_attention
    try:
      t_dense, out_d = time_steps(params, cfg, filled_cache(cfg, L, key, dense=True), tokens, args.repeats, live)
    finally:
      attention.attention = sparse_fn
    if first:   # same model, same cache entries in window and compressed parts: same logits
      gap = float(jnp.max(jnp.abs(out_s - out_d)) / jnp.max(jnp.abs(out_s)))
      print(f"{'':>10} (dense and sparse logits agree to {gap:.1e} relative at L={L})")
      first = False
    print(f"{L:>10} {t_sparse * 1e3:>10.2f} {t_dense * 1e3:>10.2f} {t_dense / t_sparse:>11.2f}x")
    L *= 2

  print()
  print(f"fixed live context {args.live} tokens, growing cache capacity (sparse model, median of {args.repeats})")
  print(f"{'capacity':>10} {'live bucket':>12} {'step ms':>10} {'vs smallest':>12}")
  cap, base = 2 * args.live, None
  while cap <= args.max_capacity:
    live = live_bucket(args.live + args.repeats + 2, cap)
    t, _ = time_steps(params, cfg, filled_cache(cfg, args.live, jax.random.key(cap), dense=False, capacity=cap),
                      tokens, args.repeats, live)
    base = base or t
    print(f"{cap:>10} {live:>12} {t * 1e3:>10.2f} {t / base:>11.2f}x")
    cap *= 2


if __name__ == "__main__":
  main()
