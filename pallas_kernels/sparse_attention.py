"""Sparse multi-query attention with a per-head sink over gathered rows, as Pallas kernels.

Reference (must equal): `dsv4_jax.ops.sparse_attention_ref`. For each query (b, s) and head h,

    o = sum_j e^{z_j} v_j / (e^{sink_h} + sum_j e^{z_j}),   z_j = scale * q . k_j,   k_j = v_j,

over the rows of up to two *sources*: the window (gathered by index, -1 = masked) and the compressed
entries, either gathered by the indexer's top-k (CSA) or every entry i < visible[b, s] (HCA, read as
contiguous chunks). Rows are read where they are stored, as uint32 words (dsv4_jax/kv_format.py: bf16,
fp32, or the paper's fp8 + e8m0 scales + bf16 RoPE), and decoded in the kernel (`rowcodec`).

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
       stay in HBM and each chunk of `block_rows` rows is fetched by one DMA per row (gather) or one DMA
       per chunk (HCA), double-buffered, waited once per chunk. The prefill state lives in the output
       blocks (VMEM), which serve as the accumulators.
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
from pallas_kernels import rowcodec
from pallas_kernels.platform import backend_for, check, interpret_mode, next_pow2

F32 = jnp.float32
NEG = -1e30                  # masked logit: finite, so exp(NEG - m) is 0 without NaNs


@dataclasses.dataclass(frozen=True)
class _Source:
  """One row pool as the kernel sees it (static parts only; arrays travel separately)."""
  codec: rowcodec.Codec
  words: int             # stored words per row
  lanes: int             # lanes the kernel decodes (TPU: words; Triton: next power of two)
  rows: int              # rows per (layer, sequence) in the pool
  dense: int             # HCA: rows considered (read in contiguous chunks); 0 = gathered by index
  chunks: int            # chunks of the index row (gathered) or of `dense` rows


def _online_step(carry, qparts, parts, valid, scale: float, p_dtype, count=None):
  """One chunk of the online softmax. carry = (m [M,1], l [M,1], acc [list of [M, lanes]]);
  qparts/parts: per part [M, lanes] / [rows, lanes] f32; valid [1 or M, rows] bool; count (optional,
  [M, rows] f32): how many times each query lists each row (a row listed twice counts twice)."""
  m, l, acc = carry
  z = sum(jax.lax.dot_general(qp, kp, (((1,), (1,)), ((), ())), preferred_element_type=F32)
          for qp, kp in zip(qparts, parts)) * scale                                   # [M, rows]
  z = jnp.where(valid, z, NEG)
  m_new = jnp.maximum(m, jnp.max(z, axis=1, keepdims=True))
  alpha = jnp.exp(m - m_new)
  p = jnp.exp(z - m_new)
  pr = p.astype(p_dtype).astype(F32)
  if count is not None:
    p, pr = p * count, pr * count
  l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
  acc = [alpha * a + jnp.dot(pr, kp, preferred_element_type=F32) for a, kp in zip(acc, parts)]
  return m_new, l, acc


def _per_query_rows(x, heads: int):
  """[Tq, n] per query -> [Tq * heads, n], the rows of the block's stacked heads (query-major)."""
  Tq, n = x.shape
  return jnp.broadcast_to(x[:, None, :], (Tq, heads, n)).reshape(Tq * heads, n)


# ---- TPU (Mosaic) ---------------------------------------------------------------------------------------

