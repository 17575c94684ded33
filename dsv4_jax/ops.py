"""The attention ops of DeepSeek-V4 behind one seam: the lightning indexer's top-k and sparse attention with
a sink (docs/architecture.md §2.7-§2.9). `forward` and the cached step both call these, so a query's scores
and selections do not depend on how many keys or queries a call holds, and a kernel is plugged in once.

Each op is a plain-jnp reference here; `cfg.attn_impl` picks the implementation ("xla" = this reference;
kernels register under other names, see `register`). An unknown or unavailable name is an error, never a
silent fallback.

KV inputs are `Rows`: entries either as plain values [B, N, K] or as a cache `Store` (uint32 words in
either geometry of dsv4_jax/kv_format.py), possibly one layer `rep` of a stacked group `[R, B, lines,
line]`. Ops read rows straight from there (a gather of the chosen rows, or blocks of keys), so a cache is
never copied whole and work follows `n`, the rows considered, not the cache's capacity.

Tie-break, everywhere: among equal indexer scores the lower entry id wins (`lax.top_k` is stable).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from dsv4_jax.config import ModelConfig
from dsv4_jax import kv_format
from dsv4_jax.kv_format import Layout, Plane, unpack
from dsv4_jax.quant import round_to

F32 = jnp.float32
KEY_BLOCK = 2048          # indexer keys scored per block: scores never exist as [queries, heads, all keys]
TOPK_WHOLE = 1 << 22      # up to this many scores [B,S,n], one lax.top_k over them all; beyond, block by block
UNROLL_KEY_BLOCKS = False  # the key-block loop unrolled: for bench/decode_memory.py, as XLA's cost_analysis
                           # counts a while loop's body once


@dataclasses.dataclass(frozen=True)
class Rows:
  """A view of n KV rows for the ops (lives inside a trace; not a pytree).

  data: values [B, N, K]                    (layout None; dims in `order`'s planar order when given), or
        a store's first plane [B, L, line]   (layout given; rep None), or
        [R, B, L, line]                      (layout given; rep = the layer's index in a stacked group);
  tail: the store's second plane, same leading axes (a split fp8 row's RoPE dims; kv_format.lane_dense);
  n:    rows considered (the first n); static. Default: all.
  pack, planes: the store's geometry (kv_format.Plane): `planes` when given, else whole rows `pack` to a
  line (kv_format.rows_geometry);
  order: (values only) the layout whose planar order the values' dims are in (None: natural).

  Reads return values in natural dim order, or with `order=layout` in that layout's planar order
  (`kv_format.Layout.decode_planar`: a store of that format decodes slot by slot, element-wise on its words,
  with no interleave for XLA to materialise; plain values are permuted to it). The ops read in the planar
  order of their rows' layout and permute the query (and the output back) instead: a dot product does not
  depend on the order of its dims.
  """
  data: jax.Array
  layout: Layout | None = None
  rep: jax.Array | None = None
  n: int | None = None
  pack: int = 1
  tail: jax.Array | None = None
  planes: tuple = ()
  order: Layout | None = None

  @classmethod
  def of(cls, store, rep=None, n: int | None = None) -> "Rows":
    """The rows of a `kv_format.Store` (one layer `rep` of a stacked group when given)."""
    return cls(store.words, store.layout, rep, n, store.pack, store.tail, store.planes)

  @property
  def geometry(self) -> tuple[Plane, ...]:
    return self.planes or kv_format.rows_geometry(self.layout, self.pack)

  @property
  def arrays(self) -> tuple[jax.Array, ...]:
    return (self.data,) if self.tail is None else (self.data, self.tail)

  @property
  def whole_rows(self) -> bool:
    """One plane of whole rows, `pack` to a line of exactly pack * words (no padding): a line then decodes as
    one row of pack * width values of an element-wise format."""
    if self.layout is None:
      return True
    return len(self.geometry) == 1 and self.geometry[0].line == self.geometry[0].pack * self.layout.words

  @property
  def align(self) -> int:
    """Row counts that are whole lines in every plane (block starts and sizes are multiples of this)."""
    return 1 if self.layout is None else kv_format.align(self.geometry)

  @property
  def capacity(self) -> int:
    if self.layout is None:
      return self.data.shape[-2]
    return min(p.rows_in(a.shape[-2]) for a, p in zip(self.arrays, self.geometry))

  @property
  def rows(self) -> int:
    return self.n if self.n is not None else self.capacity

  @property
  def aligned_rows(self) -> int:
    """`rows` rounded up to whole lines of every plane (still inside the store): what a block-wise reader
    covers."""
    a = self.align
    return -(-self.rows // a) * a

  @property
  def native_order(self) -> Layout | None:
    """The layout whose planar order these rows are read in without a permutation: a store's own layout, or
    the `order` of values (None: natural order)."""
    return self.layout if self.layout is not None else self.order

  def natural(self) -> "Rows":
    """The same rows with values (never a store) in natural dim order: what a kernel that decodes its
    stores' rows in natural order reads alongside them."""
    if self.layout is not None or self.order is None:
      return self
    return dataclasses.replace(self, data=self.order.from_planar(self.data), order=None)

  def _decode(self, x, dtype, order: Layout | None):
    """Values or stored rows [..., w] (never lines) -> [..., K] in dtype, in natural dim order (order None)
    or in `order`'s planar order."""
    if self.layout is not None:
      if order is not None and self.layout.segments == order.segments:
        return self.layout.decode_planar(x, dtype)
      x = self.layout.decode(x, dtype)
    else:
      x = x.astype(dtype)
      if _segments(self.order) == _segments(order):
        return x
      if self.order is not None:
        x = self.order.from_planar(x)
    return x if order is None else order.to_planar(x)

  def gather(self, idx: jnp.ndarray, dtype, order: Layout | None = None) -> jnp.ndarray:
    """idx [B, S, T] (clamped into range) -> [B, S, T, K] in dtype: only the chosen rows are read (one
    window of each plane's words per row)."""
    i = jnp.clip(idx, 0, self.capacity - 1)
    if self.layout is None:
      return self._decode(self.data[jnp.arange(idx.shape[0])[:, None, None], i], dtype, order)
    if self.tiled:
      raise ValueError("rows stored in tiles (kv_format.Tiles: indexer keys) are read in blocks, not gathered")
    parts = [_gather_words(a, self.rep, i // p.pack, (i % p.pack) * p.words, p.words)
             for a, p in zip(self.arrays, self.geometry)]
    return self._decode(parts[0] if len(parts) == 1 else jnp.concatenate(parts, -1), dtype, order)

  def block(self, start, size: int, dtype, order: Layout | None = None) -> jnp.ndarray:
    """Rows [start, start + size) -> [B, size, K] (start must leave the block inside the array; for a packed
    store start and size are whole lines of every plane: multiples of `align`)."""
    if self.layout is None:
      return self._decode(jax.lax.dynamic_slice_in_dim(self.data, start, size, axis=1), dtype, order)
    if size % self.align:
      raise ValueError(f"a block of {size} rows of a store packed {self.align} per line: expected whole lines")
    parts = [p.unpack(self._lines(a, p.lines(start), p.lines(size)))
             for a, p in zip(self.arrays, self.geometry)]
    return self._decode(parts[0] if len(parts) == 1 else jnp.concatenate(parts, -1), dtype, order)

  def _lines(self, a: jnp.ndarray, s0, n: int) -> jnp.ndarray:
    """Lines [s0, s0 + n) of a plane [B, L, line] (or of its layer `rep` of [R, B, L, line]) -> [B, n, line]:
    one dynamic slice of this layer's lines, never every layer's first."""
    if self.rep is None:
      return jax.lax.dynamic_slice_in_dim(a, s0, n, axis=1)
    R, B, L, w = a.shape
    return jax.lax.dynamic_slice(a, (self.rep, 0, s0, 0), (1, B, n, w))[0]

  @property
  def tiled(self) -> bool:
    """Rows stored as tiles (kv_format.Tiles: indexer keys, 128 across the lanes)."""
    return self.layout is not None and isinstance(self.geometry[0], kv_format.Tiles)

  def tile_block(self, start, size: int, dtype) -> jnp.ndarray:
    """Tiled rows [start, start + size) (whole blocks of 1024) -> [B, size / 128, K, 128] in dtype: row
    128 g + i of the block at [:, g, :, i], its dims in the layout's planar order (Layout.decode_tiles)."""
    (t,) = self.geometry
    return self.layout.decode_tiles(t.groups(self._lines(self.data, t.lines(start), t.lines(size))), dtype)

  def all(self, dtype, order: Layout | None = None) -> jnp.ndarray:
    """The first n rows: [B, n, K]."""
    if self.layout is None:
      return self._decode(self.data[:, : self.rows], dtype, order)
    if self.rep is None and self.whole_rows and self.n in (None, self.capacity):
      return self._decode(unpack(self.data, self.geometry[0].pack), dtype, order)
    return self.block(0, self.aligned_rows, dtype, order)[:, : self.rows]


def _segments(order: Layout | None):
  return None if order is None else order.segments


def _gather_words(lines: jnp.ndarray, rep, line: jnp.ndarray, word: jnp.ndarray, w: int) -> jnp.ndarray:
  """Words [word, word + w) of line `line` [B, S, T] of each sequence: lines [B, L, line] (or [R, B, L, line]
  with `rep`) -> [B, S, T, w]; one gather whose window is the row's own words."""
  B = line.shape[0]
  idx = [jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None, None], line.shape), line, word]
  if rep is not None:
    idx = [jnp.broadcast_to(jnp.asarray(rep, jnp.int32), line.shape)] + idx
  if w == lines.shape[-1]:                                   # whole lines: an ordinary row gather
    return lines[tuple(idx[:-1])]
  idx = jnp.stack([x.astype(jnp.int32) for x in idx], -1)                                # [B,S,T,d]
  lead = tuple(range(idx.shape[-1] - 1))
  dn = jax.lax.GatherDimensionNumbers(offset_dims=(3,), collapsed_slice_dims=lead,
                                      start_index_map=lead + (len(lead),))
  return jax.lax.gather(lines, idx, dn, (1,) * len(lead) + (w,), indices_are_sorted=False,
                        mode=jax.lax.GatherScatterMode.CLIP)


