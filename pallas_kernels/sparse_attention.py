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

Backends (same math, `_online_step`):
  tpu  Mosaic. Grid (B, S), one query per program with all H heads as the matmul M dimension. Index rows
       sit in SMEM (a BlockSpec per query, so no 1 MiB scalar-prefetch limit); the row pools stay in HBM
       and each chunk of `block_rows` rows is fetched by one DMA per row (gather) or one DMA per chunk
       (HCA), double-buffered, waited once per chunk.
  gpu  Triton. Grid (B*S, H / head_block); a chunk is gathered with one pointer-tensor load.
Shapes: any H (GPU: padded to whole head blocks), any K, any row count, any index-row length (padded
to the chunk with -1). Each program writes, per source and part, its unnormalised P.V and the shared
denominator; `merge_parts` and one division outside the kernel give o.
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


def _online_step(carry, qparts, parts, valid, scale: float, p_dtype):
  """One chunk of the online softmax. carry = (m [H,1], l [H,1], acc [list of [H, lanes]]);
  qparts/parts: per part [H, lanes] / [rows, lanes] f32; valid [1, rows] bool."""
  m, l, acc = carry
  z = sum(jax.lax.dot_general(qp, kp, (((1,), (1,)), ((), ())), preferred_element_type=F32)
          for qp, kp in zip(qparts, parts)) * scale                                   # [H, rows]
  z = jnp.where(valid, z, NEG)
  m_new = jnp.maximum(m, jnp.max(z, axis=1, keepdims=True))
  alpha = jnp.exp(m - m_new)
  p = jnp.exp(z - m_new)
  l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
  pr = p.astype(p_dtype).astype(F32)
  acc = [alpha * a + jnp.dot(pr, kp, preferred_element_type=F32) for a, kp in zip(acc, parts)]
  return m_new, l, acc


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
  n_src = len(srcs)
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


# ---- the op -----------------------------------------------------------------------------------------------

def sparse_attention(q, attn_sink, scale: float, window: Rows, window_idx, comp: Rows | None = None,
                     comp_idx=None, comp_visible=None, *, backend: str | None = None, interpret: bool | None = None,
                     block_rows: int | None = None, head_block: int = 16):
  """Same arguments and result as `dsv4_jax.ops.sparse_attention_ref` ([B,S,H,K] in q.dtype).

  backend: "tpu" | "gpu" | None (the default device's platform; on CPU, the TPU kernel interpreted).
  block_rows: rows per chunk (default 128 on TPU, 32 on GPU; a power of two on GPU).
  """
  backend = backend_for(backend)
  interpret = interpret_mode(backend, interpret)
  B, S, H, K = q.shape
  if block_rows is None:
    block_rows = 128 if backend == "tpu" else 32
  if backend == "gpu":
    check(next_pow2(head_block) == head_block and head_block >= 16,
          f"sparse_attention (GPU): head_block={head_block} must be a power of two >= 16 (Triton's dot minimum)")
    check(next_pow2(block_rows) == block_rows and block_rows >= 16,
          f"sparse_attention (GPU): block_rows={block_rows} must be a power of two >= 16")
    Hp = -(-H // head_block) * head_block                  # heads padded to whole programs (zero queries)
    if Hp != H:
      q = jnp.pad(q, ((0, 0), (0, 0), (0, Hp - H), (0, 0)))
      attn_sink = jnp.pad(attn_sink, (0, Hp - H))
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
    ("pro_decode_b1_csa_fp8_128k", *_aot_case(128, 1, 1, "fp8", "csa", 131072)),
    ("pro_decode_b8_csa_bf16_128k", *_aot_case(128, 8, 1, "bfloat16", "csa", 131072)),
]