def _tpu_kernel(*refs, srcs: tuple[_Source, ...], block_rows: int, scale: float, p_dtype):
  from jax.experimental.pallas import tpu as pltpu
  n_src = len(srcs)
  base_refs, vis_ref = refs[:n_src], refs[n_src]
  it = iter(refs[n_src + 1:])
  ins = []
  for src in srcs:
    ids_s = None if src.dense else next(it)
    ids_v = None if src.dense else next(it)
    qp = [next(it) for _ in src.codec.parts]
    ins.append((ids_s, ids_v, qp))
  sink_ref = next(it)
  pools = [next(it) for _ in srcs]
  outs = [[next(it) for _ in src.codec.parts] for src in srcs]
  l_ref = next(it)
  scratch = [(next(it), next(it)) for _ in srcs]

  b, s = pl.program_id(0), pl.program_id(1)
  sink = sink_ref[...]                                                              # [H, 1]
  m, l = sink, jnp.ones_like(sink)
  finals = []
  for k, src in enumerate(srcs):
    ids_s, ids_v, qp_refs = ins[k]
    buf, sem = scratch[k]
    pool, base = pools[k], base_refs[k][b]
    qparts = [r[...] for r in qp_refs]
    H = qparts[0].shape[0]
    br = buf.shape[1]

    if src.dense:
      visible = vis_ref[b, s]
      n_chunks = jnp.minimum(jax.lax.div(visible + br - 1, br), src.chunks)

      aligned = src.rows % 8 == 0 and br % 8 == 0      # HBM is tiled by 8 rows: a chunk DMA starts on a tile

      def first_row(c):
        return jnp.minimum(c * br, src.rows - br) if aligned else c * br

      def start(c, slot):
        if aligned:
          r0 = pl.multiple_of(base + first_row(c), 8)
          pltpu.make_async_copy(pool.at[pl.ds(r0, br)], buf.at[slot], sem.at[slot]).start()
        else:                                             # one DMA per row
          @pl.loop(0, br)
          def _(j):
            r = base + jnp.minimum(c * br + j, src.rows - 1)
            pltpu.make_async_copy(pool.at[pl.ds(r, 1)], buf.at[slot, pl.ds(j, 1)], sem.at[slot]).start()

      def valid_of(c):
        e = first_row(c) + jax.lax.broadcasted_iota(jnp.int32, (1, br), 1)
        return (e >= c * br) & (e < visible)
    else:
      n_chunks = src.chunks

      def start(c, slot):
        @pl.loop(0, br)
        def _(j):
          r = base + jnp.maximum(ids_s[0, c * br + j], 0)
          pltpu.make_async_copy(pool.at[pl.ds(r, 1)], buf.at[slot, pl.ds(j, 1)], sem.at[slot]).start()

      def valid_of(c):
        return ids_v[:, pl.ds(pl.multiple_of(c * br, br), br)] >= 0                 # [1, br]

    @pl.when(n_chunks > 0)
    def _():
      start(0, 0)

    def body(c, carry):
      slot = jax.lax.rem(c, 2)

      @pl.when(c + 1 < n_chunks)
      def _():
        start(c + 1, 1 - slot)

      pltpu.make_async_copy(buf.at[slot], buf.at[slot], sem.at[slot]).wait()     # all of the chunk's rows
      parts = rowcodec.decode_parts(buf[slot], src.codec, p_dtype)
      return _online_step(carry, qparts, parts, valid_of(c), scale, p_dtype)

    zeros = [jnp.zeros((H, src.lanes), F32) for _ in src.codec.parts]
    m, l, acc = jax.lax.fori_loop(0, n_chunks, body, (m, l, zeros))
    finals.append((m, acc))
  for (m_k, acc), out_refs in zip(finals, outs):
    for a, o in zip(acc, out_refs):
      o[...] = a * jnp.exp(m_k - m)
  l_ref[...] = l


def _call_tpu(q, sink, srcs, arrays, visible, scale, block_rows, interpret):
  from jax.experimental.pallas import tpu as pltpu
  B, S, H, _ = q.shape
  in_specs, operands, scratch = [], [], []
  for src, (pool, base, ids, qparts) in zip(srcs, arrays):
    if not src.dense:
      T = ids.shape[-1]
      flat = ids.reshape(B * S, 1, T)
      in_specs += [pl.BlockSpec((None, 1, T), lambda b, s, *_: (b * S + s, 0, 0), memory_space=pltpu.SMEM),
                   pl.BlockSpec((None, 1, T), lambda b, s, *_: (b * S + s, 0, 0))]
      operands += [flat, flat]
    for qp in qparts:                                                               # [B, S, H, lanes]
      in_specs.append(pl.BlockSpec((None, None, H, src.lanes), lambda b, s, *_: (b, s, 0, 0)))
      operands.append(qp)
    br = min(block_rows, src.rows) if src.dense else block_rows
    scratch += [pltpu.VMEM((2, br, src.words), jnp.uint32), pltpu.SemaphoreType.DMA((2,))]
  in_specs.append(pl.BlockSpec((H, 1), lambda b, s, *_: (0, 0)))
  operands.append(sink.astype(F32).reshape(H, 1))
  for _ in srcs:
    in_specs.append(pl.BlockSpec(memory_space=pltpu.HBM))          # rows are DMAed from HBM
  operands += [a[0] for a in arrays]
  out_shape, out_specs = [], []
  for src in srcs:
    for _ in src.codec.parts:
      out_shape.append(jax.ShapeDtypeStruct((B, S, H, src.lanes), F32))
      out_specs.append(pl.BlockSpec((None, None, H, src.lanes), lambda b, s, *_: (b, s, 0, 0)))
  out_shape.append(jax.ShapeDtypeStruct((B, S, H, 1), F32))
  out_specs.append(pl.BlockSpec((None, None, H, 1), lambda b, s, *_: (b, s, 0, 0)))
  kernel = functools.partial(_tpu_kernel, srcs=tuple(srcs), block_rows=block_rows, scale=scale, p_dtype=q.dtype)
  n_prefetch = len(srcs) + 1
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=n_prefetch, grid=(B, S), in_specs=in_specs,
                                             out_specs=out_specs, scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=interpret,
  )(*[a[1] for a in arrays], visible, *operands)


