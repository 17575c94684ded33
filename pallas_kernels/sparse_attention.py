"""Sparse multi-query attention with a per-head sink over gathered rows, as Pallas kernels.

Reference (must equal): `dsv4_jax.ops.sparse_attention_ref`. For each query (b, s) and head h,

    o = sum_j e^{z_j} v_j / (e^{sink_h} + sum_j e^{z_j}),   z_j = scale * q . k_j,   k_j = v_j,

over the rows of up to two *sources*: the window (gathered by index, -1 = masked) and the compressed
entries, either gathered by the indexer's top-k (CSA) or every entry i < visible[b, s] (HCA, read as
contiguous chunks). Rows are read where they are stored, as uint32 words (dsv4_jax/kv_format.py: bf16,
fp32, or the paper's fp8 + e8m0 scales + bf16 RoPE), and decoded in the kernel (`rowcodec`). A lane-dense
store's row lives in planes (the paper's fp8 entry: a [values | scales] line and a RoPE line holding 4 rows):
each plane's line is fetched per row, and a plane of P > 1 rows a line is scored slot by slot, each row
masked to its own slot (`_online_step`), so no lane is moved inside the kernel.

The online softmax starts from the sink (m = sink, l = 1, acc = 0), so a query whose rows are all masked
returns exactly 0 and no (-inf) - (-inf) appears; -1 may sit anywhere in an index row, and duplicate
indices count twice (as in the reference). The unnormalised probabilities are rounded to the compute dtype
before P.V, as the reference does.

Two kernels, chosen by `q_block` (default: 1 when S == 1, else `default_q_block`):

  decode (q_block = 1): one query per program, all H heads as the matmul M dimension; grid (B, S).
  prefill (q_block = Tq > 1): a block of Tq consecutive queries of one sequence per program; grid
       (B, ceil(S / Tq)), S padded to whole blocks (padded queries list no rows; their outputs are dropped).
       Why: a query alone gives the MXU only H rows and re-reads rows its neighbours also read. In a block,
       - the window is each block's *set* of rows (`window_union`, computed in XLA: sorted distinct ids and
         a per-query count of how often it lists each): every row is fetched and decoded once for the block
         and scored by all Tq * H stacked query rows in one matmul, each query weighting a row by its count
         (0 = not its row, 2 = a duplicate). The model's windows are consecutive positions, so a block
         reads W + Tq - 1 rows instead of Tq * W (Flash, Tq = 16: 143 instead of 2048);
       - HCA rows (every visible entry) are shared the same way, fetched once up to the block's largest
         visible count, each query masking by its own count (ragged, per query);
       - CSA top-k rows differ per query: they are gathered query by query (its H rows against its own
         chunks), the chunks of all the block's queries in one double-buffered DMA pipeline.
       Each source keeps its own (m, l, acc), all starting from the sink's logit (l counts the sink once,
       in the window's state); the sources are merged outside the kernel with one division.
       Tq: TPU Q_ROWS_TPU // H stacked rows (Flash 16 queries, Pro 8), which keeps VMEM under
       VMEM_LIMIT; GPU Q_ROWS_GPU // head_block (4). A CSA block is still bound by its per-query gathers;
       the window and HCA traffic and DMA descriptors drop by about Tq.

Backends (same math, `_online_step`):
  tpu  Mosaic. Index rows sit in SMEM (a BlockSpec per query or per block, so no 1 MiB scalar-prefetch
       limit); ragged counts (HCA visible, the block's distinct window rows) by scalar prefetch; the row pools
       stay in HBM and each chunk of `block_rows` rows is fetched by one DMA per row and plane (gather) or
       one DMA per chunk (HCA, planes of one row a line), double-buffered, waited once per chunk. The
       prefill state lives in the output blocks (VMEM), which serve as the accumulators.
  gpu  Triton. Grid (B*S or B*blocks, H / head_block); a chunk is gathered with one pointer-tensor load.
Shapes: any H (GPU: padded to whole head blocks; TPU prefill: to a multiple of 8), any K, any row count,
any index-row length (padded to the chunk with -1), any S. Each program writes, per source and part, its
unnormalised P.V and the denominator; `merge_parts` and one division outside the kernel give o.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dsv4_jax.ops import Rows
from pallas_kernels import cost, rowcodec
from pallas_kernels.platform import backend_for, check, in_hbm, interpret_mode, next_pow2

F32 = jnp.float32
NEG = -1e30                  # masked logit: finite, so exp(NEG - m) is 0 without NaNs


@dataclasses.dataclass(frozen=True)
class _Plane:
  """One plane of a source's rows (dsv4_jax/kv_format.py: whole rows are one plane of one row a line)."""
  codec: rowcodec.Codec  # tiled when pack > 1 (rowcodec.plane_codecs)
  words: int             # stored words per line
  lanes: int             # lanes the kernel decodes (TPU: words; Triton: next power of two)
  pack: int = 1          # rows a line: row r is slot r % pack of line r // pack


@dataclasses.dataclass(frozen=True)
class _Source:
  """One row pool as the kernel sees it (static parts only; arrays travel separately): its planes (a
  lane-dense fp8 row is [values | scales] lines and RoPE lines 4 to a line), read for the same rows."""
  planes: tuple[_Plane, ...]
  rows: int              # rows per (layer, sequence) in the pool
  dense: int             # HCA: rows considered (read in contiguous chunks); 0 = gathered by index
  chunks: int            # chunks of the index row (gathered) or of `dense` rows

  @property
  def part_lanes(self) -> list[int]:
    """Lanes of each part, the planes' parts in order (one accumulator and one query part each)."""
    return [p.lanes for p in self.planes for _ in p.codec.parts]

  @property
  def packed(self) -> bool:
    return any(p.pack > 1 for p in self.planes)

  @property
  def row_bytes(self) -> int:
    """HBM bytes one row's fetch moves: its line of every plane."""
    return 4 * sum(p.words for p in self.planes)

  def geo(self) -> tuple:
    """(parts, pack, slot lanes) per plane, for `_online_step`."""
    return tuple((len(p.codec.parts), p.pack, p.codec.slot_lanes) for p in self.planes)


def _by_source(flat, srcs) -> list:
  """A flat sequence with one item per (source, plane) -> one list per source."""
  it = iter(flat)
  return [[next(it) for _ in src.planes] for src in srcs]


def _cost(srcs, fetched, scored_by, programs: int, read: int, written) -> pl.CostEstimate:
  """The kernels' CostEstimate: `read` bytes of blocked operands, and per program and source `fetched` rows
  (the most its loop fetches), each scored by `scored_by` query rows (QK and PV: 4 flops a lane, one exp).
  Triton's programs are (query or block, head block): each loads its rows itself."""
  per = [(f * q, f * src.row_bytes, sum(src.part_lanes)) for src, f, q in zip(srcs, fetched, scored_by)]
  return cost.estimate(flops=programs * sum(4 * n * lanes for n, _, lanes in per),
                       transcendentals=programs * sum(n for n, _, _ in per),
                       read=read + programs * sum(b for _, b, _ in per), written=cost.nbytes(written))


def _source_of(rows: Rows, backend: str):
  """A Rows -> (static planes, [(pool uint32 [lines_total, line], base int32 [B]) per plane], rows per
  sequence)."""
  layout, stored = rowcodec.stored_planes(rows)
  pools, planes = [], []
  for (pool, base, plane), pc in zip(stored, rowcodec.plane_codecs(layout, [p for _, _, p in stored])):
    lanes = plane.line if backend == "tpu" else next_pow2(plane.line)
    planes.append(_Plane(pc, plane.line, lanes, plane.pack))
    pools.append((pool, base))
  return tuple(planes), pools, rows.capacity


