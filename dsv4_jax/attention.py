"""Hybrid attention of DeepSeek-V4 (docs/architecture.md §2.5, §2.8, §2.9).

One shared 512-d KV head (MQA) with an attention sink per query head. Every query attends its
128-token sliding window; CSA layers add the top-k compressed entries the indexer picks, HCA layers
all visible compressed entries. Attention is gather-based (`ops.sparse_attention`: per-query int32 index
lists into the KV rows, never an L x L mask).

One path for the whole sequence (`forward`) and for the cache (prefill chunks, decode): the same
compressor (`compressor.compress_chunk`), indexer top-k and sparse attention ops; only where the rows
come from differs (this call's KV and entries, or the cache's ring and stores). Queries run
`cfg.query_chunk` at a time, so what a query materialises (its gathered rows, its indexer scores over
one key block at a time) is bounded whatever S is.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax import compressor, context_parallel, indexer, ops, quant
from dsv4_jax.config import ModelConfig
from dsv4_jax.linear import fp8_linear, pad_seq_rows
from dsv4_jax.norm import head_rms_rescale, rms_norm
from dsv4_jax.params import ParamSpec
from dsv4_jax.qarray import dense
from dsv4_jax.rope import apply_rope, rope_angles
from dsv4_jax.sharding import constrain

F32 = jnp.float32


def attention_specs(cfg: ModelConfig, ratio: int) -> dict:
  H, K, D, g, dg = cfg.n_heads, cfg.head_dim, cfg.dim, cfg.o_groups, cfg.o_lora_rank
  specs = {
      "wq_a": ParamSpec((cfg.q_lora_rank, D), ("q_lora", "embed")),
      "q_norm": ParamSpec((cfg.q_lora_rank,), ("q_lora",), "f32", ("normal_plus_one", 0.1)),
      "wq_b": ParamSpec((H * K, cfg.q_lora_rank), ("heads", "q_lora")),
      "wkv": ParamSpec((K, D), ("kv", "embed")),
      "kv_norm": ParamSpec((K,), ("kv",), "f32", ("normal_plus_one", 0.1)),
      "wo_a": ParamSpec((g * dg, H * K // g), ("o_groups", "head_dim")),
      "wo_b": ParamSpec((D, g * dg), ("embed", "o_groups")),
      "attn_sink": ParamSpec((H,), ("heads",), "f32", ("normal", 1.0)),
  }
  if ratio:
    specs["compressor"] = compressor.compressor_specs(cfg, ratio, K)
  if ratio == indexer.CSA_RATIO:
    specs["indexer"] = indexer.indexer_specs(cfg)
  return specs


def project_q(p: dict, cfg: ModelConfig, x: jnp.ndarray, cos, sin):
  """x: [B,S,D] -> q [B,S,H,K], qr [B,S,dc] (the query latent the indexer reuses)."""
  B, S, _ = x.shape
  qr = rms_norm(fp8_linear(x, p["wq_a"], cfg.quant_sim), p["q_norm"], cfg.norm_eps)
  q = fp8_linear(qr, p["wq_b"], cfg.quant_sim).reshape(B, S, cfg.n_heads, cfg.head_dim)
  q = head_rms_rescale(q, cfg.norm_eps)
  q = apply_rope(q, cos[:, :, None], sin[:, :, None])
  return constrain(q, ("batch", "seq", "act_heads", None)), qr


def project_kv(p: dict, cfg: ModelConfig, x: jnp.ndarray, cos, sin) -> jnp.ndarray:
  """x: [B,S,D] -> the shared KV head [B,S,K] (normalised, rotated, fp8-simulated under quant_sim)."""
  kv = rms_norm(fp8_linear(x, p["wkv"], cfg.quant_sim), p["kv_norm"], cfg.norm_eps)
  kv = apply_rope(kv, cos, sin)
  if cfg.quant_sim:
    kv = quant.kv_fp8_sim(kv, cfg.rope_head_dim)
  return kv


def output_projection(p: dict, cfg: ModelConfig, o: jnp.ndarray, cos, sin) -> jnp.ndarray:
  """De-rotate by the query position, then the grouped low-rank projection. o: [B,S,H,K] -> [B,S,D]."""
  B, S = o.shape[:2]
  g = cfg.o_groups
  o = apply_rope(o, cos[:, :, None], sin[:, :, None], inverse=True)
  o = o.reshape(B, S, g, -1)                                       # a group = H/g contiguous heads
  wo_a = dense(p["wo_a"], o.dtype).reshape(g, cfg.o_lora_rank, -1)
  o, S_in = pad_seq_rows(o)
  o = jnp.einsum("bsgi,gri->bsgr", o, wo_a, preferred_element_type=F32).astype(o.dtype)
  return fp8_linear(o.reshape(B, o.shape[1], g * cfg.o_lora_rank), p["wo_b"], cfg.quant_sim)[:, :S_in]


def map_query_chunks(fn, chunk: int, per_query: tuple):
  """fn(*per_query) computed `chunk` queries at a time (lax.map), bounding what fn materialises per query.
  per_query arrays are [B, S, ...]; the result is [B, S, ...]."""
  B, S = per_query[0].shape[:2]
  if S <= chunk:
    return fn(*per_query)
  n = -(-S // chunk)
  pad = n * chunk - S

  def split(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), mode="edge")
    return jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)

  out = jax.lax.map(lambda xs: fn(*xs), tuple(split(x) for x in per_query))
  out = jnp.moveaxis(out, 0, 1)
  return out.reshape(B, n * chunk, *out.shape[3:])[:, :S]


def window_indices(positions: jnp.ndarray, start: jnp.ndarray, window: int, ring: int) -> jnp.ndarray:
  """Window rows of each query in concat([ring (`ring` slots: 0, or W plus the cache's rollback rows), this
  call's raw KV]).

  positions: [B,S], start: [B] (position of the call's first token) -> [B,S,W] int32 (oldest first):
  positions >= start are this call's (row ring + p - start), older ones sit in ring slot p mod ring; -1
  before position 0.
  """
  p = positions[..., None] - (window - 1) + jnp.arange(window)
  s = start[:, None, None]
  return jnp.where(p >= s, ring + p - s, jnp.where(p >= 0, p % max(ring, 1), -1)).astype(jnp.int32)


def attend(p: dict, cfg: ModelConfig, ratio: int, x: jnp.ndarray, positions: jnp.ndarray, start: jnp.ndarray,
           ring: int, window: ops.Rows, comp: ops.Rows | None, keys: ops.Rows | None) -> jnp.ndarray:
  """Queries of x [B,Q,D] at `positions` [B,Q] attend their window, plus (CSA) the indexer's top-k of
  `comp` or (HCA) every visible row of `comp` -> [B,Q,D]."""
  cos, sin = rope_angles(cfg, ratio > 0, positions)
  q, qr = project_q(p, cfg, x, cos, sin)
  widx = window_indices(positions, start, cfg.window_size, ring)
  comp_idx = comp_visible = None
  if ratio == indexer.CSA_RATIO:
    qI, w = indexer.index_queries(p["indexer"], cfg, x, qr, cos, sin)
    comp_idx = ops.indexer_topk(cfg, qI, w, keys, compressor.visible_count(positions, ratio), cfg.index_topk)
  elif ratio:
    comp_visible = compressor.visible_count(positions, ratio)
  o = ops.sparse_attention(cfg, q, p["attn_sink"], window, widx, comp, comp_idx, comp_visible)
  return output_projection(p, cfg, o, cos, sin)


def _append(cache, name: str, p: dict, cfg: ModelConfig, x, ratio: int, start, lengths, is_indexer: bool):
  """Feeds this call's tokens to a compressor and writes the entries they complete into store `name`."""
  E, ids, n_done, state = compressor.compress_chunk(p, cfg, x, ratio, start, lengths, cache.state(name + "_state"),
                                                    is_indexer)
  rows = jnp.where(ids < n_done[:, None], ids, jnp.iinfo(jnp.int32).max)         # partial windows: dropped
  return cache.write(name, rows, E).set_state(name + "_state", state)


def _context_parallel(p: dict, cfg: ModelConfig, ratio: int, x: jnp.ndarray, lengths, cache):
  """`attention` of a prompt from position 0 split over the mesh's `sequence` axis (context_parallel.py);
  with a (fresh, empty) cache, then stores what a chunked prefill would have left there: the ring's last
  tokens, the complete entries and the compressors' states."""
  names = [n for n, r in (("comp", ratio), ("idx", ratio == indexer.CSA_RATIO)) if r]
  ring = 0 if cache is None else cache.tree["win"].n_rows
  tail = max([ring] + [cache.state(n + "_state")["C"].shape[1] for n in names]) if cache is not None else 0
  out, comp, keys, tail_kv, tail_x = context_parallel.attention(p, cfg, ratio, x, lengths, tail)
  if cache is None:
    return out, None
  t = lengths[:, None] - tail + jnp.arange(tail, dtype=jnp.int32)                # the tails' positions
  cache = cache.write("win", jnp.where((t >= 0) & (t >= lengths[:, None] - ring), t % ring, ring), tail_kv)
  for name, pc, E in (("comp", p.get("compressor"), comp), ("idx", p.get("indexer", {}).get("compressor"), keys)):
    if E is None:
      continue
    ids = jnp.arange(E.shape[1], dtype=jnp.int32)[None]
    cache = cache.write(name, jnp.where(ids < (lengths // ratio)[:, None], ids, jnp.iinfo(jnp.int32).max), E)
    R = cache.state(name + "_state")["C"].shape[1]
    state = compressor.state_from_tokens(pc, tail_x, ratio, t, rollback=R - compressor.state_rows(ratio))
    cache = cache.set_state(name + "_state", state)
  return out, cache


def attention(p: dict, cfg: ModelConfig, ratio: int, x: jnp.ndarray, positions: jnp.ndarray | None = None,
              lengths: jnp.ndarray | None = None, cache=None):
  """Attention of x [B,S,D] (attn_norm output) -> ([B,S,D], cache).

  Without a cache: the whole sequence from position 0 (`forward`); entries come from compressing x.
  With a cache (`cache.LayerCache`): row b appends lengths[b] tokens at positions[b] = start[b] + arange(S)
  (rows right-padded); the entries those tokens complete are written to the stores before attending (an
  entry is visible to the token that completes it, docs/architecture.md §3.2), the window reads the ring
  plus this call's KV, and the ring takes the new KV last. A decode step (S = 1) on an implementation that
  reads stored rows (`ops.window_order` None: the Pallas kernels), with a ring that holds its KV exactly
  (`_ring_is_exact`), writes its KV into the ring first and reads the ring in place, as the reference's decode
  does (docs/architecture.md §3.2): its window rows are not decoded and encoded again for the kernel.
  On a mesh with a `sequence` axis, a whole sequence (no cache, or a `fresh` one: every row empty) runs
  context-parallel (dsv4_jax/context_parallel.py).
  """
  B, S, _ = x.shape
  if context_parallel.shards() > 1 and (cache is None or cache.fresh):
    return _context_parallel(p, cfg, ratio, x, lengths, cache)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  start = positions[:, 0]
  kv = project_kv(p, cfg, x, *rope_angles(cfg, ratio > 0, positions))
  comp = keys = None
  in_ring = False                                   # the window is the ring alone, already holding this call's KV
  if cache is None:
    ring, window = 0, ops.Rows(kv)
    if ratio:
      comp = ops.Rows(constrain(compressor.compress(p["compressor"], cfg, x, ratio), ("batch", "act_comp", None)))
    if ratio == indexer.CSA_RATIO:
      keys = ops.Rows(compressor.compress(p["indexer"]["compressor"], cfg, x, ratio, indexer=True))
  else:
    if ratio:
      cache = _append(cache, "comp", p["compressor"], cfg, x, ratio, start, lengths, False)
      comp = cache.rows("comp", ratio)
    if ratio == indexer.CSA_RATIO:
      cache = _append(cache, "idx", p["indexer"]["compressor"], cfg, x, ratio, start, lengths, True)
      keys = cache.rows("idx", ratio)
    ring = cache.tree["win"].n_rows                                                # W (+ rollback rows)
    order = ops.window_order(cfg, cache.tree["win"].layout)   # the order the implementation reads values in
    in_ring = S == 1 and order is None and _ring_is_exact(cfg, cache.tree["win"].layout)
    if in_ring:                 # the new row's slot held position start - ring, outside its window (W <= ring)
      cache = _write_window(cache, kv, start, lengths, ring)
      window = cache.rows("win")
    else:
      new = kv if order is None else order.to_planar(kv)
      window = ops.Rows(jnp.concatenate([cache.window(kv.dtype, order), new], axis=1), order=order)
  # window rows: concat(ring, this call's KV); or the ring alone, where no position counts as this call's
  w_start = start + S if in_ring else start
  out = map_query_chunks(lambda xc, pc: attend(p, cfg, ratio, xc, pc, w_start, ring, window, comp, keys),
                         cfg.query_chunk, (x, positions))
  if cache is not None and not in_ring:                                           # the ring takes the new KV last
    cache = _write_window(cache, kv, start, lengths, ring)
  return out, cache


def _ring_is_exact(cfg: ModelConfig, layout) -> bool:
  """Whether a KV row written to the ring reads back as `project_kv` made it (so reading a step's own row
  from the ring changes nothing): fp32 rows; bf16 rows of a bf16 model; the paper's fp8 rows under quant_sim
  (the KV is fp8-simulated with the storage's scales; RoPE dims kept in the compute dtype)."""
  return (layout.fmt == "float32" or (layout.fmt == "bfloat16" and cfg.dtype == "bfloat16")
          or (layout.fmt == "fp8" and cfg.quant_sim and layout.rope_dtype in ("float32", cfg.dtype)))


def _write_window(cache, kv, start, lengths, ring: int):
  """The last min(length, ring) of this call's KV rows [B,S,K] into the ring, at slot position % ring."""
  i = jnp.arange(kv.shape[1])[None]
  keep = (i < lengths[:, None]) & (i >= lengths[:, None] - ring)                   # the last min(len, ring) new
  return cache.write("win", jnp.where(keep, (start[:, None] + i) % ring, ring), kv)