# ---- GPU (Triton) ---------------------------------------------------------------------------------------

def _gpu_kernel(*refs, srcs: tuple[_Source, ...], block_rows: int, scale: float, p_dtype, seq: int):
  from jax.experimental.pallas import triton as pltriton
  n_src = len(srcs)
  it = iter(refs)
  base_ref, vis_ref = next(it), next(it)
  ins = []
  for src in srcs:
    ids = None if src.dense else next(it)
    qp = [next(it) for _ in src.codec.parts]
    ins.append((ids, qp))
  sink_ref = next(it)
  pools = [next(it) for _ in srcs]
  outs = [[next(it) for _ in src.codec.parts] for src in srcs]
  l_ref = next(it)

  bs = pl.program_id(0)
  b = bs // seq
  sink = sink_ref[...][:, None]                                                     # [Hb, 1]
  m, l = sink, jnp.ones_like(sink)
  finals = []
  br = block_rows
  for k, src in enumerate(srcs):
    ids, qp_refs = ins[k]
    pool = pools[k]
    base = base_ref[b * n_src + k]
    qparts = [r[...] for r in qp_refs]
    cols = jax.lax.broadcasted_iota(jnp.int32, (br, src.lanes), 1)
    j = jax.lax.broadcasted_iota(jnp.int32, (br,), 0)
    if src.dense:
      visible = vis_ref[bs]
      n_chunks = jnp.minimum(jax.lax.div(visible + br - 1, br), src.chunks)
    else:
      n_chunks = src.chunks

    def body(c, carry, src=src, ids=ids, pool=pool, base=base, qparts=qparts, cols=cols, j=j):
      if src.dense:
        e = c * br + j
        valid = e < visible
        r = base + jnp.minimum(e, src.rows - 1)
      else:
        idx = ids[pl.ds(c * br, br)]
        valid = idx >= 0
        r = base + jnp.maximum(idx, 0)
      words = pltriton.load(pool.at[r[:, None], cols], mask=cols < src.words, other=0)
      parts = rowcodec.decode_parts(words, src.codec, p_dtype)
      return _online_step(carry, qparts, parts, valid[None, :], scale, p_dtype)

    zeros = [jnp.zeros((qparts[0].shape[0], src.lanes), F32) for _ in src.codec.parts]
    m, l, acc = jax.lax.fori_loop(0, n_chunks, body, (m, l, zeros))
    finals.append((m, acc))
  for (m_k, acc), out_refs in zip(finals, outs):
    for a, o in zip(acc, out_refs):
      o[...] = a * jnp.exp(m_k - m)
  l_ref[...] = l[:, 0]