def _online_step(carry, qparts, parts, valid, scale: float, p_dtype, count=None, geo=None, slot_rows=None):
  """One chunk of the online softmax. carry = (m [M,1], l [M,1], acc [list of [M, lanes]]);
  qparts/parts: per part [M, lanes] / [rows, lanes] f32; valid [1 or M, rows] bool; count (optional,
  [M, rows] f32): how many times each query lists each row (a row listed twice counts twice).
  geo (`_Source.geo`) and slot_rows (per plane, [1 or M, rows] int32 or None): a plane of P > 1 rows a line
  decodes each row's whole line; only the row's slot (lanes [s * w, (s + 1) * w)) counts, so its scores
  and P.V are taken slot by slot, each row masked to its own (the query's tiled copies, masked per slot,
  pick the slot's lanes)."""
  m, l, acc = carry
  geo = geo or ((len(parts), 1, 0),)
  slot_rows = slot_rows or (None,) * len(geo)

  def dot_t(a, b):
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32)

  z, i = 0.0, 0
  for (n, P, sl), sr in zip(geo, slot_rows):
    qs, ks = qparts[i:i + n], parts[i:i + n]
    if P == 1:
      z = z + sum(dot_t(q, k) for q, k in zip(qs, ks))
    else:
      lane_slot = jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, qs[0].shape, 1), sl)
      for s in range(P):
        zs = sum(dot_t(jnp.where(lane_slot == s, q, 0.0), k) for q, k in zip(qs, ks))
        z = z + jnp.where(sr == s, zs, 0.0)
    i += n
  z = jnp.where(valid, z * scale, NEG)                                                # [M, rows]
  m_new = jnp.maximum(m, jnp.max(z, axis=1, keepdims=True))
  alpha = jnp.exp(m - m_new)
  p = jnp.exp(z - m_new)
  pr = p.astype(p_dtype).astype(F32)
  if count is not None:
    p, pr = p * count, pr * count
  l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
  out, i = [], 0
  for (n, P, sl), sr in zip(geo, slot_rows):
    for a, k in zip(acc[i:i + n], parts[i:i + n]):
      if P == 1:
        out.append(alpha * a + jnp.dot(pr, k, preferred_element_type=F32))
      else:
        lane_slot = jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, k.shape, 1), sl)
        out.append(alpha * a + sum(jnp.dot(jnp.where(sr == s, pr, 0.0), jnp.where(lane_slot == s, k, 0.0),
                                           preferred_element_type=F32) for s in range(P)))
    i += n
  return m_new, l, out


def _per_query_rows(x, heads: int):
  """[Tq, n] per query -> [Tq * heads, n], the rows of the block's stacked heads (query-major)."""
  Tq, n = x.shape
  return jnp.broadcast_to(x[:, None, :], (Tq, heads, n)).reshape(Tq * heads, n)


# ---- TPU (Mosaic) ---------------------------------------------------------------------------------------

def _tpu_dma_rows(plane_io, slot, row_of, br: int):
  """Starts one DMA per row j < br and plane: row row_of(j) is line row // P of each plane, into the plane's
  buffer slot. plane_io: [(pool, base, buf, sem, _Plane)]."""
  from jax.experimental.pallas import tpu as pltpu

  @pl.loop(0, br)
  def _(j):
    r = row_of(j)
    for pool, base, buf, sem, plane in plane_io:
      line = r if plane.pack == 1 else jax.lax.div(r, plane.pack)
      pltpu.make_async_copy(pool.at[pl.ds(base + line, 1)], buf.at[slot, pl.ds(j, 1)], sem.at[slot]).start()


def _tpu_dma_chunk(plane_io, slot, first):
  """Starts one DMA of a chunk of contiguous rows per plane (one row a line; first: a multiple of 8)."""
  from jax.experimental.pallas import tpu as pltpu
  for pool, base, buf, sem, _ in plane_io:
    r0 = pl.multiple_of(base + first, 8)
    pltpu.make_async_copy(pool.at[pl.ds(r0, buf.shape[1])], buf.at[slot], sem.at[slot]).start()


def _tpu_wait_decode(plane_io, slot, p_dtype) -> list:
  """Waits for a buffer slot's rows in every plane, then decodes them: the parts of every plane, in order."""
  from jax.experimental.pallas import tpu as pltpu
  for _, _, buf, sem, _ in plane_io:
    pltpu.make_async_copy(buf.at[slot], buf.at[slot], sem.at[slot]).wait()         # all of the chunk's rows
  parts = []
  for _, _, buf, _, plane in plane_io:
    parts += rowcodec.decode_parts(buf[slot], plane.codec, p_dtype)
  return parts


def _tpu_kernel(*refs, srcs: tuple[_Source, ...], block_rows: int, scale: float, p_dtype):
  n_pl = sum(len(src.planes) for src in srcs)
  base_refs, vis_ref = refs[:n_pl], refs[n_pl]
  it = iter(refs[n_pl + 1:])
  ins = []
  for src in srcs:
    ids_s = None if src.dense else next(it)
    ids_v = None if src.dense else next(it)
    qp = [next(it) for _ in src.part_lanes]
    ins.append((ids_s, ids_v, qp))
  sink_ref = next(it)
  pools = [[next(it) for _ in src.planes] for src in srcs]
  outs = [[next(it) for _ in src.part_lanes] for src in srcs]
  l_ref = next(it)
  scratch = [[(next(it), next(it)) for _ in src.planes] for src in srcs]
  bases = _by_source(base_refs, srcs)

  b, s = pl.program_id(0), pl.program_id(1)
  sink = sink_ref[...]                                                              # [H, 1]
  m, l = sink, jnp.ones_like(sink)
  finals = []
  for k, src in enumerate(srcs):
    ids_s, ids_v, qp_refs = ins[k]
    bufs = scratch[k]
    qparts = [r[...] for r in qp_refs]
    H = qparts[0].shape[0]
    br = bufs[0][0].shape[1]
    plane_io = [(pool, bref[b], buf, sem, plane)
                for pool, bref, (buf, sem), plane in zip(pools[k], bases[k], bufs, src.planes)]

    if src.dense:
      visible = vis_ref[b, s]
      n_chunks = jnp.minimum(jax.lax.div(visible + br - 1, br), src.chunks)
      # HBM is tiled by 8 rows: a chunk DMA starts on a tile (one-row-a-line planes only)
      aligned = src.rows % 8 == 0 and br % 8 == 0 and not src.packed

      def first_row(c, src=src, br=br, aligned=aligned):
        return jnp.minimum(c * br, src.rows - br) if aligned else c * br

      def start(c, slot, src=src, br=br, aligned=aligned, plane_io=plane_io, first_row=first_row):
        if aligned:
          _tpu_dma_chunk(plane_io, slot, first_row(c))
        else:                                             # one DMA per row
          _tpu_dma_rows(plane_io, slot, lambda j: jnp.minimum(c * br + j, src.rows - 1), br)

      def valid_of(c, br=br, first_row=first_row):
        e = first_row(c) + jax.lax.broadcasted_iota(jnp.int32, (1, br), 1)
        return (e >= c * br) & (e < visible)

      def rows_of(c, src=src, br=br):                   # [1, br]: the chunk's rows (unaligned reads)
        return jnp.minimum(c * br + jax.lax.broadcasted_iota(jnp.int32, (1, br), 1), src.rows - 1)
    else:
      n_chunks = src.chunks

      def start(c, slot, ids_s=ids_s, br=br, plane_io=plane_io):
        _tpu_dma_rows(plane_io, slot, lambda j: jnp.maximum(ids_s[0, c * br + j], 0), br)

      def valid_of(c, ids_v=ids_v, br=br):
        return ids_v[:, pl.ds(pl.multiple_of(c * br, br), br)] >= 0                 # [1, br]

      def rows_of(c, ids_v=ids_v, br=br):
        return jnp.maximum(ids_v[:, pl.ds(pl.multiple_of(c * br, br), br)], 0)

    @pl.when(n_chunks > 0)
    def _():
      start(0, 0)

    def body(c, carry, src=src, plane_io=plane_io, qparts=qparts, start=start, valid_of=valid_of, rows_of=rows_of,
             n_chunks=n_chunks):
      slot = jax.lax.rem(c, 2)

      @pl.when(c + 1 < n_chunks)
      def _():
        start(c + 1, 1 - slot)

      parts = _tpu_wait_decode(plane_io, slot, p_dtype)
      slots = [jax.lax.rem(rows_of(c), p.pack) if p.pack > 1 else None for p in src.planes]
      return _online_step(carry, qparts, parts, valid_of(c), scale, p_dtype, geo=src.geo(), slot_rows=slots)

    zeros = [jnp.zeros((H, n), F32) for n in src.part_lanes]
    m, l, acc = jax.lax.fori_loop(0, n_chunks, body, (m, l, zeros))
    finals.append((m, acc))
  for (m_k, acc), out_refs in zip(finals, outs):
    for a, o in zip(acc, out_refs):
      o[...] = a * jnp.exp(m_k - m)
  l_ref[...] = l


