"""The lightning indexer as a Pallas kernel: scores streamed over key blocks, then top-k in XLA.

Reference (must equal): `dsv4_jax.ops.indexer_topk_ref` (scores: `ops.index_scores_ref`). For query (b, s)
and compressed key j,

    score[b, s, j] = sum_h w[b, s, h] * relu(qI[b, s, h] . K[b, j]),

with the reference's roundings: the logits are rounded to the compute dtype before relu, each weighted
term is rounded to it, the head sum is fp32 and the score is rounded to the compute dtype again (by integer
ops, `quant.round_to`, in the reference and here alike: XLA drops an astype round trip in some programs).
Keys are read as stored (fp4 e2m1 codes with e8m0 scales for the paper format, or bf16/fp32 words) and
decoded in the kernel (`rowcodec`); a program scores one block of keys for a block of queries, so
`[queries, heads, keys]` never exists: only `[queries, keys]` scores go to HBM.

The cache stores keys as tiles (kv_format.Tiles, the default geometry): a key's words run down the lines,
128 keys across the lanes. A group of 128 keys decodes, part by part (an fp4 word's 8 nibbles, a bf16
word's 2 halves: `rowcodec.decode_tile`), into [cI, 128] values in the layout's planar dim order, and one
[heads, cI] x [cI, 128] matmul with the query in that order scores them: the math's FLOPs, keys read once
per query block, scores written in key order.

Top-k runs in XLA on those scores (`lax.top_k`, exact, lower id first among ties: slot by slot,
`select_topk_by_slot`, or past `ops.TOPK_WHOLE` scores `ops.select_topk` block by block).
Neither backend can sort inside a kernel (Mosaic has no top_k or sort lowering on the TensorCore, Triton
none in Pallas). `lax.approx_max_k(recall_target=1.0)` is what tpu-inference uses on TPU, but its tie order
is not specified and it is an exact brute-force fallback on GPU, so the model keeps `lax.top_k`: every path
(forward, cached step, xla, pallas) then selects the same entries.

A store of P keys a line of 128 words (kv_format.lane_dense: bf16 keys of 128 values pack 2, fp4 keys of 17
words 7, the rest of the line padding; not the cache's default) is read as its lines: a line decodes as one row of
P * cI values (`rowcodec.line_codec`), scored against P *virtual heads* per real
head, head h of slot p being qI[h] placed at values [p * cI, (p + 1) * cI) of the line (zeros elsewhere), so
slot p's score sums only its own heads; the kernel writes one score row per (query, slot). `indexer_topk`
selects from those [queries, slots, lines] scores slot by slot (`select_topk_by_slot`); `index_scores` puts
them in key order (a transpose of scores, not of keys). That is for a decode step: from `DECODE_FROM` queries
per sequence (prefill) the virtual heads' wasted matmul work and per-query key reads outweigh decoding the
live keys once, so the kernel scores them decoded (`slot_scores`).

Backends:
  tpu  Mosaic. Grid (B, query blocks, key blocks); keys come through an ordinary pipelined BlockSpec on the
       store viewed as [layers * B, N, words] (a free reshape), the block's first axis picked by a
       scalar-prefetched index (the layer `rep` of a stacked group), so Pallas double-buffers the reads.
       Tiles: key blocks of 2048 keys (272 lines for fp4).
  gpu  Triton. Grid (B * S, key blocks); one pointer-tensor load per key block. Tiles: grid (B * S, groups
       of 128 keys); a group's words loaded as [rows, 128] (zero padded to Triton's 16-row dot) and scored
       by one dot per part.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dsv4_jax.kv_format import GROUPS, LANES, Tiles
from dsv4_jax.ops import KEY_BLOCK, TOPK_WHOLE, Rows, select_topk
from dsv4_jax.quant import round_to
from pallas_kernels import cost, rowcodec
from pallas_kernels.platform import backend_for, check, in_hbm, interpret_mode, next_pow2

F32 = jnp.float32
QUERY_VMEM = 4 << 20      # TPU: VMEM for a program's query parts (fp4 lines: 7 x 64 virtual heads x 8 parts
                          # is 1.8 MB a query, so one query a program; bf16 lines: 8)
DECODE_FROM = 32          # queries per sequence from which a store of several keys a line is decoded once (below)


def _head_sum(logits, w, dt):
  """logits [heads, keys] fp32, w [heads, 1] fp32 -> [1, keys] fp32, rounded as the reference: the logits
  and each weighted term to dt, the head sum fp32, the score to dt."""
  term = round_to(jnp.maximum(round_to(logits, dt), 0.0) * w, dt)
  return round_to(jnp.sum(term, axis=0, keepdims=True), dt)


def _block_scores(qparts, w, parts, dt, slots: int, heads: int):
  """qparts: per part [slots * heads (+ padding), lanes]; w [same, 1] f32; parts: per part [BK, lanes] ->
  per slot [1, BK] f32 (rounded as the reference): slot p sums heads [p * heads, (p + 1) * heads)."""
  logits = sum(jax.lax.dot_general(qp, kp, (((1,), (1,)), ((), ())), preferred_element_type=F32)
               for qp, kp in zip(qparts, parts))                                        # [slots*nI, BK]
  return [_head_sum(logits[p * heads:(p + 1) * heads], w[p * heads:(p + 1) * heads], dt) for p in range(slots)]


def _tpu_kernel(lead_ref, *refs, codec, n_parts: int, queries: int, slots: int, heads: int, dt):
  qp_refs, w_ref, k_ref, o_ref = refs[:n_parts], refs[n_parts], refs[n_parts + 1], refs[n_parts + 2]
  parts = rowcodec.decode_parts(k_ref[...], codec, dt)                                    # [BK, lanes] each
  for i in range(queries):
    for p, sc in enumerate(_block_scores([r[i] for r in qp_refs], w_ref[i], parts, dt, slots, heads)):
      o_ref[i, pl.ds(p, 1), :] = sc.astype(o_ref.dtype)


def _scores_tpu(qparts, w, pool3, lead, n, codec, block_keys, block_queries, slots, dt, interpret):
  """-> [B, S * slots, n] (query s, slot p at row s * slots + p; n lines)."""
  from jax.experimental.pallas import tpu as pltpu
  B, S, nI, lanes = qparts[0].shape
  _, N, words = pool3.shape
  bk = min(block_keys, N)
  check(bk == N or bk % 8 == 0, f"indexer (TPU): block_keys={bk} must be a multiple of 8 or all {N} rows")
  per_query = 2 * len(qparts) * nI * lanes * 4                          # its query parts, double-buffered
  sb = max(1, min(block_queries, S, QUERY_VMEM // per_query))
  n_kb, n_sb = -(-n // bk), -(-S // sb)
  q_spec = pl.BlockSpec((None, sb, nI, lanes), lambda b, s, k, lead: (b, s, 0, 0))
  kernel = functools.partial(_tpu_kernel, codec=codec, n_parts=len(qparts), queries=sb, slots=slots,
                             heads=nI // slots, dt=dt)
  w = w[..., None].astype(F32)                                          # [B, S, nI, 1]
  pool3 = in_hbm(pool3, interpret)                     # read in blocks: not staged into VMEM whole first
  out_shape = jax.ShapeDtypeStruct((B, n_sb * sb, slots, n_kb * bk), dt)
  scored = B * n_sb * sb * n_kb * bk                       # (query, key line) pairs; keys again per query block
  ce = cost.estimate(flops=2 * scored * nI * lanes * len(qparts),
                     read=cost.nbytes(qparts, w) + B * n_sb * n_kb * bk * words * 4, written=cost.nbytes(out_shape))
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(B, n_sb, n_kb),
          in_specs=[q_spec] * len(qparts) + [
              pl.BlockSpec((None, sb, nI, 1), lambda b, s, k, lead: (b, s, 0, 0)),
              pl.BlockSpec((None, bk, words), lambda b, s, k, lead: (lead[b], k, 0))],
          out_specs=pl.BlockSpec((None, sb, slots, bk), lambda b, s, k, lead: (b, s, 0, k))),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=interpret, cost_estimate=ce,
  )(lead, *qparts, w, pool3)[:, :S].reshape(B, S * slots, -1)[..., :n]


def _gpu_kernel(base_ref, *refs, codec, n_parts: int, seq: int, rows: int, words: int, slots: int, heads: int,
                dt):
  from jax.experimental.pallas import triton as pltriton
  qp_refs, w_ref, pool, o_ref = refs[:n_parts], refs[n_parts], refs[n_parts + 1], refs[n_parts + 2]
  i, k = pl.program_id(0), pl.program_id(1)
  bk, lanes = o_ref.shape[-1], qp_refs[0].shape[-1]
  e = k * bk + jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)
  r = base_ref[i // seq] + jnp.minimum(e, rows - 1)
  cols = jax.lax.broadcasted_iota(jnp.int32, (bk, lanes), 1)
  words_blk = pltriton.load(pool.at[r[:, None], cols], mask=cols < words, other=0)
  parts = rowcodec.decode_parts(words_blk, codec, dt)
  for p, sc in enumerate(_block_scores([q[...] for q in qp_refs], w_ref[...], parts, dt, slots, heads)):
    o_ref[p, :] = sc[0].astype(o_ref.dtype)


def _scores_gpu(qparts, w, pool, base, n, N, words, codec, block_keys, slots, dt, interpret):
  """-> [B, S * slots, n] (query s, slot p at row s * slots + p; n lines)."""
  from jax.experimental.pallas import triton as pltriton
  B, S, nI, lanes = qparts[0].shape
  hp = max(16, next_pow2(nI))                                 # Triton's dot wants >= 16 rows, 2^k elements
  qparts = [jnp.pad(q, ((0, 0), (0, 0), (0, hp - nI), (0, 0))).reshape(B * S, hp, lanes) for q in qparts]
  w = jnp.pad(w.astype(F32), ((0, 0), (0, 0), (0, hp - nI))).reshape(B * S, hp, 1)
  bk = block_keys
  n_kb = -(-n // bk)
  kernel = functools.partial(_gpu_kernel, codec=codec, n_parts=len(qparts), seq=S, rows=N, words=words,
                             slots=slots, heads=nI // slots, dt=dt)
  out_shape = jax.ShapeDtypeStruct((B * S, slots, n_kb * bk), dt)
  # each program (query, key block) loads its query parts and weights and bk lines of `words` words
  ce = cost.estimate(flops=2 * B * S * n_kb * bk * hp * lanes * len(qparts),
                     read=n_kb * cost.nbytes(qparts, w) + B * S * n_kb * bk * words * 4, written=cost.nbytes(out_shape))
  out = pl.pallas_call(
      kernel, grid=(B * S, n_kb),
      in_specs=[pl.BlockSpec((B,), lambda i, k: (0,))]
      + [pl.BlockSpec((None, hp, lanes), lambda i, k: (i, 0, 0))] * len(qparts)
      + [pl.BlockSpec((None, hp, 1), lambda i, k: (i, 0, 0)), pl.BlockSpec(pool.shape, lambda i, k: (0, 0))],
      out_specs=pl.BlockSpec((None, slots, bk), lambda i, k: (i, 0, k)),
      out_shape=out_shape, compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret, cost_estimate=ce,
  )(base, *qparts, w, pool)
  return out.reshape(B, S * slots, -1)[..., :n]


# ---- keys stored as tiles (kv_format.Tiles): 128 keys across the lanes, one matmul each -------------------

def _tiles_tpu_kernel(lead_ref, q_ref, w_ref, k_ref, o_ref, *, codec, tiles: Tiles, blocks: int, queries: int,
                      dt):
  """q_ref [queries, nI, K] (planar order), w_ref [queries, nI, 1], k_ref [blocks * block_lines, 128] words,
  o_ref [queries, blocks * 1024] scores in key order."""
  nb, L = tiles.body, tiles.block_lines
  for t in range(blocks):
    tail = k_ref[pl.ds(t * L + GROUPS * nb, GROUPS * tiles.tail), :] if tiles.tail else None
    for c in range(GROUPS):
      tl = None if tail is None else tail[c * tiles.tail:(c + 1) * tiles.tail]
      v = rowcodec.decode_tile(k_ref[pl.ds(t * L + c * nb, nb), :], tl, codec, dt).astype(q_ref.dtype)
      for i in range(queries):
        logits = jax.lax.dot_general(q_ref[i], v, (((1,), (0,)), ((), ())), preferred_element_type=F32)
        o_ref[pl.ds(i, 1), pl.ds((t * GROUPS + c) * LANES, LANES)] = _head_sum(logits, w_ref[i], dt).astype(
            o_ref.dtype)


def _tiles_tpu(qp, w, pool3, lead, n, codec, tiles: Tiles, block_keys, block_queries, dt, interpret):
  """qp [B, S, nI, K] planar, w [B, S, nI] -> [B, S, n] (keys in order)."""
  from jax.experimental.pallas import tpu as pltpu
  B, S, nI, K = qp.shape
  L = tiles.block_lines
  n_blocks = pool3.shape[1] // L
  kb = math.gcd(max(1, block_keys // tiles.pack), n_blocks)          # tile blocks a program: divides the store
  live_blocks = -(-n // tiles.pack)
  n_kb = -(-live_blocks // kb)
  sb = max(1, min(block_queries, S))
  n_sb = -(-S // sb)
  kernel = functools.partial(_tiles_tpu_kernel, codec=codec, tiles=tiles, blocks=kb, queries=sb, dt=dt)
  w = w[..., None].astype(F32)                                                           # [B, S, nI, 1]
  pool3 = in_hbm(pool3, interpret)
  out_shape = jax.ShapeDtypeStruct((B, n_sb * sb, n_kb * kb * tiles.pack), dt)
  keys = B * n_sb * n_kb * kb * tiles.pack                       # (query block, key) pairs: keys once a block
  ce = cost.estimate(flops=2 * keys * sb * nI * K, read=cost.nbytes(qp, w) + keys // tiles.pack * L * LANES * 4,
                     written=cost.nbytes(out_shape))
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(B, n_sb, n_kb),
          in_specs=[pl.BlockSpec((None, sb, nI, K), lambda b, s, k, lead: (b, s, 0, 0)),
                    pl.BlockSpec((None, sb, nI, 1), lambda b, s, k, lead: (b, s, 0, 0)),
                    pl.BlockSpec((None, kb * L, LANES), lambda b, s, k, lead: (lead[b], k, 0))],
          out_specs=pl.BlockSpec((None, sb, kb * tiles.pack), lambda b, s, k, lead: (b, s, k))),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=interpret, cost_estimate=ce,
  )(lead, qp, w, pool3)[:, :S, :n]


def _tiles_gpu_kernel(base_ref, q_ref, w_ref, pool, o_ref, *, codec, tiles: Tiles, rows: int, seq: int, dt):
  """One query and one group of 128 keys a program: q_ref [P, hp, rows] (part p's query dims, zero padded),
  w_ref [hp, 1], o_ref [128]."""
  from jax.experimental.pallas import triton as pltriton
  i, g = pl.program_id(0), pl.program_id(1)
  line0 = base_ref[i // seq] + (g // GROUPS) * tiles.block_lines
  c = g % GROUPS
  r = jax.lax.broadcasted_iota(jnp.int32, (rows, LANES), 0)
  lane = jax.lax.broadcasted_iota(jnp.int32, (rows, LANES), 1)
  body = pltriton.load(pool.at[line0 + c * tiles.body + jnp.minimum(r, tiles.body - 1), lane],
                       mask=r < tiles.body, other=0)                                   # [rows, 128]
  tail = None
  if tiles.tail:
    tr = jax.lax.broadcasted_iota(jnp.int32, (1, LANES), 0)
    tail = pltriton.load(pool.at[line0 + GROUPS * tiles.body + c * tiles.tail + tr,
                                 jax.lax.broadcasted_iota(jnp.int32, (1, LANES), 1)])
  v = rowcodec.decode_tile(body, tail, codec, dt)                                       # [P * rows, 128]
  logits = sum(jax.lax.dot_general(q_ref[p], v[p * rows:(p + 1) * rows].astype(q_ref.dtype),
                                   (((1,), (0,)), ((), ())), preferred_element_type=F32)
               for p in range(len(codec.parts)))
  o_ref[...] = _head_sum(logits, w_ref[...], dt)[0].astype(o_ref.dtype)


def _tiles_gpu(qp, w, pool, base, n, codec, tiles: Tiles, dt, interpret):
  """qp [B, S, nI, K] planar, w [B, S, nI] -> [B, S, n] (keys in order)."""
  from jax.experimental.pallas import triton as pltriton
  B, S, nI, K = qp.shape
  P, nb = len(codec.parts), tiles.body
  rows, hp = max(16, next_pow2(nb)), max(16, next_pow2(nI))     # Triton's dot: >= 16 rows, 2^k elements
  q = qp.reshape(B * S, nI, P, nb).transpose(0, 2, 1, 3)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, hp - nI), (0, rows - nb)))                         # [B*S, P, hp, rows]
  w = jnp.pad(w.astype(F32), ((0, 0), (0, 0), (0, hp - nI))).reshape(B * S, hp, 1)
  n_g = -(-n // LANES)
  kernel = functools.partial(_tiles_gpu_kernel, codec=codec, tiles=tiles, rows=rows, seq=S, dt=dt)
  out_shape = jax.ShapeDtypeStruct((B * S, n_g * LANES), dt)
  ce = cost.estimate(flops=2 * B * S * n_g * LANES * hp * rows * P,
                     read=n_g * cost.nbytes(q, w) + B * S * n_g * LANES * tiles.words * 4, written=cost.nbytes(out_shape))
  out = pl.pallas_call(
      kernel, grid=(B * S, n_g),
      in_specs=[pl.BlockSpec((B,), lambda i, g: (0,)),
                pl.BlockSpec((None, P, hp, rows), lambda i, g: (i, 0, 0, 0)),
                pl.BlockSpec((None, hp, 1), lambda i, g: (i, 0, 0)), pl.BlockSpec(pool.shape, lambda i, g: (0, 0))],
      out_specs=pl.BlockSpec((None, LANES), lambda i, g: (i, g)),
      out_shape=out_shape, compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret, cost_estimate=ce,
  )(base, q.astype(qp.dtype), w, pool)
  return out.reshape(B, S, -1)[..., :n]


def _tile_scores(qI, w, keys: Rows, backend: str, interpret: bool, block_keys, block_queries) -> jnp.ndarray:
  """Scores [B, S, n] of keys stored as tiles, in key order."""
  (tiles,) = keys.geometry
  codec = rowcodec.codec(keys.layout)
  check(rowcodec.tile_parts_whole(codec, tiles.body),
        f"indexer: {keys.layout.fmt} keys of {keys.layout.width} values do not decode as whole tiles")
  order = rowcodec.planar_order(codec)
  check(qI.shape[-1] == order.size, f"indexer: keys of width {order.size} for queries of {qI.shape[-1]}")
  qp = jnp.take(qI, jnp.asarray(order), axis=-1)                       # the query in the tile's row order
  (pool, base, _), = rowcodec.stored_planes(keys)[1]
  if backend == "tpu":
    N = keys.data.shape[-2]
    return _tiles_tpu(qp, w, pool.reshape(-1, N, LANES), base // N, keys.rows, codec, tiles,
                      block_keys or 2 * tiles.pack, block_queries, qI.dtype, interpret)
  return _tiles_gpu(qp, w, pool, base, keys.rows, codec, tiles, qI.dtype, interpret)


def index_scores(qI, w, keys: Rows, **kernel_options) -> jnp.ndarray:
  """Same arguments and result as `dsv4_jax.ops.index_scores_ref`: qI [B,S,nI,cI], w [B,S,nI] -> [B,S,n]
  scores of the first n = keys.rows keys, in qI.dtype. kernel_options: those of `slot_scores`."""
  return _key_order(slot_scores(qI, w, keys, **kernel_options), keys.rows)


def _key_order(scores, rows: int) -> jnp.ndarray:
  """[B, S, slots, lines] -> [B, S, rows]: key j = line j // slots, slot j % slots."""
  B, S, slots, n = scores.shape
  return scores.transpose(0, 1, 3, 2).reshape(B, S, n * slots)[..., :rows]


def slot_scores(qI, w, keys: Rows, *, backend: str | None = None, interpret: bool | None = None,
                block_keys: int | None = None, block_queries: int = 8, decode_from: int = DECODE_FROM) -> jnp.ndarray:
  """The kernel's scores as it writes them: [B, S, slots, lines], key j = line j // slots, slot j % slots
  (one slot a line for a store of whole rows); lines past the last key score what their padding decodes to.

  A store of P > 1 keys a line is scored line by line against P groups of virtual heads, which multiplies
  the matmul by the line's 128 words over a key's (fp4 keys of 17 words: 8x, bf16: 2x) and, for fp4, fits
  one query's heads a TPU program: keys are read again for every query. That is the cheapest way for a
  decode step's query or two; from `decode_from` queries per sequence (prefill) the live keys are instead
  decoded once, block by block, to values in the compute dtype (`_decoded`, the reference's decode) and
  scored as rows: the matmul is the math's and a block of keys serves `block_queries` queries (one fp4
  prefill case of 512 queries on v5p: bench/results/pallas_aot_v5p.txt). The two ways add the same
  products in other groupings, so their scores agree to fp32 rounding (as this kernel's and the reference's
  do) and their selections can differ only between keys scored that close.

  block_keys: stored rows (lines of a packed store) per program (default 512 on TPU, 128 on GPU; a power of
  two >= 16 on GPU). block_queries: queries per TPU program (GPU: one).
  """
  backend = backend_for(backend)
  interpret = interpret_mode(backend, interpret)
  dt = qI.dtype
  B, S, nI, cI = qI.shape
  if keys.tiled:
    return _tile_scores(qI, w, keys, backend, interpret, block_keys, block_queries)[:, :, None]
  if keys.layout is not None and keys.geometry[0].pack > 1 and S >= decode_from:
    keys = _decoded(keys, dt)
  pool, base, codec, N = rowcodec.stored_lines(keys)
  slots = keys.geometry[0].pack if keys.layout is not None else 1
  n = -(-keys.rows // slots)                                                              # lines scored
  check(codec.width == cI * slots, f"indexer: keys of width {codec.width // slots} for queries of {cI}")
  if slots > 1:                       # virtual heads: [B,S,slots*nI,slots*cI], head (p, h) at values of slot p
    qI = (qI[:, :, None, :, None, :] * jnp.eye(slots, dtype=qI.dtype)[:, None, :, None]).reshape(
        B, S, slots * nI, slots * cI)
    w = jnp.tile(w, (1, 1, slots))
  words = pool.shape[-1]
  if backend == "tpu":
    lanes = words
    qparts = rowcodec.split_query(qI, codec, lanes)                                     # [B,S,nI,P,lanes]
    lead = base // N
    out = _scores_tpu([qparts[..., p, :] for p in range(len(codec.parts))], w, pool.reshape(-1, N, words),
                      lead, n, codec, block_keys or 512, block_queries, slots, dt, interpret)
  else:
    bk = block_keys or 128
    check(next_pow2(bk) == bk and bk >= 16, f"indexer (GPU): block_keys={bk} must be a power of two >= 16")
    lanes = next_pow2(words)
    qparts = rowcodec.split_query(qI, codec, lanes)
    out = _scores_gpu([qparts[..., p, :] for p in range(len(codec.parts))], w, pool, base, n, N, words,
                      codec, bk, slots, dt, interpret)
  return out.reshape(B, S, slots, n)


def _decoded(keys: Rows, dt) -> Rows:
  """A store's first keys.rows keys decoded to values [B, rows, cI] in dt (natural dim order), KEY_BLOCK keys
  at a time (`ops.Rows.block`, as `ops.index_scores_ref` reads them; a last partial block is re-read from
  the end), so no decode of the whole store is ever materialised at once."""
  n = keys.aligned_rows
  blk = min(KEY_BLOCK // keys.align * keys.align, n)

  def body(i, out):
    start = jnp.minimum(i * blk, n - blk)
    return jax.lax.dynamic_update_slice_in_dim(out, keys.block(start, blk, dt), start, axis=1)

  out = jax.lax.fori_loop(0, -(-n // blk), body, jnp.zeros((keys.data.shape[-3], n, keys.layout.width), dt))
  return Rows(out[:, : keys.rows])


def indexer_topk(qI, w, keys: Rows, n_visible, k: int, **kernel_options) -> jnp.ndarray:
  """Same arguments and result as `dsv4_jax.ops.indexer_topk_ref`: [B,S,min(k, n)] int32 ids, -1 where
  fewer than k entries are visible; the lower id first among equal scores."""
  scores = slot_scores(qI, w, keys, **kernel_options)
  if scores.shape[2] > 1 and scores.size <= TOPK_WHOLE:
    return select_topk_by_slot(scores, n_visible, k, keys.rows)
  return select_topk(_key_order(scores, keys.rows), n_visible, k)


def select_topk_by_slot(scores, n_visible, k: int, rows: int) -> jnp.ndarray:
  """`select_topk` over slot-major scores [B, S, P, L] (key j = line j // P, slot j % P; keys >= rows are
  padding) without putting them in key order: that transpose is an array whose minor dimension is the P
  slots, which XLA:TPU pads to 128 lanes (a decode step over 1M tokens of bf16 keys, 2 a line: 67 MB of
  temporaries for 0.5 MB of scores).

  Exact, order and ties included: the k best keys lie among each slot's k best (a slot's ids ascend with
  its lines, so `lax.top_k` keeps its lower ids among equal scores); those P * k candidates, sorted by id,
  go through one more `lax.top_k`, which keeps the earlier, i.e. the lower id, among equal scores."""
  B, S, P, L = scores.shape
  ids = jnp.arange(L, dtype=jnp.int32)[None, :] * P + jnp.arange(P, dtype=jnp.int32)[:, None]       # [P, L]
  visible = (ids < rows) & (ids < n_visible[..., None, None])
  top, pos = jax.lax.top_k(jnp.where(visible, scores.astype(F32), -jnp.inf), min(k, L))    # [B,S,P,kk]
  cand = (pos * P + jnp.arange(P, dtype=jnp.int32)[:, None]).reshape(B, S, -1)
  cand, top = jax.lax.sort((cand, top.reshape(B, S, -1)), num_keys=1)                      # by id
  best, i = jax.lax.top_k(top, min(k, rows))
  chosen = jnp.take_along_axis(cand, i, axis=-1)
  return jnp.where((best > -jnp.inf) & (chosen < n_visible[..., None]), chosen, -1).astype(jnp.int32)


# ---- deviceless compile cases (pallas_kernels/aot.py) ------------------------------------------------------

def _aot_case(B: int, S: int, fmt: str, context: int, nI: int = 64, cI: int = 128):
  """Keys stored as the cache stores them: tiles (kv_format.key_tiles: 1024 keys a block)."""
  from dsv4_jax.kv_format import Layout, key_tiles
  lay = Layout(fmt, cI)
  geo = key_tiles(lay)
  N = context // 4
  sds = jax.ShapeDtypeStruct
  args = (sds((B, S, nI, cI), jnp.bfloat16), sds((B, S, nI), jnp.bfloat16),
          sds((2, B, geo[0].lines(N), LANES), jnp.uint32), sds((), jnp.int32))

  def fn(qI, w, words, rep):
    return index_scores(qI, w, Rows(words, lay, rep, N, planes=geo), backend="tpu", interpret=False)
  return fn, args


# Flash and Pro share the indexer's dims (64 heads x 128); fp4 keys as the paper stores them, and bf16.
AOT_CASES = [
    ("decode_b1_fp4_128k", *_aot_case(1, 1, "fp4", 131072)),
    ("decode_b32_fp4_128k", *_aot_case(32, 1, "fp4", 131072)),
    ("decode_b1_fp4_1m", *_aot_case(1, 1, "fp4", 1 << 20)),
    ("prefill_s512_fp4_8k", *_aot_case(1, 512, "fp4", 8192)),
    ("decode_b8_bf16_128k", *_aot_case(8, 1, "bfloat16", 131072)),
    ("prefill_s512_bf16_8k", *_aot_case(1, 512, "bfloat16", 8192)),
]