def _call_gpu(q, sink, srcs, arrays, visible, scale, block_rows, head_block, interpret):
  from jax.experimental.pallas import triton as pltriton
  B, S, H, _ = q.shape
  hb = head_block
  in_specs, operands = [], []
  bases = jnp.stack([a[1] for a in arrays], axis=1).reshape(-1)                   # [B * n_src]
  in_specs += [pl.BlockSpec(bases.shape, lambda i, h: (0,)),
               pl.BlockSpec((B * S,), lambda i, h: (0,))]
  operands += [bases, visible.reshape(B * S)]
  for src, (pool, base, ids, qparts) in zip(srcs, arrays):
    if not src.dense:
      T = ids.shape[-1]
      in_specs.append(pl.BlockSpec((None, T), lambda i, h: (i, 0)))
      operands.append(ids.reshape(B * S, T))
    for qp in qparts:
      in_specs.append(pl.BlockSpec((None, hb, src.lanes), lambda i, h: (i, h, 0)))
      operands.append(qp.reshape(B * S, H, src.lanes))
  in_specs.append(pl.BlockSpec((hb,), lambda i, h: (h,)))
  operands.append(sink.astype(F32))
  for src, a in zip(srcs, arrays):
    in_specs.append(pl.BlockSpec(a[0].shape, lambda i, h: (0, 0)))
    operands.append(a[0])
  out_shape, out_specs = [], []
  for src in srcs:
    for _ in src.codec.parts:
      out_shape.append(jax.ShapeDtypeStruct((B * S, H, src.lanes), F32))
      out_specs.append(pl.BlockSpec((None, hb, src.lanes), lambda i, h: (i, h, 0)))
  out_shape.append(jax.ShapeDtypeStruct((B * S, H), F32))
  out_specs.append(pl.BlockSpec((None, hb), lambda i, h: (i, h)))
  kernel = functools.partial(_gpu_kernel, srcs=tuple(srcs), block_rows=block_rows, scale=scale, p_dtype=q.dtype,
                             seq=S)
  outs = pl.pallas_call(
      kernel, grid=(B * S, H // hb), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2), interpret=interpret,
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
  from jax.experimental.pallas import tpu as pltpu
  n_src, Tq = len(srcs), q_block
  base_refs, nu_ref, vmax_ref = refs[:n_src], refs[n_src], refs[n_src + 1]
  it = iter(refs[n_src + 2:])
  ins = []
  for src, mode in zip(srcs, modes):
    a = (next(it),) if mode == "dense" else (next(it), next(it))
    ins.append((a, [next(it) for _ in src.codec.parts]))
  sink_ref = next(it)                                                               # [M, 1]
  pools = [next(it) for _ in srcs]
  outs = [([next(it) for _ in src.codec.parts], next(it), next(it)) for src in srcs]
  scratch = [(next(it), next(it)) for _ in srcs]

  b, kb = pl.program_id(0), pl.program_id(1)
  blk = b * pl.num_programs(1) + kb
  M = sink_ref.shape[0]
  H = M // Tq

  def rows_of(t):                                                                   # query t's M rows
    return pl.ds(pl.multiple_of(t * H, 8) if H % 8 == 0 else t * H, H)

  for si, (src, mode) in enumerate(zip(srcs, modes)):
    a, q_refs = ins[si]
    acc_refs, m_ref, l_ref = outs[si]
    buf, sem = scratch[si]
    pool, base = pools[si], base_refs[si][b]
    br = buf.shape[1]
    m_ref[...] = sink_ref[...]
    l_ref[...] = jnp.full((M, 1), 1.0 if si == 0 else 0.0, F32)                       # the sink counts once
    for o in acc_refs:
      o[...] = jnp.zeros(o.shape, F32)

    def gather(slot, row_of, pool=pool, base=base, buf=buf, sem=sem, br=br):        # one DMA per row
      @pl.loop(0, br)
      def _(j):
        r = base + row_of(j)
        pltpu.make_async_copy(pool.at[pl.ds(r, 1)], buf.at[slot, pl.ds(j, 1)], sem.at[slot]).start()

    def wait(slot, buf=buf, sem=sem):
      pltpu.make_async_copy(buf.at[slot], buf.at[slot], sem.at[slot]).wait()       # all of the chunk's rows

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
               buf=buf, br=br, nc=nc, total=total, start=start, wait=wait, split=split):
        t, c = split(i)
        slot = jax.lax.rem(i, 2)

        @pl.when(i + 1 < total)
        def _():
          start(i + 1, 1 - slot)

        wait(slot)
        parts = rowcodec.decode_parts(buf[slot], src.codec, p_dtype)
        first = c == 0
        m, l, acc = carry
        m = jnp.where(first, sink_ref[rows_of(t), :], m)
        l = jnp.where(first, 0.0, l)
        acc = [jnp.where(first, 0.0, x) for x in acc]
        valid = ids_v[t, :, pl.ds(pl.multiple_of(c * br, br), br)] >= 0                  # [1, br]
        m, l, acc = _online_step((m, l, acc), [r[rows_of(t), :] for r in q_refs], parts, valid, scale, p_dtype)

        @pl.when(c == nc - 1)
        def _():
          m_ref[rows_of(t), :] = m
          l_ref[rows_of(t), :] = l
          for o, x in zip(acc_refs, acc):
            o[rows_of(t), :] = x
        return m, l, acc

      init = (jnp.zeros((H, 1), F32), jnp.zeros((H, 1), F32), [jnp.zeros((H, src.lanes), F32) for _ in acc_refs])
      jax.lax.fori_loop(0, total, body, init)
      continue

    if mode == "union":                  # the window: the block's distinct rows, each fetched once
      uid_s, cnt_ref = a
      n_chunks = jax.lax.div(nu_ref[blk] + br - 1, br)

      def start(c, slot, uid_s=uid_s, br=br, gather=gather):
        gather(slot, lambda j: uid_s[0, c * br + j])

      def weight_of(c, cnt_ref=cnt_ref, br=br):
        count = _per_query_rows(cnt_ref[:, pl.ds(pl.multiple_of(c * br, br), br)], H)    # [M, br]
        return count > 0, count
    else:                                # HCA: every visible row, shared; each query masks by its own count
      (vis_ref,) = a
      visible = vmax_ref[blk]
      n_chunks = jnp.minimum(jax.lax.div(visible + br - 1, br), src.chunks)
      aligned = src.rows % 8 == 0 and br % 8 == 0      # HBM is tiled by 8 rows: a chunk DMA starts on a tile

      def first_row(c, src=src, br=br, aligned=aligned):
        return jnp.minimum(c * br, src.rows - br) if aligned else c * br

      def start(c, slot, src=src, br=br, aligned=aligned, pool=pool, base=base, buf=buf, sem=sem, gather=gather,
                first_row=first_row):
        if aligned:
          r0 = pl.multiple_of(base + first_row(c), 8)
          pltpu.make_async_copy(pool.at[pl.ds(r0, br)], buf.at[slot], sem.at[slot]).start()
        else:
          gather(slot, lambda j: jnp.minimum(c * br + j, src.rows - 1))

      def weight_of(c, vis_ref=vis_ref, br=br, first_row=first_row):
        e = first_row(c) + jax.lax.broadcasted_iota(jnp.int32, (1, br), 1)
        return (e >= c * br) & (e < vis_ref[...]), None                                  # [M, br]

    @pl.when(n_chunks > 0)
    def _():
      start(0, 0)

    def body(c, _, src=src, q_refs=q_refs, acc_refs=acc_refs, m_ref=m_ref, l_ref=l_ref, buf=buf,
             n_chunks=n_chunks, start=start, wait=wait, weight_of=weight_of):
      slot = jax.lax.rem(c, 2)

      @pl.when(c + 1 < n_chunks)
      def _():
        start(c + 1, 1 - slot)

      wait(slot)
      parts = rowcodec.decode_parts(buf[slot], src.codec, p_dtype)
      valid, count = weight_of(c)
      m, l, acc = _online_step((m_ref[...], l_ref[...], [o[...] for o in acc_refs]), [r[...] for r in q_refs],
                               parts, valid, scale, p_dtype, count)
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

  in_specs, operands, scratch = [], [], []
  n_u = vmax = jnp.zeros((B * nb,), jnp.int32)
  for src, mode, (pool, base, extra, qparts) in zip(srcs, modes, arrays):
    if mode == "union":
      uids, n_u, count = extra
      Up = uids.shape[-1]
      in_specs += [pl.BlockSpec((None, 1, Up), per_blk, memory_space=pltpu.SMEM),
                   pl.BlockSpec((None, Tq, Up), per_blk)]
      operands += [uids.reshape(B * nb, 1, Up), count]
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
    for qp in qparts:                                                               # [B, Sp, H, lanes]
      in_specs.append(pl.BlockSpec((None, M, src.lanes), per_row))
      operands.append(qp.reshape(B, Sp * H, src.lanes))
    br = min(block_rows, src.rows) if mode == "dense" else block_rows
    scratch += [pltpu.VMEM((2, br, src.words), jnp.uint32), pltpu.SemaphoreType.DMA((2,))]
  in_specs.append(pl.BlockSpec((M, 1), lambda b, k, *_: (0, 0)))
  operands.append(jnp.tile(sink.astype(F32), Tq).reshape(M, 1))
  for _ in srcs:
    in_specs.append(pl.BlockSpec(memory_space=pltpu.HBM))          # rows are DMAed from HBM
  operands += [a[0] for a in arrays]
  out_shape, out_specs = [], []
  for src in srcs:
    for w in [src.lanes] * len(src.codec.parts) + [1, 1]:                           # acc parts, m, l
      out_shape.append(jax.ShapeDtypeStruct((B, Sp * H, w), F32))
      out_specs.append(pl.BlockSpec((None, M, w), per_row))
  kernel = functools.partial(_tpu_block_kernel, srcs=tuple(srcs), modes=tuple(modes), q_block=Tq, seq=seq,
                             scale=scale, p_dtype=q.dtype)
  outs = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=len(srcs) + 2, grid=(B, nb), in_specs=in_specs,
                                             out_specs=out_specs, scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"),
                                           vmem_limit_bytes=vmem_limit),
      interpret=interpret,
  )(*[a[1] for a in arrays], n_u, vmax, *operands)
  return [o.reshape(B, Sp, H, -1) for o in outs]