def _call_tpu(q, sink, srcs, arrays, visible, scale, block_rows, interpret):
  from jax.experimental.pallas import tpu as pltpu
  B, S, H, _ = q.shape
  in_specs, operands, scratch, fetched = [], [], [], []
  for src, (pools, ids, qparts) in zip(srcs, arrays):
    if not src.dense:
      T = ids.shape[-1]
      flat = ids.reshape(B * S, 1, T)
      in_specs += [pl.BlockSpec((None, 1, T), lambda b, s, *_: (b * S + s, 0, 0), memory_space=pltpu.SMEM),
                   pl.BlockSpec((None, 1, T), lambda b, s, *_: (b * S + s, 0, 0))]
      operands += [flat, flat]
    for qp, lanes in zip(qparts, src.part_lanes):                                   # [B, S, H, lanes]
      in_specs.append(pl.BlockSpec((None, None, H, lanes), lambda b, s, *_: (b, s, 0, 0)))
      operands.append(qp)
    br = min(block_rows, src.rows) if src.dense else block_rows
    fetched.append(src.chunks * br)                                # the most the source's loop fetches
    for plane in src.planes:
      scratch += [pltpu.VMEM((2, br, plane.words), jnp.uint32), pltpu.SemaphoreType.DMA((2,))]
  in_specs.append(pl.BlockSpec((H, 1), lambda b, s, *_: (0, 0)))
  operands.append(sink.astype(F32).reshape(H, 1))
  blocked = cost.nbytes(operands)                                  # each block once; the pools below: by DMA
  for src, (pools, _, _) in zip(srcs, arrays):
    for pool, _ in pools:
      in_specs.append(pl.BlockSpec(memory_space=pltpu.HBM))        # rows are DMAed from HBM
      operands.append(in_hbm(pool, interpret))
  out_shape, out_specs = [], []
  for src in srcs:
    for lanes in src.part_lanes:
      out_shape.append(jax.ShapeDtypeStruct((B, S, H, lanes), F32))
      out_specs.append(pl.BlockSpec((None, None, H, lanes), lambda b, s, *_: (b, s, 0, 0)))
  out_shape.append(jax.ShapeDtypeStruct((B, S, H, 1), F32))
  out_specs.append(pl.BlockSpec((None, None, H, 1), lambda b, s, *_: (b, s, 0, 0)))
  kernel = functools.partial(_tpu_kernel, srcs=tuple(srcs), block_rows=block_rows, scale=scale, p_dtype=q.dtype)
  bases = [base for _, (pools, _, _) in zip(srcs, arrays) for _, base in pools]
  ce = _cost(srcs, fetched, [H] * len(srcs), B * S, blocked, out_shape)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=len(bases) + 1, grid=(B, S), in_specs=in_specs,
                                             out_specs=out_specs, scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=interpret, cost_estimate=ce,
  )(*bases, visible, *operands)


# ---- GPU (Triton) ---------------------------------------------------------------------------------------

def _gpu_load(pool, base, rows, plane: _Plane):
  """Rows [br] (each sequence's row numbers, >= 0) of one plane -> their lines uint32 [br, lanes]."""
  from jax.experimental.pallas import triton as pltriton
  cols = jax.lax.broadcasted_iota(jnp.int32, (rows.shape[0], plane.lanes), 1)
  line = rows if plane.pack == 1 else rows // plane.pack
  return pltriton.load(pool.at[(base + line)[:, None], cols], mask=cols < plane.words, other=0)


def _gpu_chunk(src: _Source, pools, bases, rows, p_dtype):
  """The decoded parts of rows [br] of every plane, and each packed plane's row slots [1, br]."""
  parts, slots = [], []
  for pool, base, plane in zip(pools, bases, src.planes):
    parts += rowcodec.decode_parts(_gpu_load(pool, base, rows, plane), plane.codec, p_dtype)
    slots.append((rows % plane.pack)[None, :] if plane.pack > 1 else None)
  return parts, slots


def _gpu_kernel(*refs, srcs: tuple[_Source, ...], block_rows: int, scale: float, p_dtype, seq: int):
  n_pl = sum(len(src.planes) for src in srcs)
  it = iter(refs)
  base_ref, vis_ref = next(it), next(it)
  ins = []
  for src in srcs:
    ids = None if src.dense else next(it)
    qp = [next(it) for _ in src.part_lanes]
    ins.append((ids, qp))
  sink_ref = next(it)
  pools = [[next(it) for _ in src.planes] for src in srcs]
  outs = [[next(it) for _ in src.part_lanes] for src in srcs]
  l_ref = next(it)

  bs = pl.program_id(0)
  b = bs // seq
  sink = sink_ref[...][:, None]                                                     # [Hb, 1]
  m, l = sink, jnp.ones_like(sink)
  finals = []
  br = block_rows
  k0 = 0
  for k, src in enumerate(srcs):
    ids, qp_refs = ins[k]
    bases = [base_ref[b * n_pl + k0 + i] for i in range(len(src.planes))]
    k0 += len(src.planes)
    qparts = [r[...] for r in qp_refs]
    j = jax.lax.broadcasted_iota(jnp.int32, (br,), 0)
    if src.dense:
      visible = vis_ref[bs]
      n_chunks = jnp.minimum(jax.lax.div(visible + br - 1, br), src.chunks)
    else:
      n_chunks = src.chunks

    def body(c, carry, src=src, ids=ids, pools=pools[k], bases=bases, qparts=qparts, j=j):
      if src.dense:
        e = c * br + j
        valid = e < visible
        r = jnp.minimum(e, src.rows - 1)
      else:
        idx = ids[pl.ds(c * br, br)]
        valid = idx >= 0
        r = jnp.maximum(idx, 0)
      parts, slots = _gpu_chunk(src, pools, bases, r, p_dtype)
      return _online_step(carry, qparts, parts, valid[None, :], scale, p_dtype, geo=src.geo(), slot_rows=slots)

    zeros = [jnp.zeros((qparts[0].shape[0], n), F32) for n in src.part_lanes]
    m, l, acc = jax.lax.fori_loop(0, n_chunks, body, (m, l, zeros))
    finals.append((m, acc))
  for (m_k, acc), out_refs in zip(finals, outs):
    for a, o in zip(acc, out_refs):
      o[...] = a * jnp.exp(m_k - m)
  l_ref[...] = l[:, 0]


