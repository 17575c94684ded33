"""The inference cache (docs/architecture.md §3), one sequence position per batch row.

Per layer, by type:
    win        [B, W, K]       ring of the last W raw KV entries, slot = position mod W       (every layer)
    comp       [B, N/m, K]     compressed KV entries, entry i at row i                        (CSA, HCA)
    comp_state {tail_C, tail_Z (, prev_C, prev_Z): [B, m, coff*K] fp32}
                               projections of the current incomplete window (slot = pos mod m) and,
                               for CSA, of the last complete one (its first-half channels feed the next entry)
    idx        [B, N/4, cI]    the indexer's compressed keys                                   (CSA)
    idx_state  like comp_state, for the indexer's compressor                                    (CSA)
and `length [B]`: tokens already in the cache for each row, `max_seq_len []`: its capacity. Which slots and
entries are valid follows from `length`. The cache mirrors the parameter tree's layer layout
(prefix / stack with a leading [reps] axis / suffix), so the scanned layers scan over their caches too.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from dsv4_jax import compressor, indexer, kv_format
from dsv4_jax.config import ModelConfig
from dsv4_jax.transformer import layer_plan

F32 = jnp.float32
STORAGE_DTYPES = ("bfloat16", "float32", "paper")


def _state_shapes(ratio: int, c: int) -> dict:
  """Per sequence: the incomplete window's projections; with overlap (CSA) also the last complete window's."""
  overlap = compressor.overlaps(ratio)
  names = ("tail_C", "tail_Z", "prev_C", "prev_Z") if overlap else ("tail_C", "tail_Z")
  return {k: (ratio, (2 if overlap else 1) * c) for k in names}


def _layer_cache(cfg: ModelConfig, ratio: int, B: int, max_seq_len: int, storage: str, reps: int | None) -> dict:
  """One layer's empty cache (with a leading [reps] axis for scanned layers)."""
  lead = (B,) if reps is None else (reps, B)
  dense = cfg.dtype if storage == "paper" else storage        # paper: RoPE dims in the compute dtype
  main_fmt, idx_fmt = ("fp8", "fp4") if storage == "paper" else ("dense", "dense")
  K, r = cfg.head_dim, cfg.rope_head_dim

  def entries(n, width, fmt):
    return kv_format.empty(lead + (n, width), fmt, dense, r)

  def state(c):
    out = {k: jnp.zeros(lead + s, F32) for k, s in _state_shapes(ratio, c).items()}
    for k in ("tail_Z", "prev_Z"):
      if k in out:
        out[k] = jnp.full(out[k].shape, -jnp.inf, F32)       # softmax weight 0 for "no token yet"
    return out

  out = {"win": entries(cfg.window_size, K, main_fmt)}
  if ratio:
    out["comp"] = entries(max_seq_len // ratio, K, main_fmt)
    out["comp_state"] = state(K)
  if ratio == indexer.CSA_RATIO:
    out["idx"] = entries(max_seq_len // ratio, cfg.index_head_dim, idx_fmt)
    out["idx_state"] = state(cfg.index_head_dim)
  return out


def init_cache(cfg: ModelConfig, batch_size: int, max_seq_len: int, dtype=None) -> dict:
  """An empty cache for `batch_size` sequences of up to `max_seq_len` tokens.

  `dtype`: storage of KV entries: "bfloat16", "float32" (default: the compute dtype), or "paper" (fp8 e4m3
  non-RoPE dims with per-64 power-of-two scales + bf16 RoPE dims; fp4 indexer keys with per-32 scales;
  see dsv4_jax/kv_format.py). Compressor states are fp32 in every case.
  """
  storage = dtype if dtype == "paper" else str(jnp.dtype(dtype or cfg.dtype))   # "paper" keeps RoPE dims in
  # the compute dtype: bf16 as in the paper for bf16 models, fp32 in fp32 test runs (so it stays lossless)
  if storage not in STORAGE_DTYPES:
    raise ValueError(f"cache dtype {storage!r} is not supported; expected one of {STORAGE_DTYPES}.")
  if batch_size < 1 or max_seq_len < 1:
    raise ValueError(f"init_cache: batch_size={batch_size} and max_seq_len={max_seq_len} must be >= 1.")
  if storage == "paper" and (cfg.nope_head_dim % 64 or cfg.index_head_dim % 32):
    raise ValueError(f"the paper's cache format needs head_dim - rope_head_dim ({cfg.nope_head_dim}) divisible "
                     f"by 64 and index_head_dim ({cfg.index_head_dim}) by 32.")
  plan = layer_plan(cfg)

  def layer(i, reps=None):
    return _layer_cache(cfg, cfg.layer_ratio(i), batch_size, max_seq_len, storage, reps)

  return {
      "length": jnp.zeros((batch_size,), jnp.int32),
      "max_seq_len": jnp.asarray(max_seq_len, jnp.int32),
      "layers": {
          "prefix": [layer(i) for i in plan.prefix],
          "stack": [layer(i, plan.reps) for i in plan.period],
          "suffix": [layer(i) for i in plan.suffix],
      },
  }


@dataclasses.dataclass(frozen=True)
class CacheSize:
  bytes_per_token: float      # grows with context: compressed entries and indexer keys, whole model
  bytes_per_sequence: float   # constant: windows of every layer (and MTP) and compressor states
  scale_bytes_per_token: float = 0.0


def cache_size(cfg: ModelConfig, storage: str = "bfloat16") -> CacheSize:
  """KV-cache bytes of a config (docs/architecture.md §3.3, docs/performance.md).

  storage "bfloat16" / "float32": every KV entry in that dtype. "paper": the format of the report:
  448 fp8 e4m3 + 64 bf16 dims per main entry (scales: one e8m0 byte per 64 fp8 values), indexer keys in
  fp4 e2m1 (one e8m0 byte per 32 values).
  """
  K, r, cI = cfg.head_dim, cfg.rope_head_dim, cfg.index_head_dim
  if storage in ("bfloat16", "float32"):
    b = 2 if storage == "bfloat16" else 4
    main, idx, main_scale, idx_scale = K * b, cI * b, 0.0, 0.0
  elif storage == "paper":
    main, idx = (K - r) * 1 + r * 2, cI / 2
    main_scale, idx_scale = (K - r) / 64, cI / 32
  else:
    raise ValueError(f"storage {storage!r}: expected 'bfloat16', 'float32' or 'paper'.")
  per_tok = scale = 0.0
  per_seq = 0.0
  for i in range(cfg.n_total_layers):
    ratio = cfg.layer_ratio(i)
    per_seq += cfg.window_size * main
    if ratio:
      per_tok += main / ratio
      scale += main_scale / ratio
      per_seq += sum(4 * np.prod(s) for s in _state_shapes(ratio, K).values())
    if ratio == indexer.CSA_RATIO:
      per_tok += idx / ratio
      scale += idx_scale / ratio
      per_seq += sum(4 * np.prod(s) for s in _state_shapes(ratio, cI).values())
  return CacheSize(per_tok, per_seq, scale)