def _gpu_block_kernel(*refs, srcs: tuple[_Source, ...], modes: tuple[str, ...], block_rows: int, seq: int,
                      scale: float, p_dtype):
  from jax.experimental.pallas import triton as pltriton
  n_src = len(srcs)
  it = iter(refs)
  base_ref, nu_ref, vmax_ref = next(it), next(it), next(it)
  ins = []
  for src, mode in zip(srcs, modes):
    a = (next(it), next(it)) if mode == "union" else (next(it),)
    ins.append((a, [next(it) for _ in src.codec.parts]))
  sink_ref = next(it)                                                               # [hb]
  pools = [next(it) for _ in srcs]
  outs = [([next(it) for _ in src.codec.parts], next(it), next(it)) for src in srcs]

  blk = pl.program_id(0)
  Tq, hb = ins[0][1][0].shape[:2]
  M = Tq * hb
  nb = pl.num_programs(0) // (base_ref.shape[0] // n_src)
  b = blk // nb
  nq = jnp.minimum(Tq, seq - (blk - b * nb) * Tq)
  br = block_rows
  sink = sink_ref[...][:, None]                                                     # [hb, 1]
  j = jax.lax.broadcasted_iota(jnp.int32, (br,), 0)
  for si, (src, mode) in enumerate(zip(srcs, modes)):
    a, q_refs = ins[si]
    acc_refs, m_ref, l_ref = outs[si]
    pool = pools[si]
    base = base_ref[b * n_src + si]
    cols = jax.lax.broadcasted_iota(jnp.int32, (br, src.lanes), 1)

    def load(r, pool=pool, cols=cols, src=src):
      return pltriton.load(pool.at[r[:, None], cols], mask=cols < src.words, other=0)

    if mode == "gather":                 # CSA: query by query (padded queries: no chunks, the initial state)
      (ids_ref,) = a

      def query(t, _, src=src, ids_ref=ids_ref, q_refs=q_refs, acc_refs=acc_refs, m_ref=m_ref, l_ref=l_ref,
                base=base, load=load):
        qparts = [r[t] for r in q_refs]                                             # [hb, lanes]

        def body(c, carry):
          idx = ids_ref[t, pl.ds(c * br, br)]
          parts = rowcodec.decode_parts(load(base + jnp.maximum(idx, 0)), src.codec, p_dtype)
          return _online_step(carry, qparts, parts, (idx >= 0)[None, :], scale, p_dtype)

        init = (sink, jnp.zeros_like(sink), [jnp.zeros((hb, src.lanes), F32) for _ in acc_refs])
        m, l, acc = jax.lax.fori_loop(0, jnp.where(t < nq, src.chunks, 0), body, init)
        m_ref[t] = m[:, 0]
        l_ref[t] = l[:, 0]
        for o, x in zip(acc_refs, acc):
          o[t] = x
        return 0

      jax.lax.fori_loop(0, Tq, query, 0)
      continue

    qparts = [r[...].reshape(M, src.lanes) for r in q_refs]                         # [M, lanes], query-major
    if mode == "union":                  # the window: the block's distinct rows, each loaded once
      uid_ref, cnt_ref = a
      n_chunks = jax.lax.div(nu_ref[blk] + br - 1, br)

      def body(c, carry, src=src, uid_ref=uid_ref, cnt_ref=cnt_ref, qparts=qparts, base=base, load=load):
        parts = rowcodec.decode_parts(load(base + uid_ref[pl.ds(c * br, br)]), src.codec, p_dtype)
        count = _per_query_rows(cnt_ref[:, pl.ds(c * br, br)], hb)                 # [M, br]
        return _online_step(carry, qparts, parts, count > 0, scale, p_dtype, count)
    else:                                # HCA: every visible row, shared; each query masks by its own count
      (vis_ref,) = a
      vis = _per_query_rows(vis_ref[...][:, None], hb)                              # [M, 1]
      n_chunks = jnp.minimum(jax.lax.div(vmax_ref[blk] + br - 1, br), src.chunks)

      def body(c, carry, src=src, vis=vis, qparts=qparts, base=base, load=load):
        e = c * br + j
        parts = rowcodec.decode_parts(load(base + jnp.minimum(e, src.rows - 1)), src.codec, p_dtype)
        return _online_step(carry, qparts, parts, e[None, :] < vis, scale, p_dtype)

    m0 = jnp.broadcast_to(sink[None], (Tq, hb, 1)).reshape(M, 1)
    l0 = jnp.full((M, 1), 1.0 if si == 0 else 0.0, F32)                              # the sink counts once
    m, l, acc = jax.lax.fori_loop(0, n_chunks, body, (m0, l0, [jnp.zeros((M, src.lanes), F32) for _ in acc_refs]))
    m_ref[...] = m.reshape(Tq, hb)
    l_ref[...] = l.reshape(Tq, hb)
    for o, x in zip(acc_refs, acc):
      o[...] = x.reshape(Tq, hb, src.lanes)


