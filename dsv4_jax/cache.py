"""The inference cache (docs/architecture.md §3): separate stores per layer kind, in the layout the kernels
read, updated in place.

Per layer, by type (stores are `kv_format.Store`s: rows of uint32 words, see dsv4_jax/kv_format.py):
    win        [B, W+r, words]     ring of the last W+r raw KV entries, slot = position mod (W+r) (every layer)
    comp       [B, N/m, words]     compressed KV entries, entry i at row i                      (CSA, HCA)
    comp_state {C, Z: [B, R, coff*K] fp32}
                                   ring of the compressor's per-token projections, R = 2m+r (CSA) or
                                   m+r (HCA) (compressor.state_rows)
    idx        [B, N/4/P, P*words] the indexer's compressed keys, P rows per lane-dense line      (CSA)
                                   (kv_format.lane_pack: e.g. bf16 keys of 128 values, P = 2)
    idx_state  like comp_state, for the indexer's compressor                                     (CSA)
and `length [B]`: tokens already in the cache for each row; `max_seq_len []`: its capacity N. Which slots
and entries are valid follows from `length` alone: rows past it are never read, so setting `length` back
by up to r = `rollback` tokens (speculative verification) undoes those tokens exactly. The layer caches
mirror the parameter tree (prefix / stack with a leading [reps] axis / suffix). With `mtp`, the cache also
holds `mtp`: the MTP blocks' window caches (one layer cache each) and `mtp_length [B]`, the positions the
MTP block has consumed (dsv4_jax/speculative.py).

In place: the step carries the whole cache through its layer loop (`lax.scan` carry, donated by the jitted
entry points); a layer writes only its new rows (scatter at [rep, b, row]) and reads only what the math
needs through `LayerCache` (window ring, the chosen compressed rows, the first `live` rows of a store), so a
decode step never copies a store whole. Every leaf has logical axes (`cache_axes`) in the one rules table.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax import compressor, indexer, kv_format, ops
from dsv4_jax.config import ModelConfig
from dsv4_jax.kv_format import Layout, Store
from dsv4_jax.ops import Rows
from dsv4_jax.transformer import layer_plan

F32 = jnp.float32
STORAGE_DTYPES = ("bfloat16", "float32", "paper")
MIN_LIVE = 1024           # smallest live bucket (tokens) of the decode step; buckets double from here


def layouts(cfg: ModelConfig, storage: str) -> tuple[Layout, Layout]:
  """(main entries, indexer keys) layouts of a storage choice."""
  if storage == "paper":     # RoPE dims in the compute dtype: bf16 as in the paper for bf16 models, fp32 in fp32
    return (Layout("fp8", cfg.head_dim, cfg.rope_head_dim, cfg.dtype), Layout("fp4", cfg.index_head_dim))
  return Layout(storage, cfg.head_dim), Layout(storage, cfg.index_head_dim)


def _layer_cache(cfg: ModelConfig, ratio: int, B: int, max_seq_len: int, storage: str, reps: int | None,
                 rollback: int) -> dict:
  """One layer's empty cache (with a leading [reps] axis for scanned layers)."""
  lead = (B,) if reps is None else (reps, B)
  main, idx = layouts(cfg, storage)
  out = {"win": kv_format.empty(lead, cfg.window_size + rollback, main)}
  rows = max(1, max_seq_len // ratio) if ratio else 0   # >= 1 row, so a cache shorter than m still reads
  if ratio:
    out["comp"] = kv_format.empty(lead, rows, main)
    out["comp_state"] = compressor.empty_state(ratio, cfg.head_dim, lead, rollback)
  if ratio == indexer.CSA_RATIO:
    out["idx"] = kv_format.empty(lead, rows, idx, kv_format.lane_pack(idx))
    out["idx_state"] = compressor.empty_state(ratio, cfg.index_head_dim, lead, rollback)
  return out


def storage_name(cfg: ModelConfig, dtype=None) -> str:
  storage = dtype if dtype == "paper" else str(jnp.dtype(dtype or cfg.dtype))
  if storage not in STORAGE_DTYPES:
    raise ValueError(f"cache dtype {storage!r} is not supported; expected one of {STORAGE_DTYPES}.")
  return storage


def init_cache(cfg: ModelConfig, batch_size: int, max_seq_len: int, dtype=None, mesh=None, rollback: int = 0,
               mtp: bool = False) -> dict:
  """An empty cache for `batch_size` sequences of up to `max_seq_len` tokens.

  `rollback`: how many of the latest tokens a caller may later discard by setting `length` back (the draft
  count of speculative decoding); the window and compressor rings grow by that many rows. `mtp`: also
  hold the MTP blocks' caches (speculative decoding drafts with them).

  `dtype`: storage of KV entries: "bfloat16", "float32" (default: the compute dtype), or "paper" (fp8 e4m3
  non-RoPE dims with per-64 power-of-two scales + RoPE dims in the compute dtype; fp4 indexer keys with
  per-32 scales; see dsv4_jax/kv_format.py). Compressor states are fp32 in every case. With `mesh` (or
  under `sharding.use_mesh`), every leaf is placed by its logical axes (`cache_axes`).
  """
  storage = storage_name(cfg, dtype)
  if batch_size < 1 or max_seq_len < 1 or rollback < 0:
    raise ValueError(f"init_cache: batch_size={batch_size} and max_seq_len={max_seq_len} must be >= 1 and "
                     f"rollback={rollback} >= 0.")
  if mtp and not cfg.n_mtp_layers:
    raise ValueError(f"init_cache(mtp=True): config {cfg.name!r} has no MTP block (n_mtp_layers=0).")
  if storage == "paper" and (cfg.nope_head_dim % 64 or cfg.index_head_dim % 32):
    raise ValueError(f"the paper's cache format needs head_dim - rope_head_dim ({cfg.nope_head_dim}) divisible "
                     f"by 64 and index_head_dim ({cfg.index_head_dim}) by 32.")
  plan = layer_plan(cfg)

  def layer(i, reps=None):
    return _layer_cache(cfg, cfg.layer_ratio(i), batch_size, max_seq_len, storage, reps, rollback)

  cache = {
      "length": jnp.zeros((batch_size,), jnp.int32),
      "max_seq_len": jnp.asarray(max_seq_len, jnp.int32),
      "layers": {
          "prefix": [layer(i) for i in plan.prefix],
          "stack": [layer(i, plan.reps) for i in plan.period],
          "suffix": [layer(i) for i in plan.suffix],
      },
  }
  if mtp:
    cache["mtp"] = [layer(cfg.n_layers + j) for j in range(cfg.n_mtp_layers)]
    cache["mtp_length"] = jnp.zeros((batch_size,), jnp.int32)
  from dsv4_jax import sharding
  if mesh is not None or sharding.active_mesh()[0] is not None:
    shardings = jax.tree.map(lambda axes: sharding.logical_sharding(axes, mesh), cache_axes(cache),
                             is_leaf=lambda x: isinstance(x, tuple))
    cache = jax.device_put(cache, shardings)
  return cache


def cache_axes(cache: dict) -> dict:
  """Logical axes of every cache leaf (a tree of tuples shaped like the cache's leaves)."""
  def layer(c: dict, stacked: bool) -> dict:
    lead = ("layers",) if stacked else ()
    out = {}
    for name, v in c.items():
      if isinstance(v, Store):
        seq = "cache_window" if name == "win" else "cache_seq"
        out[name] = Store(lead + ("cache_batch", seq, None), v.layout, v.pack)
      else:
        out[name] = {k: lead + ("cache_batch", None, None) for k in v}
    return out

  layers = cache["layers"]
  out = {"length": ("cache_batch",), "max_seq_len": (),
         "layers": {"prefix": [layer(c, False) for c in layers["prefix"]],
                    "stack": [layer(c, True) for c in layers["stack"]],
                    "suffix": [layer(c, False) for c in layers["suffix"]]}}
  if "mtp" in cache:
    out["mtp"] = [layer(c, False) for c in cache["mtp"]]
    out["mtp_length"] = ("cache_batch",)
  return out


def live_bucket(n_tokens: int, capacity: int) -> int:
  """The static `live` bound a step compiles for: the smallest MIN_LIVE * 2^j >= n_tokens, capped at the
  capacity. Compressed stores are read up to live // m rows, so step cost follows the longest live
  sequence (within 2x), not the capacity; one executable per bucket."""
  b = MIN_LIVE
  while b < n_tokens:
    b *= 2
  return min(b, capacity)


@dataclasses.dataclass
class LayerCache:
  """One layer's stores inside the cache tree: `tree` is that layer's dict; for a scanned group its leaves
  have a leading [reps] axis and `rep` is this layer's index. `live`: tokens the reads cover (static).
  `cfg`: entries are encoded on write by `ops.encode_rows(cfg, ...)` (cfg.attn_impl's encoder); None: by
  `Layout.encode`. `fresh` (static): every row is empty and the call starts at position 0, so attention may
  take the prompt whole, context-parallel (dsv4_jax/context_parallel.py)."""
  tree: dict
  rep: jax.Array | None
  live: int
  cfg: ModelConfig | None = None
  fresh: bool = False

  def _get(self, x):
    return x if self.rep is None else jax.lax.dynamic_index_in_dim(x, self.rep, 0, keepdims=False)

  def _set(self, x, value):
    return value if self.rep is None else jax.lax.dynamic_update_index_in_dim(x, value, self.rep, 0)

  def state(self, name: str) -> dict:
    return {k: self._get(v) for k, v in self.tree[name].items()}

  def set_state(self, name: str, value: dict) -> "LayerCache":
    new = {k: self._set(self.tree[name][k], v) for k, v in value.items()}
    return dataclasses.replace(self, tree=dict(self.tree, **{name: new}))

  def rows(self, name: str, ratio: int = 1) -> Rows:
    """The first live // ratio rows of a store (the window ring: all W rows), read in place."""
    s: Store = self.tree[name]
    n = s.n_rows if name == "win" else max(1, min(s.n_rows, self.live // ratio))
    return Rows(s.words, s.layout, self.rep, n, s.pack)

  def window(self, dtype) -> jnp.ndarray:
    """The ring decoded: [B, W, K]."""
    s: Store = self.tree["win"]
    return s.layout.decode(kv_format.unpack(self._get(s.words), s.pack), dtype)

  def write(self, name: str, rows: jnp.ndarray, values: jnp.ndarray) -> "LayerCache":
    """Writes values [B, M, K] at rows [B, M] (rows out of range are dropped): a scatter of M rows (of a
    packed store: at line row // P, words from (row % P) * words)."""
    s: Store = self.tree[name]
    enc = s.layout.encode(values) if self.cfg is None else ops.encode_rows(self.cfg, values, s.layout)
    rows = jnp.where((rows >= 0) & (rows < s.n_rows), rows, s.n_rows)             # out of range (-1 too): dropped
    if s.pack > 1:
      words = _write_packed(s, self.rep, rows, enc)
    else:
      b = jnp.arange(rows.shape[0])[:, None]
      at = (b, rows) if self.rep is None else (self.rep, b, rows)
      words = s.words.at[at].set(enc, mode="drop")
    return dataclasses.replace(self, tree=dict(self.tree, **{name: Store(words, s.layout, s.pack)}))


def _write_packed(s: Store, rep, rows: jnp.ndarray, enc: jnp.ndarray) -> jnp.ndarray:
  """Row words enc [B, M, w] into a packed store at rows [B, M] (row N: dropped): one scatter whose
  window is a row's w contiguous words of its line, (line, word) = (row // P, (row % P) * w)."""
  B, M, w = enc.shape
  idx = [jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, M)), rows // s.pack,
         (rows % s.pack) * w]
  if rep is not None:
    idx = [jnp.broadcast_to(jnp.asarray(rep, jnp.int32), (B, M))] + idx
  idx = jnp.stack([i.astype(jnp.int32) for i in idx], -1).reshape(B * M, len(idx))
  lead = tuple(range(len(idx[0]) - 1))                                           # (rep,) batch, line
  dn = jax.lax.ScatterDimensionNumbers(update_window_dims=(1,), inserted_window_dims=lead,
                                       scatter_dims_to_operand_dims=lead + (len(lead),))
  return jax.lax.scatter(s.words, idx, enc.reshape(B * M, w), dn, indices_are_sorted=False,
                         unique_indices=False, mode=jax.lax.GatherScatterMode.FILL_OR_DROP)


def decoded(cache: dict, dtype=F32) -> dict:
  """The cache with every store decoded to values (for tests and inspection)."""
  return jax.tree.map(lambda x: x.decode(dtype) if isinstance(x, Store) else x, cache,
                      is_leaf=lambda x: isinstance(x, Store))


@dataclasses.dataclass(frozen=True)
class CacheSize:
  bytes_per_token: float      # grows with context: compressed entries and indexer keys, whole model
  bytes_per_sequence: float   # constant: windows of every layer (and MTP) and compressor states
  scale_bytes_per_token: float = 0.0    # quantisation scales and their padding to 32-bit words


def cache_size(cfg: ModelConfig, storage: str = "bfloat16") -> CacheSize:
  """KV-cache bytes of a config (docs/architecture.md §3.3, docs/performance.md).

  storage "bfloat16" / "float32": every KV entry in that dtype. "paper": the format of the report:
  448 fp8 e4m3 + 64 bf16 dims per main entry (scales: one e8m0 byte per 64 fp8 values, padded to a word),
  indexer keys in fp4 e2m1 (one e8m0 byte per 32 values).
  """
  if storage not in STORAGE_DTYPES:
    raise ValueError(f"storage {storage!r}: expected 'bfloat16', 'float32' or 'paper'.")
  main_l, idx_l = layouts(dataclasses.replace(cfg, dtype="bfloat16") if storage == "paper" else cfg, storage)
  main, idx = main_l.nbytes - main_l.scale_bytes, idx_l.nbytes - idx_l.scale_bytes
  per_tok = scale = per_seq = 0.0
  for i in range(cfg.n_total_layers):
    ratio = cfg.layer_ratio(i)
    per_seq += cfg.window_size * main_l.nbytes
    if ratio:
      per_tok += main / ratio
      scale += main_l.scale_bytes / ratio
      per_seq += sum(4 * np.prod(s) for s in compressor.state_shapes(ratio, cfg.head_dim).values())
    if ratio == indexer.CSA_RATIO:
      per_tok += idx / ratio
      scale += idx_l.scale_bytes / ratio
      per_seq += sum(4 * np.prod(s) for s in compressor.state_shapes(ratio, cfg.index_head_dim).values())
  return CacheSize(per_tok, per_seq, scale)
