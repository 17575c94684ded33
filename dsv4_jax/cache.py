"""The inference cache (docs/architecture.md §3): separate stores per layer kind, in the layout the kernels
read, updated in place.

Per layer, by type (stores are `kv_format.Store`s: rows of uint32 words in lines of one geometry, see
dsv4_jax/kv_format.py; shapes below for whole rows, one a line):
    win        [B, W+r, words]     ring of the last W+r raw KV entries, slot = position mod ring rows (W+r,
                                   rounded up to whole lines and tiles of a lane-dense store) (every layer)
    comp       [B, N/m, words]     compressed KV entries, entry i at row i                      (CSA, HCA)
    comp_state {C, Z: [B, R, coff*K] fp32}
                                   ring of the compressor's per-token projections, R = 2m+r (CSA) or
                                   m+r (HCA) (compressor.state_rows)
    idx        [B, N/4, words]     the indexer's compressed keys                                (CSA)
    idx_state  like comp_state, for the indexer's compressor                                     (CSA)
By default indexer keys (fp4, bf16) are tiles (kv_format.key_tiles: a key's words down the lines, 128 keys
across the lanes, so a kernel scores 128 keys with one matmul) and every other store is lane-dense
(kv_format.lane_dense): the paper's fp8 entries as [values | scales] lines plus RoPE lines 4 to a line (the
Store's `tail`). `init_cache(lane_dense=False)` keeps main entries as whole rows.
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


def geometries(main: Layout, idx: Layout, lane_dense: bool) -> tuple[tuple, tuple]:
  """Store geometries of (main entries, indexer keys) in these layouts (kv_format.Plane tuples; () = whole
  rows, one a line). Indexer keys are tiles (kv_format.key_tiles: fp4 and bf16) or lane-dense either way."""
  return kv_format.lane_dense(main) if lane_dense else (), kv_format.key_tiles(idx) or kv_format.lane_dense(idx)


def _layer_cache(cfg: ModelConfig, ratio: int, B: int, max_seq_len: int, storage: str, reps: int | None,
                 rollback: int, lane_dense: bool) -> dict:
  """One layer's empty cache (with a leading [reps] axis for scanned layers)."""
  lead = (B,) if reps is None else (reps, B)
  main, idx = layouts(cfg, storage)
  gmain, gidx = geometries(main, idx, lane_dense)
  out = {"win": kv_format.empty(lead, cfg.window_size + rollback, main, gmain)}
  rows = max(1, max_seq_len // ratio) if ratio else 0   # >= 1 row, so a cache shorter than m still reads
  if ratio:
    out["comp"] = kv_format.empty(lead, rows, main, gmain)
    out["comp_state"] = compressor.empty_state(ratio, cfg.head_dim, lead, rollback)
  if ratio == indexer.CSA_RATIO:
    out["idx"] = kv_format.empty(lead, rows, idx, gidx)
    out["idx_state"] = compressor.empty_state(ratio, cfg.index_head_dim, lead, rollback)
  return out


def storage_name(cfg: ModelConfig, dtype=None) -> str:
  storage = dtype if dtype == "paper" else str(jnp.dtype(dtype or cfg.dtype))
  if storage not in STORAGE_DTYPES:
    raise ValueError(f"cache dtype {storage!r} is not supported; expected one of {STORAGE_DTYPES}.")
  return storage


def init_cache(cfg: ModelConfig, batch_size: int, max_seq_len: int, dtype=None, mesh=None, rollback: int = 0,
               mtp: bool = False, lane_dense: bool = True) -> dict:
  """An empty cache for `batch_size` sequences of up to `max_seq_len` tokens.

  `rollback`: how many of the latest tokens a caller may later discard by setting `length` back (the draft
  count of speculative decoding); the window and compressor rings grow by that many rows. `mtp`: also
  hold the MTP blocks' caches (speculative decoding drafts with them).

  `dtype`: storage of KV entries: "bfloat16", "float32" (default: the compute dtype), or "paper" (fp8 e4m3
  non-RoPE dims with per-64 power-of-two scales + RoPE dims in the compute dtype; fp4 indexer keys with
  per-32 scales; see dsv4_jax/kv_format.py). Compressor states are fp32 in every case. With `mesh` (or
  under `sharding.use_mesh`), every leaf is placed by its logical axes (`cache_axes`).

  `lane_dense`: the main entries' geometry (kv_format.py; indexer keys are lane-dense always). True: every
  array 128 words wide, what TPU needs (otherwise XLA relays the paper format's stores out whole on every
  decode step); both the XLA ops and the Pallas kernels read it. False: whole rows (the paper's 584 B per
  Flash entry instead of 640; a GPU reads a row as one pointer range either way).
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
    return _layer_cache(cfg, cfg.layer_ratio(i), batch_size, max_seq_len, storage, reps, rollback, lane_dense)

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
        axes = lead + ("cache_batch", seq, None)
        out[name] = Store(axes, v.layout, v.planes, None if v.tail is None else axes)
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
    return Rows.of(s, self.rep, n)

  def window(self, dtype, order: Layout | None = None) -> jnp.ndarray:
    """The ring decoded: [B, W, K] (dims in `order`'s planar order when given, ops.Rows)."""
    return Rows.of(self.tree["win"].map(self._get)).all(dtype, order)

  def write(self, name: str, rows: jnp.ndarray, values: jnp.ndarray) -> "LayerCache":
    """Writes values [B, M, K] at rows [B, M] (rows out of range are dropped): per plane, a scatter of M
    rows' words (at line row // P, from word (row % P) * w)."""
    s: Store = self.tree[name]
    enc = s.layout.encode(values) if self.cfg is None else ops.encode_rows(self.cfg, values, s.layout)
    rows = jnp.where((rows >= 0) & (rows < s.n_rows), rows, s.n_rows)             # out of range (-1 too): dropped
    new = [_write_plane(a, p, self.rep, rows, enc[..., p.lo: p.hi]) for a, p in zip(s.arrays, s.geometry)]
    out = dataclasses.replace(s, words=new[0], tail=new[1] if len(new) > 1 else None)
    return dataclasses.replace(self, tree=dict(self.tree, **{name: out}))


def _write_plane(lines: jnp.ndarray, plane: kv_format.Plane, rep, rows: jnp.ndarray, enc: jnp.ndarray):
  """A plane's words enc [B, M, w] of rows [B, M] (a row past the store: dropped) into its lines [(R,) B, L,
  line]: whole lines by an indexed set, else one scatter whose window is a row's w contiguous words of its
  line, (line, word) = (row // P, (row % P) * w); tiles (kv_format.Tiles): each word to its line, at the
  row's lane."""
  B, M, w = enc.shape
  if isinstance(plane, kv_format.Tiles):   # each word at its own line, the row's lane: a scatter of M * words
    idx = (jnp.arange(B)[:, None, None], plane.line_of(rows), (rows % kv_format.LANES)[..., None])
    return lines.at[idx if rep is None else (rep,) + idx].set(enc, mode="drop")
  if plane.pack == 1 and plane.line == w:
    b = jnp.arange(B)[:, None]
    return lines.at[(b, rows) if rep is None else (rep, b, rows)].set(enc, mode="drop")
  line = jnp.where(rows < plane.rows_in(lines.shape[-2]), rows // plane.pack, lines.shape[-2])
  idx = [jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, M)), line, (rows % plane.pack) * w]
  if rep is not None:
    idx = [jnp.broadcast_to(jnp.asarray(rep, jnp.int32), (B, M))] + idx
  idx = jnp.stack([i.astype(jnp.int32) for i in idx], -1).reshape(B * M, len(idx))
  lead = tuple(range(len(idx[0]) - 1))                                           # (rep,) batch, line
  dn = jax.lax.ScatterDimensionNumbers(update_window_dims=(1,), inserted_window_dims=lead,
                                       scatter_dims_to_operand_dims=lead + (len(lead),))
  return jax.lax.scatter(lines, idx, enc.reshape(B * M, w), dn, indices_are_sorted=False,
                         unique_indices=False, mode=jax.lax.GatherScatterMode.FILL_OR_DROP)


def decoded(cache: dict, dtype=F32) -> dict:
  """The cache with every store decoded to values (for tests and inspection)."""
  return jax.tree.map(lambda x: x.decode(dtype) if isinstance(x, Store) else x, cache,
                      is_leaf=lambda x: isinstance(x, Store))


@dataclasses.dataclass(frozen=True)
class CacheSize:
  bytes_per_token: float      # grows with context: compressed entries and indexer keys, whole model
  bytes_per_sequence: float   # constant: windows of every layer (and MTP) and compressor states
  scale_bytes_per_token: float = 0.0    # quantisation scales and padding (to 32-bit words, to lane-dense lines)


def cache_size(cfg: ModelConfig, storage: str = "bfloat16", lane_dense: bool = False) -> CacheSize:
  """KV-cache bytes of a config (docs/architecture.md §3.3, docs/performance.md).

  storage "bfloat16" / "float32": every KV entry in that dtype. "paper": the format of the report:
  448 fp8 e4m3 + 64 bf16 dims per main entry (scales: one e8m0 byte per 64 fp8 values, padded to a word),
  indexer keys in fp4 e2m1 (one e8m0 byte per 32 values). `lane_dense`: in that geometry (kv_format.py),
  whose line padding counts with the scales (per entry: a line's bytes over the rows it holds).
  """
  if storage not in STORAGE_DTYPES:
    raise ValueError(f"storage {storage!r}: expected 'bfloat16', 'float32' or 'paper'.")
  cfg = dataclasses.replace(cfg, dtype="bfloat16") if storage == "paper" else cfg
  main_l, idx_l = layouts(cfg, storage)
  main_g, idx_g = geometries(main_l, idx_l, lane_dense)
  main, idx = main_l.nbytes - main_l.scale_bytes, idx_l.nbytes - idx_l.scale_bytes
  main_row, idx_row = kv_format.row_bytes(main_l, main_g), kv_format.row_bytes(idx_l, idx_g)
  per_tok = scale = per_seq = 0.0
  for i in range(cfg.n_total_layers):
    ratio = cfg.layer_ratio(i)
    per_seq += cfg.window_size * main_row
    if ratio:
      per_tok += main / ratio
      scale += (main_row - main) / ratio
      per_seq += sum(4 * np.prod(s) for s in compressor.state_shapes(ratio, cfg.head_dim).values())
    if ratio == indexer.CSA_RATIO:
      per_tok += idx / ratio
      scale += (idx_row - idx) / ratio
      per_seq += sum(4 * np.prod(s) for s in compressor.state_shapes(ratio, cfg.index_head_dim).values())
  return CacheSize(per_tok, per_seq, scale)
