"""Hybrid attention of DeepSeek-V4 (docs/architecture.md §2.5, §2.8, §2.9).

One shared 512-d KV head (MQA) with an attention sink per query head. Every query attends its
128-token sliding window; CSA layers add the top-k compressed entries the indexer picks, HCA layers
all visible compressed entries. Attention is gather-based: `sparse_attention` takes per-query int32
index lists into one KV array, never an L x L mask.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax import compressor, indexer, kv_format, quant
from dsv4_jax.config import ModelConfig
from dsv4_jax.linear import fp8_linear
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


def sparse_attention(q: jnp.ndarray, kv: jnp.ndarray, idx: jnp.ndarray, attn_sink: jnp.ndarray,
                     softmax_scale: float) -> jnp.ndarray:
  """Reference sparse MQA with an attention sink (the semantics of the reference's sparse_attn kernel).

  q:    [B, S, H, K]  queries (compute dtype)
  kv:   [B, N, K]     the one shared KV head; keys and values are the same vectors
  idx:  [B, S, T]     int32 rows of `kv` each query attends; -1 = masked
  attn_sink: [H]      fp32 logit of a value-less sink per head
  returns [B, S, H, K] in q.dtype.

  logits z = q.k * scale (fp32); p_j = exp(z_j - m) / (sum_j exp(z_j - m) + exp(sink - m)), m = max_j z_j;
  the unnormalised p is rounded to q.dtype before P.V (fp32 accumulate), as the reference kernel does.
  """
  valid = idx >= 0
  rows = jax.vmap(lambda kv_b, idx_b: kv_b[idx_b])(kv, jnp.where(valid, idx, 0))      # [B,S,T,K]
  z = jnp.einsum("bshk,bstk->bsht", q, rows, preferred_element_type=F32) * softmax_scale
  z = jnp.where(valid[:, :, None, :], z, -jnp.inf)
  m = jnp.max(z, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(z - m)
  denom = jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(attn_sink.astype(F32)[:, None] - m)
  o = jnp.einsum("bsht,bstk->bshk", e.astype(q.dtype), rows, preferred_element_type=F32)
  return (o / denom).astype(q.dtype)


def map_query_chunks(fn, chunk: int, per_query: tuple, shared: tuple = ()):
  """fn(*per_query, *shared) computed `chunk` queries at a time (lax.map), bounding the memory of what fn
  materialises per query (gathered KV rows, index scores). per_query arrays are [B, S, ...]; the result
  is [B, S, ...]."""
  B, S = per_query[0].shape[:2]
  if S <= chunk:
    return fn(*per_query, *shared)
  n = -(-S // chunk)
  pad = n * chunk - S

  def split(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), mode="edge")
    return jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)

  out = jax.lax.map(lambda xs: fn(*xs, *shared), tuple(split(x) for x in per_query))
  out = jnp.moveaxis(out, 0, 1)
  return out.reshape(B, n * chunk, *out.shape[3:])[:, :S]


def select_entries(cfg: ModelConfig, qI, w, positions, keys) -> jnp.ndarray:
  """Indexer top-k, chunked over queries: [B,S,k] entry ids (-1 = none)."""
  return map_query_chunks(
      lambda qI, w, pos, keys: indexer.select_topk(indexer.index_scores(qI, w, keys), pos, cfg.index_topk),
      cfg.query_chunk, (qI, w, positions), (keys,))


def attend(q, kv, idx, attn_sink, cfg: ModelConfig) -> jnp.ndarray:
  """`sparse_attention` chunked over queries."""
  return map_query_chunks(lambda q, idx, kv: sparse_attention(q, kv, idx, attn_sink, cfg.softmax_scale),
                          cfg.query_chunk, (q, idx), (kv,))


def window_indices(positions: jnp.ndarray, window: int) -> jnp.ndarray:
  """Rows of the raw-KV array holding the window of each query, for raw KV stored by position from 0.

  positions: [B,S] -> [B,S,window] int32 = positions - (window-1-j) (oldest first), -1 before position 0.
  """
  idx = positions[..., None] - (window - 1) + jnp.arange(window)
  return jnp.where(idx >= 0, idx, -1).astype(jnp.int32)


def hca_indices(positions: jnp.ndarray, n_entries: int, ratio: int) -> jnp.ndarray:
  """All compressed entries visible to each query: [B,S,n_entries] int32, -1 where not yet visible."""
  ids = jnp.arange(n_entries, dtype=jnp.int32)
  return jnp.where(ids < compressor.visible_count(positions, ratio)[..., None], ids, -1)


def project_qkv(p: dict, cfg: ModelConfig, x: jnp.ndarray, cos, sin):
  """x: [B,S,D] -> q [B,S,H,K], kv [B,S,K], qr [B,S,dc] (the query latent the indexer reuses)."""
  B, S, _ = x.shape
  qr = rms_norm(fp8_linear(x, p["wq_a"], cfg.quant_sim), p["q_norm"], cfg.norm_eps)
  q = fp8_linear(qr, p["wq_b"], cfg.quant_sim).reshape(B, S, cfg.n_heads, cfg.head_dim)
  q = head_rms_rescale(q, cfg.norm_eps)
  q = apply_rope(q, cos[:, :, None], sin[:, :, None])
  kv = rms_norm(fp8_linear(x, p["wkv"], cfg.quant_sim), p["kv_norm"], cfg.norm_eps)
  kv = apply_rope(kv, cos, sin)
  if cfg.quant_sim:
    kv = quant.kv_fp8_sim(kv, cfg.rope_head_dim)
  q = constrain(q, ("batch", "seq", "act_heads", None))
  return q, kv, qr


def output_projection(p: dict, cfg: ModelConfig, o: jnp.ndarray, cos, sin) -> jnp.ndarray:
  """De-rotate by the query position, then the grouped low-rank projection. o: [B,S,H,K] -> [B,S,D]."""
  B, S = o.shape[:2]
  g = cfg.o_groups
  o = apply_rope(o, cos[:, :, None], sin[:, :, None], inverse=True)
  o = o.reshape(B, S, g, -1)                                       # a group = H/g contiguous heads
  wo_a = dense(p["wo_a"], o.dtype).reshape(g, cfg.o_lora_rank, -1)
  o = jnp.einsum("bsgi,gri->bsgr", o, wo_a, preferred_element_type=F32).astype(o.dtype)
  return fp8_linear(o.reshape(B, S, g * cfg.o_lora_rank), p["wo_b"], cfg.quant_sim)


def attention(p: dict, cfg: ModelConfig, ratio: int, x: jnp.ndarray) -> jnp.ndarray:
  """Full-sequence attention (positions 0..S-1, no cache). x: [B,S,D] (attn_norm output) -> [B,S,D]."""
  B, S, _ = x.shape
  positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  cos, sin = rope_angles(cfg, ratio > 0, positions)
  q, kv, qr = project_qkv(p, cfg, x, cos, sin)
  idx = window_indices(positions, cfg.window_size)
  if ratio:
    entries = compressor.compress(p["compressor"], cfg, x, ratio)                   # [B,C,K]
    entries = constrain(entries, ("batch", "act_comp", None))
    if ratio == indexer.CSA_RATIO:
      keys = compressor.compress(p["indexer"]["compressor"], cfg, x, ratio, indexer=True)
      qI, w = indexer.index_queries(p["indexer"], cfg, x, qr, cos, sin)
      comp_idx = select_entries(cfg, qI, w, positions, keys)
    else:
      comp_idx = hca_indices(positions, entries.shape[1], ratio)
    kv = jnp.concatenate([kv, entries], axis=1)                                     # [B, S + C, K]
    idx = jnp.concatenate([idx, jnp.where(comp_idx >= 0, comp_idx + S, -1)], axis=-1)
  o = attend(q, kv, idx, p["attn_sink"], cfg)
  return output_projection(p, cfg, o, cos, sin)


# ---- cached inference: append S tokens per row at its own start position ----------------------------

def cached_window_indices(positions: jnp.ndarray, start: jnp.ndarray, window: int) -> jnp.ndarray:
  """Window rows of each query in concat([ring (W slots), this call's raw KV]).

  positions: [B,S], start: [B] -> [B,S,W] int32: positions >= start are this call's (row W + p - start),
  older ones sit in ring slot p mod W; -1 before position 0.
  """
  p = positions[..., None] - (window - 1) + jnp.arange(window)
  s = start[:, None, None]
  return jnp.where(p >= s, window + p - s, jnp.where(p >= 0, p % window, -1)).astype(jnp.int32)


def ring_update(win, kv: jnp.ndarray, start: jnp.ndarray, lengths: jnp.ndarray, rope_dim: int):
  """Writes the last min(lengths, W) new raw entries of each row to slots position mod W.
  win: [B,W,K] (in its storage format, dsv4_jax/kv_format.py), kv: [B,S,K] -> the updated ring."""
  W, S = jax.tree.leaves(win)[0].shape[1], kv.shape[1]
  i = jnp.arange(S)[None]
  keep = (i < lengths[:, None]) & (i >= lengths[:, None] - W)
  slot = jnp.where(keep, (start[:, None] + i) % W, W)
  return kv_format.write_rows(win, slot, kv, rope_dim)


def attention_step(p: dict, cfg: ModelConfig, ratio: int, x: jnp.ndarray, start: jnp.ndarray,
                   lengths: jnp.ndarray, cache: dict) -> tuple[jnp.ndarray, dict]:
  """Attention over the cache plus `lengths[b]` new tokens at positions start[b]...

  x: [B,S,D] (attn_norm output, rows right-padded); cache: this layer's cache (see dsv4_jax/cache.py).
  Returns ([B,S,D], updated layer cache). New compressed entries are written before attending, so an
  entry is visible to the token that completes it (docs/architecture.md §3.2).
  """
  B, S, _ = x.shape
  W = cfg.window_size
  positions = start[:, None] + jnp.arange(S, dtype=jnp.int32)
  cos, sin = rope_angles(cfg, ratio > 0, positions)
  q, kv, qr = project_qkv(p, cfg, x, cos, sin)
  rows = [kv_format.decode(cache["win"], kv.dtype), kv]
  idx = cached_window_indices(positions, start, W)
  new = dict(cache)
  if ratio:
    new["comp"], new["comp_state"] = compressor.append(p["compressor"], cfg, x, ratio, start, lengths,
                                                       cache["comp_state"], cache["comp"])
    if ratio == indexer.CSA_RATIO:
      new["idx"], new["idx_state"] = compressor.append(p["indexer"]["compressor"], cfg, x, ratio, start,
                                                       lengths, cache["idx_state"], cache["idx"], indexer=True)
      qI, w = indexer.index_queries(p["indexer"], cfg, x, qr, cos, sin)
      comp_idx = select_entries(cfg, qI, w, positions, kv_format.decode(new["idx"], qI.dtype))
    else:
      comp_idx = hca_indices(positions, jax.tree.leaves(new["comp"])[0].shape[1], ratio)
    rows.append(kv_format.decode(new["comp"], kv.dtype))
    idx = jnp.concatenate([idx, jnp.where(comp_idx >= 0, comp_idx + W + S, -1)], axis=-1)
  o = attend(q, jnp.concatenate(rows, axis=1), idx, p["attn_sink"], cfg)
  new["win"] = ring_update(cache["win"], kv, start, lengths, cfg.rope_head_dim)
  return output_projection(p, cfg, o, cos, sin), new