def _call_gpu_blocked(q, sink, srcs, modes, arrays, q_block, seq, scale, block_rows, head_block, interpret):
  from jax.experimental.pallas import triton as pltriton
  B, Sp, H, _ = q.shape
  Tq, hb = q_block, head_block
  nb = Sp // Tq
  n_u = vmax = jnp.zeros((B * nb,), jnp.int32)
  in_specs, operands = [], []
  for src, mode, (pool, base, extra, qparts) in zip(srcs, modes, arrays):
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
    for qp in qparts:
      in_specs.append(pl.BlockSpec((None, Tq, hb, src.lanes), lambda i, h: (i, 0, h, 0)))
      operands.append(qp.reshape(B * nb, Tq, H, src.lanes))
  bases = jnp.stack([a[1] for a in arrays], axis=1).reshape(-1)                   # [B * n_src]
  in_specs = [pl.BlockSpec(bases.shape, lambda i, h: (0,)), pl.BlockSpec((B * nb,), lambda i, h: (0,)),
              pl.BlockSpec((B * nb,), lambda i, h: (0,))] + in_specs
  operands = [bases, n_u, vmax] + operands
  in_specs.append(pl.BlockSpec((hb,), lambda i, h: (h,)))
  operands.append(sink.astype(F32))
  for src, a in zip(srcs, arrays):
    in_specs.append(pl.BlockSpec(a[0].shape, lambda i, h: (0, 0)))
    operands.append(a[0])
  out_shape, out_specs = [], []
  for src in srcs:
    for _ in src.codec.parts:
      out_shape.append(jax.ShapeDtypeStruct((B * nb, Tq, H, src.lanes), F32))
      out_specs.append(pl.BlockSpec((None, Tq, hb, src.lanes), lambda i, h: (i, 0, h, 0)))
    for _ in range(2):                                                              # m, l
      out_shape.append(jax.ShapeDtypeStruct((B * nb, Tq, H), F32))
      out_specs.append(pl.BlockSpec((None, Tq, hb), lambda i, h: (i, 0, h)))
  kernel = functools.partial(_gpu_block_kernel, srcs=tuple(srcs), modes=tuple(modes), block_rows=block_rows,
                             seq=seq, scale=scale, p_dtype=q.dtype)
  outs = pl.pallas_call(
      kernel, grid=(B * nb, H // hb), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2), interpret=interpret,
  )(*operands)
  return [o.reshape(B, Sp, H, -1) for o in outs]


def _merge_sources(outs, srcs):
  """Per source (acc parts, m, l), each measured from its own m -> o [B, S, H, K] f32 (one division)."""
  i, per = 0, []
  for src in srcs:
    n = len(src.codec.parts)
    per.append((outs[i:i + n], outs[i + n], outs[i + n + 1]))
    i += n + 2
  m = functools.reduce(jnp.maximum, [s[1] for s in per])
  o, l = 0.0, 0.0
  for src, (acc, m_k, l_k) in zip(srcs, per):
    f = jnp.exp(m_k - m)
    l = l + l_k * f
    o = o + rowcodec.merge_parts(jnp.stack(acc, axis=-2), src.codec, src.lanes) * f
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
    pool, base, layout, N = rowcodec.stored(rows)
    codec = rowcodec.codec(layout)
    w = layout.words
    lanes = w if backend == "tpu" else next_pow2(w)
    if vis is not None:                                    # HCA: every visible entry, in contiguous chunks
      n = rows.rows
      br = min(block_rows, N) if backend == "tpu" else block_rows
      src = _Source(codec, w, lanes, N, n, -(-n // br))
      ids = None
      visible = jnp.minimum(vis.astype(jnp.int32), n)
    else:
      T = idx.shape[-1]
      Tp = -(-T // block_rows) * block_rows
      ids = jnp.pad(idx.astype(jnp.int32), ((0, 0), (0, 0), (0, Tp - T)), constant_values=-1)
      src = _Source(codec, w, lanes, N, 0, Tp // block_rows)
    srcs.append(src)
    qparts = rowcodec.split_query(q, codec, lanes)                                  # [B,S,H,P,lanes]
    arrays.append((pool, base, ids, [qparts[..., p, :] for p in range(len(codec.parts))]))

  if backend == "tpu":
    outs = _call_tpu(q, attn_sink, srcs, arrays, visible, scale, block_rows, interpret)
  else:
    outs = _call_gpu(q, attn_sink, srcs, arrays, visible, scale, block_rows, head_block, interpret)
  l = outs[-1]
  o, i = 0.0, 0
  for src in srcs:
    n_parts = len(src.codec.parts)
    o = o + rowcodec.merge_parts(jnp.stack(outs[i:i + n_parts], axis=-2), src.codec, src.lanes)
    i += n_parts
  return (o / l)[:, :, :H].astype(q.dtype)


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
    pool, base, layout, N = rowcodec.stored(rows)
    codec = rowcodec.codec(layout)
    w = layout.words
    lanes = w if backend == "tpu" else next_pow2(w)
    if vis is not None:                                    # HCA: every visible entry, shared by the block
      n = rows.rows
      br = min(block_rows, N) if backend == "tpu" else block_rows
      src, mode = _Source(codec, w, lanes, N, n, -(-n // br)), "dense"
      vis = jnp.pad(jnp.minimum(vis.astype(jnp.int32), n), pad_s)
      extra = (vis, jnp.max(vis.reshape(B * nb, Tq), axis=1))
    elif k == 0:                                           # the window: each block's set of rows
      idx = jnp.pad(idx.astype(jnp.int32), pad_s + ((0, 0),), constant_values=-1)
      extra = window_union(idx, Tq, N, block_rows)
      src, mode = _Source(codec, w, lanes, N, 0, extra[0].shape[-1] // block_rows), "union"
    else:                                                  # CSA: each query's own rows
      T = idx.shape[-1]
      Tp = -(-T // block_rows) * block_rows
      extra = jnp.pad(idx.astype(jnp.int32), pad_s + ((0, Tp - T),), constant_values=-1)
      src, mode = _Source(codec, w, lanes, N, 0, Tp // block_rows), "gather"
    srcs.append(src)
    modes.append(mode)
    qparts = rowcodec.split_query(q, codec, lanes)                                  # [B,Sp,H,P,lanes]
    arrays.append((pool, base, extra, [qparts[..., p, :] for p in range(len(codec.parts))]))
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
  compressed store as a stacked group of 2 layers of `fmt` rows."""
  from dsv4_jax.kv_format import Layout
  lay = Layout(fmt, K, r) if fmt == "fp8" else Layout(fmt, K)
  N = context // (4 if source == "csa" else 128)
  sds = jax.ShapeDtypeStruct
  args = (sds((B, S, H, K), jnp.bfloat16), sds((H,), F32), sds((B, window + S, K), jnp.bfloat16),
          sds((B, S, window), jnp.int32), sds((2, B, N, lay.words), jnp.uint32), sds((), jnp.int32),
          sds((B, S, topk), jnp.int32) if source == "csa" else sds((B, S), jnp.int32))

  def fn(q, sink, win, widx, words, rep, sel):
    comp = Rows(words, lay, rep, N)
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