def _gpu_bases(arrays):
  """Every (source, plane)'s base per sequence, flattened b-major: [B * planes]."""
  return jnp.stack([base for pools, *_ in arrays for _, base in pools], axis=1).reshape(-1)


def _call_gpu(q, sink, srcs, arrays, visible, scale, block_rows, head_block, interpret):
  from jax.experimental.pallas import triton as pltriton
  B, S, H, _ = q.shape
  hb = head_block
  in_specs, operands = [], []
  bases = _gpu_bases(arrays)
  in_specs += [pl.BlockSpec(bases.shape, lambda i, h: (0,)),
               pl.BlockSpec((B * S,), lambda i, h: (0,))]
  operands += [bases, visible.reshape(B * S)]
  for src, (pools, ids, qparts) in zip(srcs, arrays):
    if not src.dense:
      T = ids.shape[-1]
      in_specs.append(pl.BlockSpec((None, T), lambda i, h: (i, 0)))
      operands.append(ids.reshape(B * S, T))
    for qp, lanes in zip(qparts, src.part_lanes):
      in_specs.append(pl.BlockSpec((None, hb, lanes), lambda i, h: (i, h, 0)))
      operands.append(qp.reshape(B * S, H, lanes))
  in_specs.append(pl.BlockSpec((hb,), lambda i, h: (h,)))
  operands.append(sink.astype(F32))
  for src, (pools, _, _) in zip(srcs, arrays):
    for pool, _ in pools:
      in_specs.append(pl.BlockSpec(pool.shape, lambda i, h: (0, 0)))
      operands.append(pool)
  out_shape, out_specs = [], []
  for src in srcs:
    for lanes in src.part_lanes:
      out_shape.append(jax.ShapeDtypeStruct((B * S, H, lanes), F32))
      out_specs.append(pl.BlockSpec((None, hb, lanes), lambda i, h: (i, h, 0)))
  out_shape.append(jax.ShapeDtypeStruct((B * S, H), F32))
  out_specs.append(pl.BlockSpec((None, hb), lambda i, h: (i, h)))
  kernel = functools.partial(_gpu_kernel, srcs=tuple(srcs), block_rows=block_rows, scale=scale, p_dtype=q.dtype,
                             seq=S)
  ids = [i for _, i, _ in arrays if i is not None]              # loaded by every head block, like the rows
  read = cost.nbytes([qp for _, _, qp in arrays], sink) + H // hb * cost.nbytes(ids)
  ce = _cost(srcs, [src.chunks * block_rows for src in srcs], [hb] * len(srcs), B * S * (H // hb), read,
             out_shape)
  outs = pl.pallas_call(
      kernel, grid=(B * S, H // hb), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2), interpret=interpret, cost_estimate=ce,
  )(*operands)
  return [o.reshape(B, S, H, -1) for o in outs[:-1]] + [outs[-1].reshape(B, S, H, 1)]


# ---- prefill: blocks of Tq queries per program ---------------------------------------------------------
#
# Source modes: "union" (the window: the distinct rows the block's queries list, fetched once and shared,
# each query weighting a row by how often it lists it), "dense" (HCA: every visible row, shared, masked per
# query by its own visible count) and "gather" (CSA: each query its own rows, one query at a time).
# Each source keeps its own online-softmax state (m, l, acc), all measured from the sink (the window's l
# starts at 1 for the sink itself, the others at 0), merged outside the kernel (`_merge_sources`).

def window_union(idx, q_block: int, n_rows: int, block_rows: int):
  """The window rows of each block of `q_block` queries, as a set (XLA, before the kernel).

  idx [B, Sp, W] int32 (-1 = masked; Sp a multiple of q_block) -> (uids [B*nb, Up] int32: the block's
  distinct rows ascending, 0 past n_u; n_u [B*nb] int32; count [B*nb, q_block, Up] f32: how many times
  query t of the block lists row uids[u]). Up = min(q_block * W, n_rows) rounded up to block_rows. For the
  model's windows (consecutive positions) a block needs W + q_block - 1 rows instead of q_block * W.
  """
  B, Sp, W = idx.shape
  nb = Sp // q_block
  x = idx.reshape(B * nb, q_block * W)
  big = jnp.iinfo(jnp.int32).max
  s = jnp.sort(jnp.where(x >= 0, x, big), axis=-1)
  new = (s < big) & jnp.concatenate([jnp.ones_like(s[:, :1], bool), s[:, 1:] != s[:, :-1]], axis=1)
  n_u = jnp.sum(new, axis=1, dtype=jnp.int32)
  Up = -(-min(q_block * W, n_rows) // block_rows) * block_rows
  dest = jnp.where(new, jnp.cumsum(new, axis=1) - 1, Up)                             # Up: dropped
  uids = jnp.zeros((B * nb, Up), jnp.int32).at[jnp.arange(B * nb)[:, None], dest].set(s, mode="drop")
  live = jnp.where(jnp.arange(Up) < n_u[:, None], uids, -2)                           # never equals an id
  count = jnp.sum(idx.reshape(B * nb, q_block, W, 1) == live[:, None, None, :], axis=2, dtype=jnp.int32)
  return uids, n_u, count.astype(F32)


def _tpu_block_kernel(*refs, srcs: tuple[_Source, ...], modes: tuple[str, ...], q_block: int, seq: int,
                      scale: float, p_dtype):
  Tq = q_block
  n_pl = sum(len(src.planes) for src in srcs)
  base_refs, nu_ref, vmax_ref = refs[:n_pl], refs[n_pl], refs[n_pl + 1]
  it = iter(refs[n_pl + 2:])
  ins = []
  for src, mode in zip(srcs, modes):
    a = (next(it),) if mode == "dense" else (next(it), next(it), next(it)) if mode == "union" else (next(it), next(it))
    ins.append((a, [next(it) for _ in src.part_lanes]))
  sink_ref = next(it)                                                               # [M, 1]
  pools = [[next(it) for _ in src.planes] for src in srcs]
  outs = [([next(it) for _ in src.part_lanes], next(it), next(it)) for src in srcs]
  scratch = [[(next(it), next(it)) for _ in src.planes] for src in srcs]
  bases = _by_source(base_refs, srcs)

  b, kb = pl.program_id(0), pl.program_id(1)
  blk = b * pl.num_programs(1) + kb
  M = sink_ref.shape[0]
  H = M // Tq

  def rows_of(t):                                                                   # query t's M rows
    return pl.ds(pl.multiple_of(t * H, 8) if H % 8 == 0 else t * H, H)

  for si, (src, mode) in enumerate(zip(srcs, modes)):
    a, q_refs = ins[si]
    acc_refs, m_ref, l_ref = outs[si]
    bufs = scratch[si]
    plane_io = [(pool, bref[b], buf, sem, plane)
                for pool, bref, (buf, sem), plane in zip(pools[si], bases[si], bufs, src.planes)]
    br = bufs[0][0].shape[1]
    geo = src.geo()
    m_ref[...] = sink_ref[...]
    l_ref[...] = jnp.full((M, 1), 1.0 if si == 0 else 0.0, F32)                       # the sink counts once
    for o in acc_refs:
      o[...] = jnp.zeros(o.shape, F32)

    def gather(slot, row_of, plane_io=plane_io, br=br):         # one DMA per row and plane (line r // P)
      _tpu_dma_rows(plane_io, slot, row_of, br)

    def wait_decode(slot, plane_io=plane_io):                   # all of the chunk's rows, every plane
      return _tpu_wait_decode(plane_io, slot, p_dtype)

    def slots_of(rows, src=src):                                # rows [1, br] -> per plane [1, br] or None
      return [jax.lax.rem(rows, p.pack) if p.pack > 1 else None for p in src.planes]

    if mode == "gather":                 # CSA: query by query, the chunks of all queries in one DMA pipeline
      ids_s, ids_v = a
      nc = src.chunks
      nq = jnp.minimum(Tq, seq - kb * Tq)                                           # padded queries: skipped
      total = nq * nc

      def split(i, nc=nc):
        t = jax.lax.div(i, nc)
        return t, i - t * nc

      def start(i, slot, ids_s=ids_s, br=br, gather=gather, split=split):
        t, c = split(i)
        gather(slot, lambda j: jnp.maximum(ids_s[t, c * br + j], 0))

      @pl.when(total > 0)
      def _():
        start(0, 0)

      def body(i, carry, src=src, q_refs=q_refs, ids_v=ids_v, acc_refs=acc_refs, m_ref=m_ref, l_ref=l_ref,
               br=br, nc=nc, total=total, start=start, wait_decode=wait_decode, split=split, geo=geo,
               slots_of=slots_of):
        t, c = split(i)
        slot = jax.lax.rem(i, 2)

        @pl.when(i + 1 < total)
        def _():
          start(i + 1, 1 - slot)

        parts = wait_decode(slot)
        first = c == 0
        m, l, acc = carry
        m = jnp.where(first, sink_ref[rows_of(t), :], m)
        l = jnp.where(first, 0.0, l)
        acc = [jnp.where(first, 0.0, x) for x in acc]
        ids = ids_v[t, :, pl.ds(pl.multiple_of(c * br, br), br)]                         # [1, br]
        m, l, acc = _online_step((m, l, acc), [r[rows_of(t), :] for r in q_refs], parts, ids >= 0, scale, p_dtype,
                                 geo=geo, slot_rows=slots_of(jnp.maximum(ids, 0)))

        @pl.when(c == nc - 1)
        def _():
          m_ref[rows_of(t), :] = m
          l_ref[rows_of(t), :] = l
          for o, x in zip(acc_refs, acc):
            o[rows_of(t), :] = x
        return m, l, acc

      init = (jnp.zeros((H, 1), F32), jnp.zeros((H, 1), F32), [jnp.zeros((H, n), F32) for n in src.part_lanes])
      jax.lax.fori_loop(0, total, body, init)
      continue

    if mode == "union":                  # the window: the block's distinct rows, each fetched once
      uid_s, uid_v, cnt_ref = a
      n_chunks = jax.lax.div(nu_ref[blk] + br - 1, br)

      def start(c, slot, uid_s=uid_s, br=br, gather=gather):
        gather(slot, lambda j: uid_s[0, c * br + j])

      def weight_of(c, cnt_ref=cnt_ref, uid_v=uid_v, br=br, slots_of=slots_of):
        count = _per_query_rows(cnt_ref[:, pl.ds(pl.multiple_of(c * br, br), br)], H)    # [M, br]
        return count > 0, count, slots_of(jnp.maximum(uid_v[:, pl.ds(pl.multiple_of(c * br, br), br)], 0))
    else:                                # HCA: every visible row, shared; each query masks by its own count
      (vis_ref,) = a
      visible = vmax_ref[blk]
      n_chunks = jnp.minimum(jax.lax.div(visible + br - 1, br), src.chunks)
      # HBM is tiled by 8 rows: a chunk DMA starts on a tile (one-row-a-line planes only)
      aligned = src.rows % 8 == 0 and br % 8 == 0 and not src.packed

      def first_row(c, src=src, br=br, aligned=aligned):
        return jnp.minimum(c * br, src.rows - br) if aligned else c * br

      def start(c, slot, src=src, br=br, aligned=aligned, plane_io=plane_io, gather=gather, first_row=first_row):
        if aligned:
          _tpu_dma_chunk(plane_io, slot, first_row(c))
        else:
          gather(slot, lambda j: jnp.minimum(c * br + j, src.rows - 1))

      def weight_of(c, vis_ref=vis_ref, br=br, first_row=first_row, src=src, slots_of=slots_of):
        e = first_row(c) + jax.lax.broadcasted_iota(jnp.int32, (1, br), 1)
        return (e >= c * br) & (e < vis_ref[...]), None, slots_of(jnp.minimum(e, src.rows - 1))   # [M, br]

    @pl.when(n_chunks > 0)
    def _():
      start(0, 0)

    def body(c, _, q_refs=q_refs, acc_refs=acc_refs, m_ref=m_ref, l_ref=l_ref, n_chunks=n_chunks, start=start,
             wait_decode=wait_decode, weight_of=weight_of, geo=geo):
      slot = jax.lax.rem(c, 2)

      @pl.when(c + 1 < n_chunks)
      def _():
        start(c + 1, 1 - slot)

      parts = wait_decode(slot)
      valid, count, slots = weight_of(c)
      m, l, acc = _online_step((m_ref[...], l_ref[...], [o[...] for o in acc_refs]), [r[...] for r in q_refs],
                               parts, valid, scale, p_dtype, count, geo=geo, slot_rows=slots)
      m_ref[...] = m
      l_ref[...] = l
      for o, x in zip(acc_refs, acc):
        o[...] = x
      return 0

    jax.lax.fori_loop(0, n_chunks, body, 0)


def _call_tpu_blocked(q, sink, srcs, modes, arrays, q_block, seq, scale, block_rows, interpret, vmem_limit):
  from jax.experimental.pallas import tpu as pltpu
  B, Sp, H, _ = q.shape
  Tq = q_block
  nb, M = Sp // Tq, Tq * H
  def per_row(b, k, *_):                                           # [B, Sp*H, x]: the block's M rows
    return b, k, 0

  def per_blk(b, k, *_):                                           # [B*nb, ...]: the block's own
    return b * nb + k, 0, 0

  in_specs, operands, scratch, chunk_rows = [], [], [], []
  n_u = vmax = jnp.zeros((B * nb,), jnp.int32)
  for src, mode, (pools, extra, qparts) in zip(srcs, modes, arrays):
    if mode == "union":
      uids, n_u, count = extra
      Up = uids.shape[-1]
      in_specs += [pl.BlockSpec((None, 1, Up), per_blk, memory_space=pltpu.SMEM),
                   pl.BlockSpec((None, 1, Up), per_blk), pl.BlockSpec((None, Tq, Up), per_blk)]
      operands += [uids.reshape(B * nb, 1, Up), uids.reshape(B * nb, 1, Up), count]
    elif mode == "dense":
      vis, vmax = extra                                                             # [B, Sp], [B*nb]
      in_specs.append(pl.BlockSpec((None, M, 1), per_row))
      operands.append(jnp.repeat(vis, H, axis=1)[..., None])
    else:
      ids = extra                                                                   # [B, Sp, Tp]
      T = ids.shape[-1]
      in_specs += [pl.BlockSpec((None, Tq, T), per_blk, memory_space=pltpu.SMEM),
                   pl.BlockSpec((None, Tq, 1, T), lambda b, k, *_: (b * nb + k, 0, 0, 0))]
      operands += [ids.reshape(B * nb, Tq, T), ids.reshape(B * nb, Tq, 1, T)]
    for qp, lanes in zip(qparts, src.part_lanes):                                   # [B, Sp, H, lanes]
      in_specs.append(pl.BlockSpec((None, M, lanes), per_row))
      operands.append(qp.reshape(B, Sp * H, lanes))
    br = min(block_rows, src.rows) if mode == "dense" else block_rows
    chunk_rows.append(br)
    for plane in src.planes:
      scratch += [pltpu.VMEM((2, br, plane.words), jnp.uint32), pltpu.SemaphoreType.DMA((2,))]
  in_specs.append(pl.BlockSpec((M, 1), lambda b, k, *_: (0, 0)))
  operands.append(jnp.tile(sink.astype(F32), Tq).reshape(M, 1))
  blocked = cost.nbytes(operands)                                  # each block once; the pools below: by DMA
  for pools, _, _ in arrays:
    for pool, _ in pools:
      in_specs.append(pl.BlockSpec(memory_space=pltpu.HBM))        # rows are DMAed from HBM
      operands.append(in_hbm(pool, interpret))
  out_shape, out_specs = [], []
  for src in srcs:
    for w in src.part_lanes + [1, 1]:                                                # acc parts, m, l
      out_shape.append(jax.ShapeDtypeStruct((B, Sp * H, w), F32))
      out_specs.append(pl.BlockSpec((None, M, w), per_row))
  kernel = functools.partial(_tpu_block_kernel, srcs=tuple(srcs), modes=tuple(modes), q_block=Tq, seq=seq,
                             scale=scale, p_dtype=q.dtype)
  bases = [base for pools, _, _ in arrays for _, base in pools]
  fetched, scored_by = _block_rows(srcs, modes, Tq, H, chunk_rows)
  ce = _cost(srcs, fetched, scored_by, B * nb, blocked, out_shape)
  outs = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=len(bases) + 2, grid=(B, nb), in_specs=in_specs,
                                             out_specs=out_specs, scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"),
                                           vmem_limit_bytes=vmem_limit),
      interpret=interpret, cost_estimate=ce,
  )(*bases, n_u, vmax, *operands)
  return [o.reshape(B, Sp, H, -1) for o in outs]


def _gpu_block_kernel(*refs, srcs: tuple[_Source, ...], modes: tuple[str, ...], block_rows: int, seq: int,
                      scale: float, p_dtype):
  n_pl = sum(len(src.planes) for src in srcs)
  it = iter(refs)
  base_ref, nu_ref, vmax_ref = next(it), next(it), next(it)
  ins = []
  for src, mode in zip(srcs, modes):
    a = (next(it), next(it)) if mode == "union" else (next(it),)
    ins.append((a, [next(it) for _ in src.part_lanes]))
  sink_ref = next(it)                                                               # [hb]
  pools = [[next(it) for _ in src.planes] for src in srcs]
  outs = [([next(it) for _ in src.part_lanes], next(it), next(it)) for src in srcs]

  blk = pl.program_id(0)
  Tq, hb = ins[0][1][0].shape[:2]
  M = Tq * hb
  nb = pl.num_programs(0) // (base_ref.shape[0] // n_pl)
  b = blk // nb
  nq = jnp.minimum(Tq, seq - (blk - b * nb) * Tq)
  br = block_rows
  sink = sink_ref[...][:, None]                                                     # [hb, 1]
  j = jax.lax.broadcasted_iota(jnp.int32, (br,), 0)
  k0 = 0
  for si, (src, mode) in enumerate(zip(srcs, modes)):
    a, q_refs = ins[si]
    acc_refs, m_ref, l_ref = outs[si]
    bases = [base_ref[b * n_pl + k0 + i] for i in range(len(src.planes))]
    k0 += len(src.planes)
    geo = src.geo()

    def chunk(rows, src=src, pools=pools[si], bases=bases):
      return _gpu_chunk(src, pools, bases, rows, p_dtype)

    if mode == "gather":                 # CSA: query by query (padded queries: no chunks, the initial state)
      (ids_ref,) = a

      def query(t, _, src=src, ids_ref=ids_ref, q_refs=q_refs, acc_refs=acc_refs, m_ref=m_ref, l_ref=l_ref,
                chunk=chunk, geo=geo):
        qparts = [r[t] for r in q_refs]                                             # [hb, lanes]

        def body(c, carry):
          idx = ids_ref[t, pl.ds(c * br, br)]
          parts, slots = chunk(jnp.maximum(idx, 0))
          return _online_step(carry, qparts, parts, (idx >= 0)[None, :], scale, p_dtype, geo=geo, slot_rows=slots)

        init = (sink, jnp.zeros_like(sink), [jnp.zeros((hb, n), F32) for n in src.part_lanes])
        m, l, acc = jax.lax.fori_loop(0, jnp.where(t < nq, src.chunks, 0), body, init)
        m_ref[t] = m[:, 0]
        l_ref[t] = l[:, 0]
        for o, x in zip(acc_refs, acc):
          o[t] = x
        return 0

      jax.lax.fori_loop(0, Tq, query, 0)
      continue

    qparts = [r[...].reshape(M, n) for r, n in zip(q_refs, src.part_lanes)]         # [M, lanes], query-major
    if mode == "union":                  # the window: the block's distinct rows, each loaded once
      uid_ref, cnt_ref = a
      n_chunks = jax.lax.div(nu_ref[blk] + br - 1, br)

      def body(c, carry, uid_ref=uid_ref, cnt_ref=cnt_ref, qparts=qparts, chunk=chunk, geo=geo):
        parts, slots = chunk(uid_ref[pl.ds(c * br, br)])
        count = _per_query_rows(cnt_ref[:, pl.ds(c * br, br)], hb)                 # [M, br]
        return _online_step(carry, qparts, parts, count > 0, scale, p_dtype, count, geo=geo, slot_rows=slots)
    else:                                # HCA: every visible row, shared; each query masks by its own count
      (vis_ref,) = a
      vis = _per_query_rows(vis_ref[...][:, None], hb)                              # [M, 1]
      n_chunks = jnp.minimum(jax.lax.div(vmax_ref[blk] + br - 1, br), src.chunks)

      def body(c, carry, src=src, vis=vis, qparts=qparts, chunk=chunk, geo=geo):
        e = c * br + j
        parts, slots = chunk(jnp.minimum(e, src.rows - 1))
        return _online_step(carry, qparts, parts, e[None, :] < vis, scale, p_dtype, geo=geo, slot_rows=slots)

    m0 = jnp.broadcast_to(sink[None], (Tq, hb, 1)).reshape(M, 1)
    l0 = jnp.full((M, 1), 1.0 if si == 0 else 0.0, F32)                              # the sink counts once
    m, l, acc = jax.lax.fori_loop(0, n_chunks, body, (m0, l0, [jnp.zeros((M, n), F32) for n in src.part_lanes]))
    m_ref[...] = m.reshape(Tq, hb)
    l_ref[...] = l.reshape(Tq, hb)
    for o, x, n in zip(acc_refs, acc, src.part_lanes):
      o[...] = x.reshape(Tq, hb, n)


def _call_gpu_blocked(q, sink, srcs, modes, arrays, q_block, seq, scale, block_rows, head_block, interpret):
  from jax.experimental.pallas import triton as pltriton
  B, Sp, H, _ = q.shape
  Tq, hb = q_block, head_block
  nb = Sp // Tq
  n_u = vmax = jnp.zeros((B * nb,), jnp.int32)
  in_specs, operands = [], []
  for src, mode, (pools, extra, qparts) in zip(srcs, modes, arrays):
    if mode == "union":
      uids, n_u, count = extra
      in_specs += [pl.BlockSpec((None, uids.shape[-1]), lambda i, h: (i, 0)),
                   pl.BlockSpec((None, Tq, uids.shape[-1]), lambda i, h: (i, 0, 0))]
      operands += [uids, count]
    elif mode == "dense":
      vis, vmax = extra
      in_specs.append(pl.BlockSpec((None, Tq), lambda i, h: (i, 0)))
      operands.append(vis.reshape(B * nb, Tq))
    else:
      T = extra.shape[-1]
      in_specs.append(pl.BlockSpec((None, Tq, T), lambda i, h: (i, 0, 0)))
      operands.append(extra.reshape(B * nb, Tq, T))
    for qp, lanes in zip(qparts, src.part_lanes):
      in_specs.append(pl.BlockSpec((None, Tq, hb, lanes), lambda i, h: (i, 0, h, 0)))
      operands.append(qp.reshape(B * nb, Tq, H, lanes))
  bases = _gpu_bases(arrays)
  in_specs = [pl.BlockSpec(bases.shape, lambda i, h: (0,)), pl.BlockSpec((B * nb,), lambda i, h: (0,)),
              pl.BlockSpec((B * nb,), lambda i, h: (0,))] + in_specs
  operands = [bases, n_u, vmax] + operands
  in_specs.append(pl.BlockSpec((hb,), lambda i, h: (h,)))
  operands.append(sink.astype(F32))
  for pools, _, _ in arrays:
    for pool, _ in pools:
      in_specs.append(pl.BlockSpec(pool.shape, lambda i, h: (0, 0)))
      operands.append(pool)
  out_shape, out_specs = [], []
  for src in srcs:
    for lanes in src.part_lanes:
      out_shape.append(jax.ShapeDtypeStruct((B * nb, Tq, H, lanes), F32))
      out_specs.append(pl.BlockSpec((None, Tq, hb, lanes), lambda i, h: (i, 0, h, 0)))
    for _ in range(2):                                                              # m, l
      out_shape.append(jax.ShapeDtypeStruct((B * nb, Tq, H), F32))
      out_specs.append(pl.BlockSpec((None, Tq, hb), lambda i, h: (i, 0, h)))
  kernel = functools.partial(_gpu_block_kernel, srcs=tuple(srcs), modes=tuple(modes), block_rows=block_rows,
                             seq=seq, scale=scale, p_dtype=q.dtype)
  fetched, scored_by = _block_rows(srcs, modes, Tq, hb, [block_rows] * len(srcs))
  qparts = [qp for _, _, qp in arrays]
  read = cost.nbytes(qparts, sink) + H // hb * cost.nbytes([x for _, x, _ in arrays])   # ids, counts per head block
  ce = _cost(srcs, fetched, scored_by, B * nb * (H // hb), read, out_shape)
  outs = pl.pallas_call(
      kernel, grid=(B * nb, H // hb), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2), interpret=interpret, cost_estimate=ce,
  )(*operands)
  return [o.reshape(B, Sp, H, -1) for o in outs]


def _block_rows(srcs, modes, Tq: int, heads: int, chunk_rows: list[int]):
  """Per source of a block of Tq queries read in chunks of chunk_rows: (rows its loop fetches at most, query
  rows scoring each): the window's and HCA rows are shared by the block's Tq * heads rows; CSA rows are
  fetched query by query, for its heads."""
  fetched, scored_by = [], []
  for src, mode, br in zip(srcs, modes, chunk_rows):
    fetched.append(src.chunks * br * (Tq if mode == "gather" else 1))
    scored_by.append(heads if mode == "gather" else Tq * heads)
  return fetched, scored_by


def _merge_sources(outs, srcs):
  """Per source (acc parts, m, l), each measured from its own m -> o [B, S, H, K] f32 (one division)."""
  i, per = 0, []
  for src in srcs:
    n = len(src.part_lanes)
    per.append((outs[i:i + n], outs[i + n], outs[i + n + 1]))
    i += n + 2
  m = functools.reduce(jnp.maximum, [s[1] for s in per])
  o, l = 0.0, 0.0
  for src, (acc, m_k, l_k) in zip(srcs, per):
    f = jnp.exp(m_k - m)
    l = l + l_k * f
    o = o + _merge(acc, src) * f
  return o / l


# ---- the op -----------------------------------------------------------------------------------------------

def default_q_block(backend: str, heads: int, seq: int, head_block: int = 16) -> int:
  """Queries per program of the prefill kernel: 1 (the per-query kernel) for one query; else a power of two
  whose stacked rows (TPU: q_block * heads; GPU: q_block * head_block) fill the matmul's M dimension
  without outgrowing VMEM / registers, and no larger than the call needs."""
  if seq <= 1:
    return 1
  rows = Q_ROWS_TPU if backend == "tpu" else Q_ROWS_GPU
  per = heads if backend == "tpu" else head_block
  return max(2, min(16, next_pow2(seq), 1 << max(0, (rows // per).bit_length() - 1)))


Q_ROWS_TPU = 1024          # TPU: stacked query rows (q_block * H) per prefill program: Flash 16 queries, Pro 8
Q_ROWS_GPU = 64            # GPU: q_block * head_block per program (4 queries of 16 heads)
VMEM_LIMIT = 48 << 20      # TPU prefill: scoped VMEM (Pro HCA fp8 at 1024 rows needs ~36 MiB; v5e's default is
                           # 16 MiB, v6e's 32 MiB; v5p and v7x have 64 MiB in all)


def sparse_attention(q, attn_sink, scale: float, window: Rows, window_idx, comp: Rows | None = None,
                     comp_idx=None, comp_visible=None, *, backend: str | None = None, interpret: bool | None = None,
                     block_rows: int | None = None, head_block: int = 16, q_block: int | None = None,
                     vmem_limit_bytes: int | None = None):
  """Same arguments and result as `dsv4_jax.ops.sparse_attention_ref` ([B,S,H,K] in q.dtype).

  backend: "tpu" | "gpu" | None (the default device's platform; on CPU, the TPU kernel interpreted).
  block_rows: rows per chunk (default 128 on TPU, 32 on GPU; a power of two on GPU).
  q_block: queries per program. 1 = the per-query (decode) kernel; > 1 = the blocked prefill kernel (a
  power of two on GPU); default `default_q_block` (1 when S == 1).
  """
  backend = backend_for(backend)
  interpret = interpret_mode(backend, interpret)
  B, S, H, K = q.shape
  window = window.natural()     # natural dim order, as the kernel decodes stored rows (attention builds it so:
                                # ops.register(planar_reads=False); a no-op then)
  if block_rows is None:
    block_rows = 128 if backend == "tpu" else 32
  if q_block is None:
    q_block = default_q_block(backend, H, S, head_block)
  check(isinstance(q_block, int) and q_block >= 1, f"sparse_attention: q_block={q_block} must be an int >= 1")
  if backend == "gpu":
    check(next_pow2(head_block) == head_block and head_block >= 16,
          f"sparse_attention (GPU): head_block={head_block} must be a power of two >= 16 (Triton's dot minimum)")
    check(next_pow2(block_rows) == block_rows and block_rows >= 16,
          f"sparse_attention (GPU): block_rows={block_rows} must be a power of two >= 16")
    check(next_pow2(q_block) == q_block, f"sparse_attention (GPU): q_block={q_block} must be a power of two")
    Hp = -(-H // head_block) * head_block                  # heads padded to whole programs (zero queries)
    if Hp != H:
      q = jnp.pad(q, ((0, 0), (0, 0), (0, Hp - H), (0, 0)))
      attn_sink = jnp.pad(attn_sink, (0, Hp - H))
  if q_block > 1:
    if backend == "tpu" and H % 8:                         # each query's rows start on a sublane tile
      q = jnp.pad(q, ((0, 0), (0, 0), (0, -H % 8), (0, 0)))
      attn_sink = jnp.pad(attn_sink, (0, -H % 8))
    o = _sparse_attention_blocked(q, attn_sink, scale, window, window_idx, comp, comp_idx, comp_visible, backend,
                                  interpret, block_rows, head_block, q_block, vmem_limit_bytes)
    return o[:, :, :H]
  sources = [(window, window_idx, None)]
  if comp is not None:
    sources.append((comp, comp_idx, comp_visible if comp_idx is None else None))
  srcs, arrays = [], []
  visible = jnp.zeros((B, S), jnp.int32)
  for rows, idx, vis in sources:
    planes, pools, N = _source_of(rows, backend)
    if vis is not None:                                    # HCA: every visible entry, in contiguous chunks
      n = rows.rows
      br = min(block_rows, N) if backend == "tpu" else block_rows
      src = _Source(planes, N, n, -(-n // br))
      ids = None
      visible = jnp.minimum(vis.astype(jnp.int32), n)
    else:
      T = idx.shape[-1]
      Tp = -(-T // block_rows) * block_rows
      ids = jnp.pad(idx.astype(jnp.int32), ((0, 0), (0, 0), (0, Tp - T)), constant_values=-1)
      src = _Source(planes, N, 0, Tp // block_rows)
    srcs.append(src)
    arrays.append((pools, ids, _split_query(q, src)))

  if backend == "tpu":
    outs = _call_tpu(q, attn_sink, srcs, arrays, visible, scale, block_rows, interpret)
  else:
    outs = _call_gpu(q, attn_sink, srcs, arrays, visible, scale, block_rows, head_block, interpret)
  l = outs[-1]
  o, i = 0.0, 0
  for src in srcs:
    o = o + _merge(outs[i:i + len(src.part_lanes)], src)
    i += len(src.part_lanes)
  return (o / l)[:, :, :H].astype(q.dtype)


def _split_query(q, src: _Source) -> list:
  """q [B,S,H,K] -> one query part [B,S,H,lanes] per part of every plane (a tiled plane's: every slot)."""
  out = []
  for plane in src.planes:
    qp = rowcodec.split_query(q, plane.codec, plane.lanes)                          # [B,S,H,P,lanes]
    out += [qp[..., p, :] for p in range(len(plane.codec.parts))]
  return out


def _merge(acc, src: _Source):
  """Per-part P.V [.., lanes] of every plane -> [.., K] (a tiled plane: the sum over its slots)."""
  o, i = 0.0, 0
  for plane in src.planes:
    n = len(plane.codec.parts)
    o = o + rowcodec.merge_parts(jnp.stack(acc[i:i + n], axis=-2), plane.codec, plane.lanes)
    i += n
  return o


def _sparse_attention_blocked(q, attn_sink, scale, window, window_idx, comp, comp_idx, comp_visible, backend,
                              interpret, block_rows, head_block, q_block, vmem_limit_bytes):
  """The prefill kernel: queries padded to whole blocks of q_block (padded queries list no rows and are
  dropped), the window as each block's set of rows, HCA rows shared by the block, CSA rows per query."""
  B, S = q.shape[:2]
  Tq = q_block
  Sp = -(-S // Tq) * Tq
  nb = Sp // Tq
  pad_s = ((0, 0), (0, Sp - S))
  q = jnp.pad(q, pad_s + ((0, 0), (0, 0)))
  sources = [(window, window_idx, None)]
  if comp is not None:
    sources.append((comp, comp_idx, comp_visible if comp_idx is None else None))
  srcs, modes, arrays = [], [], []
  for k, (rows, idx, vis) in enumerate(sources):
    planes, pools, N = _source_of(rows, backend)
    if vis is not None:                                    # HCA: every visible entry, shared by the block
      n = rows.rows
      br = min(block_rows, N) if backend == "tpu" else block_rows
      src, mode = _Source(planes, N, n, -(-n // br)), "dense"
      vis = jnp.pad(jnp.minimum(vis.astype(jnp.int32), n), pad_s)
      extra = (vis, jnp.max(vis.reshape(B * nb, Tq), axis=1))
    elif k == 0:                                           # the window: each block's set of rows
      idx = jnp.pad(idx.astype(jnp.int32), pad_s + ((0, 0),), constant_values=-1)
      extra = window_union(idx, Tq, N, block_rows)
      src, mode = _Source(planes, N, 0, extra[0].shape[-1] // block_rows), "union"
    else:                                                  # CSA: each query's own rows
      T = idx.shape[-1]
      Tp = -(-T // block_rows) * block_rows
      extra = jnp.pad(idx.astype(jnp.int32), pad_s + ((0, Tp - T),), constant_values=-1)
      src, mode = _Source(planes, N, 0, Tp // block_rows), "gather"
    srcs.append(src)
    modes.append(mode)
    arrays.append((pools, extra, _split_query(q, src)))
  if backend == "tpu":
    outs = _call_tpu_blocked(q, attn_sink, srcs, modes, arrays, Tq, S, scale, block_rows, interpret,
                             vmem_limit_bytes or VMEM_LIMIT)
  else:
    outs = _call_gpu_blocked(q, attn_sink, srcs, modes, arrays, Tq, S, scale, block_rows, head_block, interpret)
  return _merge_sources([o[:, :S] for o in outs], srcs).astype(q.dtype)


# ---- deviceless compile cases (pallas_kernels/aot.py) ------------------------------------------------------

def _aot_case(H: int, B: int, S: int, fmt: str, source: str, context: int, topk: int = 512, K: int = 512,
              r: int = 64, window: int = 128):
  """A TPU compile case at a model's real shapes: S queries of a cached step over `context` tokens, the
  compressed store as a stacked group of 2 layers of `fmt` rows, in the cache's lane-dense geometry (fp8:
  [values | scales] lines and RoPE lines 4 to a line)."""
  from dsv4_jax import kv_format
  lay = kv_format.Layout(fmt, K, r) if fmt == "fp8" else kv_format.Layout(fmt, K)
  N = context // (4 if source == "csa" else 128)
  planes = kv_format.lane_dense(lay)
  store = jax.eval_shape(lambda: kv_format.empty((2, B), N, lay, planes))
  sds = jax.ShapeDtypeStruct
  args = (sds((B, S, H, K), jnp.bfloat16), sds((H,), F32), sds((B, window + S, K), jnp.bfloat16),
          sds((B, S, window), jnp.int32), store.words, store.tail if store.tail is not None else store.words,
          sds((), jnp.int32), sds((B, S, topk), jnp.int32) if source == "csa" else sds((B, S), jnp.int32))

  def fn(q, sink, win, widx, words, tail, rep, sel):
    comp = Rows(words, lay, rep, N, tail=tail if len(planes) > 1 else None, planes=planes)
    kw = dict(comp_idx=sel) if source == "csa" else dict(comp_visible=sel)
    return sparse_attention(q, sink, 512 ** -0.5, Rows(win), widx, comp, backend="tpu", interpret=False, **kw)
  return fn, args


# Flash: 64 heads; Pro: 128; both K = 512, top-512, window 128. Decode at batch 1 and 32 over 128K tokens,
# prefill one 512-query chunk; the paper's fp8 rows, and bf16 rows.
AOT_CASES = [
    ("flash_decode_b1_csa_fp8_128k", *_aot_case(64, 1, 1, "fp8", "csa", 131072)),
    ("flash_decode_b1_hca_fp8_1m", *_aot_case(64, 1, 1, "fp8", "hca", 1 << 20)),
    ("flash_decode_b32_csa_fp8_128k", *_aot_case(64, 32, 1, "fp8", "csa", 131072)),
    ("flash_prefill_s512_csa_fp8_8k", *_aot_case(64, 1, 512, "fp8", "csa", 8192)),
    ("flash_prefill_s512_hca_bf16_128k", *_aot_case(64, 1, 512, "bfloat16", "hca", 131072)),
    ("pro_prefill_s512_hca_fp8_128k", *_aot_case(128, 1, 512, "fp8", "hca", 131072)),     # the most VMEM
    ("pro_decode_b1_csa_fp8_128k", *_aot_case(128, 1, 1, "fp8", "csa", 131072)),
    ("pro_decode_b8_csa_bf16_128k", *_aot_case(128, 8, 1, "bfloat16", "csa", 131072)),
]