# ---- references -------------------------------------------------------------------------------------

def _key_block_scores(qI: jnp.ndarray, w: jnp.ndarray, keys: Rows):
  """(score_block, blk, n_blocks): score_block(start) -> [B,S,blk] scores of keys [start, start + blk) in the
  compute dtype, for blocks of KEY_BLOCK keys (whole lines of a packed store) covering keys.aligned_rows."""
  n, dt, order = keys.aligned_rows, qI.dtype, keys.native_order
  blk = min(KEY_BLOCK // keys.align * keys.align, n)                     # whole lines of a packed store
  if order is not None:
    qI = order.to_planar(qI)                                   # the keys' planar dim order (Rows)

  def score_block(start):
    if keys.tiled:                                     # [B, blk/128, cI, 128]: no [.., words]-minor array
      k = keys.tile_block(start, blk, dt)
      logits = jnp.einsum("bshd,bgdk->bshgk", qI, k, preferred_element_type=F32).reshape(*qI.shape[:3], blk)
    else:
      k = keys.block(start, blk, dt, order)                                            # [B,blk,cI]
      logits = jnp.einsum("bshd,bcd->bshc", qI, k, preferred_element_type=F32)
    logits = round_to(logits, dt)
    term = round_to(jax.nn.relu(logits) * w.astype(F32)[..., None], dt)
    return round_to(jnp.sum(term, axis=2), dt).astype(dt)                                    # [B,S,blk]
  return score_block, blk, -(-n // blk)


def index_scores_ref(qI: jnp.ndarray, w: jnp.ndarray, keys: Rows) -> jnp.ndarray:
  """score[b,t,s] = sum_h w[b,t,h] * relu(qI[b,t,h] . K[b,s]) over the first `keys.rows` keys.

  qI: [B,S,nI,cI], w: [B,S,nI] (compute dtype) -> [B,S,n] in the compute dtype. The logits are rounded to
  the compute dtype before relu and weighting, the head sum is fp32 (as the reference). Keys are scored
  KEY_BLOCK at a time and reduced over heads per block; a last partial block is re-read from n - block
  (recomputing identical values), so every key's score comes from the same computation. A packed store is
  read in whole lines: n is rounded up to them and the scores past n dropped.
  """
  B, S = qI.shape[:2]
  n = keys.aligned_rows
  score_block, blk, n_blocks = _key_block_scores(qI, w, keys)
  if n_blocks == 1:
    return score_block(0)[..., : keys.rows]

  def body(i, scores):
    start = jnp.minimum(i * blk, n - blk)
    return jax.lax.dynamic_update_slice_in_dim(scores, score_block(start), start, axis=2)

  return jax.lax.fori_loop(0, n_blocks, body, jnp.zeros((B, S, n), qI.dtype),
                           unroll=UNROLL_KEY_BLOCKS)[..., : keys.rows]


def indexer_topk_ref(qI: jnp.ndarray, w: jnp.ndarray, keys: Rows, n_visible: jnp.ndarray, k: int) -> jnp.ndarray:
  """The lightning indexer's selection: top-k visible compressed entries per query.

  qI: [B,S,nI,cI], w: [B,S,nI], keys: Rows of indexer keys, n_visible: [B,S] entries visible to each query
  -> [B,S,min(k, n)] int32 entry ids, -1 where fewer than k are visible. Ties: the lower id. The scores of
  `index_scores_ref`; more than TOPK_WHOLE of them (prefill) are selected block by block as they are
  computed (`_streaming_topk`: no [B,S,n] array), fewer (decode) by one `lax.top_k` (on XLA:TPU each
  block's merge is a sort of its own, counted again by the cost model).
  """
  if n_visible.size * keys.aligned_rows > TOPK_WHOLE:                 # many scores (prefill)
    score_block, blk, n_blocks = _key_block_scores(qI, w, keys)
    if n_blocks > 1:
      return _streaming_topk(score_block, blk, n_blocks, keys.aligned_rows, keys.rows, n_visible, k)
  return select_topk(index_scores_ref(qI, w, keys), n_visible, k)


def select_topk(scores: jnp.ndarray, n_visible: jnp.ndarray, k: int, block: int | None = None) -> jnp.ndarray:
  """scores [B,S,n], n_visible [B,S] -> [B,S,min(k,n)] int32 ids of the k best entries i < n_visible (the
  lower id first among equal scores), -1 where fewer than k are visible. With `block`, or by default for
  more than TOPK_WHOLE scores, they are selected `block` (KEY_BLOCK) at a time (`_streaming_topk`, the same
  result): `lax.top_k` over all of them makes XLA hold [B,S,n] fp32 scores, int32 ids and sorted copies
  besides (128 MiB each per 128 queries of a 1M-token prefill)."""
  n = scores.shape[-1]
  if block is None and scores.size > TOPK_WHOLE:
    block = KEY_BLOCK
  if block is not None and n > block:
    read = lambda start: jax.lax.dynamic_slice_in_dim(scores, start, block, axis=2)
    return _streaming_topk(read, block, -(-n // block), n, n, n_visible, k)
  visible = jnp.arange(n) < n_visible[..., None]
  _, idx = jax.lax.top_k(jnp.where(visible, scores.astype(F32), -jnp.inf), min(k, n))
  return jnp.where(idx < n_visible[..., None], idx, -1).astype(jnp.int32)


def _streaming_topk(score_block, blk: int, n_blocks: int, n: int, rows: int, n_visible: jnp.ndarray,
                    k: int) -> jnp.ndarray:
  """`select_topk` over the scores of entries [0, rows) that score_block(start) -> [B,S,blk] gives a block at a
  time (blocks at i*blk; the last, partial one re-read from n - blk with the entries seen before masked).
  A running best [B,S,min(k, rows)] (fp32 scores and ids, sorted: score descending, id ascending) is merged
  with each block by `lax.top_k` over [best, block]: among equal scores the earlier candidate wins, and
  every entry of the running best has a lower id than the block's, so the result is the one `lax.top_k`
  over all entries gives, order included."""
  kk = min(k, rows)

  def body(i, carry):
    best, ids = carry
    start = jnp.minimum(i * blk, n - blk)
    kid = start + jnp.arange(blk, dtype=jnp.int32)                                  # [blk]
    keep = (kid >= i * blk) & (kid < rows) & (kid < n_visible[..., None])          # [B,S,blk]
    s = jnp.where(keep, score_block(start).astype(F32), -jnp.inf)
    top, pos = jax.lax.top_k(jnp.concatenate([best, s], axis=-1), kk)
    cand = jnp.concatenate([ids, jnp.broadcast_to(kid, s.shape)], axis=-1)
    return top, jnp.take_along_axis(cand, pos, axis=-1)

  shape = n_visible.shape + (kk,)
  init = (jnp.full(shape, -jnp.inf, F32), jnp.full(shape, rows, jnp.int32))
  best, ids = jax.lax.fori_loop(0, n_blocks, body, init, unroll=UNROLL_KEY_BLOCKS)
  return jnp.where((ids < n_visible[..., None]) & (best > -jnp.inf), ids, -1)


def sparse_attention_ref(q: jnp.ndarray, attn_sink: jnp.ndarray, scale: float, window: Rows,
                         window_idx: jnp.ndarray, comp: Rows | None = None, comp_idx: jnp.ndarray | None = None,
                         comp_visible: jnp.ndarray | None = None) -> jnp.ndarray:
  """Multi-query attention with a sink over gathered rows (the reference's sparse_attn semantics).

  q: [B,S,H,K] queries (compute dtype); attn_sink: [H] fp32; window: raw KV rows with window_idx [B,S,W]
  int32 (-1 = masked); comp (compressed entries, optional) with either comp_idx [B,S,T] (CSA: the indexer's
  top-k, -1 = none) or comp_visible [B,S] (HCA: every entry i < comp_visible attends). Keys and values are
  the same vectors. Returns [B,S,H,K] in q.dtype.

  z = q.k * scale (fp32); p_j = exp(z_j - m) / (sum_j exp(z_j - m) + exp(sink - m)), m = max_j z_j over all
  attended rows; the unnormalised p is rounded to q.dtype before P.V (fp32 accumulate), as the reference.
  An all-masked row gives 0.
  """
  dt = q.dtype
  parts = []                                                  # (logits [B,S,H,T], values, einsum for P.V)
  order = next((r.native_order for r in (comp, window) if r is not None and r.native_order is not None), None)
  if order is not None:
    q = order.to_planar(q)                           # the stored rows' planar dim order (Rows); undone below

  def gathered(rows: Rows, idx):
    kv = rows.gather(idx, dt, order)                                                 # [B,S,T,K]
    z = jnp.einsum("bshk,bstk->bsht", q, kv, preferred_element_type=F32) * scale
    parts.append((jnp.where((idx >= 0)[:, :, None, :], z, -jnp.inf), kv, "bsht,bstk->bshk"))

  gathered(window, window_idx)
  if comp is not None and comp_idx is not None:
    gathered(comp, comp_idx)
  elif comp is not None:
    kv = comp.all(dt, order)                                                         # [B,n,K]
    z = jnp.einsum("bshk,btk->bsht", q, kv, preferred_element_type=F32) * scale
    vis = jnp.arange(kv.shape[1]) < comp_visible[..., None]                          # [B,S,n]
    parts.append((jnp.where(vis[:, :, None, :], z, -jnp.inf), kv, "bsht,btk->bshk"))

  m = jnp.max(jnp.stack([jnp.max(z, axis=-1) for z, _, _ in parts]), axis=0)[..., None]   # [B,S,H,1]
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  denom = jnp.exp(attn_sink.astype(F32)[:, None] - m)
  o = 0.0
  for z, kv, spec in parts:
    e = jnp.exp(z - m)
    denom = denom + jnp.sum(e, axis=-1, keepdims=True)
    o = o + jnp.einsum(spec, e.astype(dt), kv, preferred_element_type=F32)
  o = (o / denom).astype(dt)
  return o if order is None else order.from_planar(o)


def compress_pool_ref(C: jnp.ndarray, Z: jnp.ndarray, ratio: int, prev=None) -> jnp.ndarray:
  """The compressor's gated softmax pooling (docs/architecture.md §2.6): `dsv4_jax.compressor.pool`.
  C, Z [B, n*m, coff*c] fp32, window-aligned; prev (CSA) the window before the first -> [B, n, c] fp32."""
  from dsv4_jax import compressor
  return compressor.pool(C, Z, ratio, prev)


def encode_rows_ref(values: jnp.ndarray, layout: Layout) -> jnp.ndarray:
  """KV entries [..., K] -> the cache's stored words uint32 [..., layout.words] (`Layout.encode`)."""
  return layout.encode(values)


# ---- the implementation switch -------------------------------------------------------------------------

OPS = ("indexer_topk", "sparse_attention", "compress_pool", "encode_rows")
_IMPLS: dict[str, dict[str, Callable]] = {
    "xla": {"indexer_topk": indexer_topk_ref, "sparse_attention": sparse_attention_ref,
            "compress_pool": compress_pool_ref, "encode_rows": encode_rows_ref},
}


_PLANAR_READS = {"xla": True}   # implementation -> its sparse attention reads values in their rows' planar order


def register(name: str, planar_reads: bool = False, **ops: Callable) -> None:
  """Makes `cfg.attn_impl == name` use these ops (e.g. Pallas kernels); missing ops stay an error.
  `planar_reads`: its `sparse_attention` reads values (the cached window) fastest in their layout's planar
  order (`Rows(order=)`, as the XLA ops do); False: in natural dim order (kernels that decode stored rows in
  natural order). `attention` builds the window in that order, so no implementation permutes it back."""
  unknown = set(ops) - set(OPS)
  if unknown:
    raise ValueError(f"register({name!r}): unknown ops {sorted(unknown)}; the ops are {OPS}.")
  _IMPLS.setdefault(name, {}).update(ops)
  _PLANAR_READS[name] = planar_reads


def window_order(cfg: ModelConfig, layout: Layout) -> Layout | None:
  """The order `cfg.attn_impl`'s sparse attention reads a window of values stored in `layout` in: `layout`
  (planar) or None (natural); see `register`."""
  implementation(cfg, "sparse_attention")               # an unknown or unavailable attn_impl is an error here
  return layout if _PLANAR_READS.get(cfg.attn_impl, False) else None


def implementation(cfg: ModelConfig, op: str) -> Callable:
  if cfg.attn_impl.startswith("pallas") and cfg.attn_impl not in _IMPLS:
    import pallas_kernels  # noqa: F401  (registers "pallas", "pallas_tpu", "pallas_gpu")
  impl = _IMPLS.get(cfg.attn_impl)
  if impl is None or op not in impl:
    have = sorted(k for k, v in _IMPLS.items() if op in v)
    raise NotImplementedError(f"attn_impl={cfg.attn_impl!r} has no {op!r} op (implementations that have it: "
                              f"{have}).")
  return impl[op]


def _per_batch_shard(cfg: ModelConfig, fn: Callable, args: tuple, kinds: str):
  """Runs a kernel (any attn_impl but "xla") once per batch shard of the active mesh.

  XLA cannot partition a Pallas custom call, so on a mesh of several devices the kernel runs inside
  `jax.shard_map` over every mesh axis not already manual (e.g. inside context-parallel attention
  `sequence` is): the batch (dimension 0 of every "b" argument, dimension 1 of a stacked store) is split over
  the axis the rules table gives "batch" when that axis divides it, everything else enters whole; the
  devices along the other axes compute the same rows (attention is data-parallel: V4's one KV head would
  otherwise be replicated anyway). kinds, one letter per argument: "b" batch-leading array (or None), "r"
  replicated array, "w" `Rows` (or None), "s" static. The "xla" reference needs none of this: XLA
  partitions its ops by the shardings of their inputs.
  """
  from dsv4_jax import sharding
  mesh = jax.sharding.get_abstract_mesh()
  if cfg.attn_impl == "xla" or mesh.empty or mesh.size == 1:
    return fn(*args)
  manual = jax.sharding.AxisType.Manual
  free = tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t != manual)
  if not free or all(mesh.shape[n] == 1 for n in free):
    return fn(*args)
  B = next(a.shape[0] for a, k in zip(args, kinds) if k == "b" and a is not None)
  rule = dict(sharding.active_mesh()[1]).get("batch")
  data = tuple(a for a in ((rule,) if isinstance(rule, str) else rule or ()) if a in free)
  bax = data if data and B % math.prod(mesh.shape[a] for a in data) == 0 else None
  P = jax.sharding.PartitionSpec
  flat, specs, rebuild = [], [], []
  for a, k in zip(args, kinds):
    if a is None or k == "s":
      rebuild.append(("s", a))
    elif k == "w":
      stacked = a.rep is not None
      flat += list(a.arrays) + ([a.rep] if stacked else [])
      specs += [P(None, bax) if stacked else P(bax)] * len(a.arrays) + ([P()] if stacked else [])
      rebuild.append(("w", (a.layout, a.n, stacked, a.pack, a.tail is not None, a.planes, a.order)))
    else:
      flat.append(a)
      specs.append(P(bax) if k == "b" else P())
      rebuild.append(("a", None))

  def body(*xs):
    it, out = iter(xs), []
    for kind, meta in rebuild:
      if kind == "s":
        out.append(meta)
      elif kind == "w":
        layout, n, stacked, pack, has_tail, planes, order = meta
        data_ = next(it)
        tail = next(it) if has_tail else None
        out.append(Rows(data_, layout, next(it) if stacked else None, n, pack, tail, planes, order))
      else:
        out.append(next(it))
    return fn(*out)

  return jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=P(bax), axis_names=set(free),
                       check_vma=False)(*flat)


def indexer_topk(cfg: ModelConfig, qI, w, keys: Rows, n_visible, k: int):
  return _per_batch_shard(cfg, implementation(cfg, "indexer_topk"), (qI, w, keys, n_visible, k), "bbwbs")


def sparse_attention(cfg: ModelConfig, q, attn_sink, window: Rows, window_idx, comp: Rows | None = None,
                     comp_idx=None, comp_visible=None):
  return _per_batch_shard(cfg, implementation(cfg, "sparse_attention"),
                          (q, attn_sink, cfg.softmax_scale, window, window_idx, comp, comp_idx, comp_visible),
                          "brswbwbb")


def compress_pool(cfg: ModelConfig, C, Z, ratio: int, prev=None):
  return _per_batch_shard(cfg, implementation(cfg, "compress_pool"), (C, Z, ratio, prev), "bbsb")


def encode_rows(cfg: ModelConfig, values, layout: Layout):
  return _per_batch_shard(cfg, implementation(cfg, "encode_rows"), (values, layout), "bs")
