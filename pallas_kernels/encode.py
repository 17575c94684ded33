"""Encoding KV entries into the cache's storage words, as Pallas kernels (the inverse of `rowcodec`).

Reference (must equal, bit for bit): `dsv4_jax.kv_format.Layout.encode` (= `dsv4_jax.ops.encode_rows_ref`):
values [..., K] -> uint32 words [..., layout.words] for every format, "float32", "bfloat16", the paper's
"fp8" (e4m3 non-RoPE dims + one e8m0 power-of-two scale per 64, RoPE dims in bf16 or fp32) and "fp4"
(e2m1 indexer keys + one e8m0 scale per 32).

Layout of the work. A stored row's fields are not contiguous lanes of one dtype, so the values are first
split into the row's *parts* in XLA (as `rowcodec.split_query`: part p's lane j holds the element that word
j's field p stores, 0 where part p has no lane j). That is a small permutation (a transpose within each row)
of the entries being written, [rows, K] -> P x [rows, lanes], made of strided slices and zero padding
(`rowcodec.split_parts`); `rowcodec.codec` lists the parts:

    float32    1 part:   lane j          -> element j             word j = its f32 bits
    bfloat16   2 parts:  lane j, half h  -> element 2j + h        bits 16h.. = bf16 (round to nearest even)
    fp8        4 parts:  lane j, byte t  -> element 4j + t        byte t = e4m3 of (value / block scale)
               + RoPE:   bf16 halves (2 parts) or f32 (1 part) from word (K-r + scale bytes) / 4 on
    fp4        8 parts:  lane j, nibble t -> element 8j + t       nibble t = e2m1 code of (value / scale)

The kernel then works element-wise on each part, computing its code bits with integer ops only, and ORs
them into the word lanes (no lane permutation, gather or unaligned lane slice in the kernel). Scales: the
64-block (fp8) / 32-block (fp4) of lane j is j // 16 / j // 4 for every scaled part, so a block's amax is a
masked lane reduction of the per-lane max over the scaled parts (one per block, as `rowcodec._scales`), and
its e8m0 byte is ORed into its word lane (block b: word scale_word + b // 4, bits 8 (b % 4)).

Exactness (every step is exact integer or exact float work, so each backend gives the XLA encoder's bits):
  * scale s = pow2_ceil(max(amax, floor) / qmax) is computed without a division (GPU and TPU divisions are
    not all correctly rounded): with A = max(amax, floor) = f 2^e, f in [1, 2), and qmax = c 2^q,
    s = 2^(e - q + [f > c]); this equals pow2_ceil of the correctly rounded quotient for qmax = 448 and 6
    (a quotient within half an ulp above a power of two would need f within 2^-24 relative of c).
  * value / s is value * 2^-k with the exact power-of-two reciprocal (the same correctly rounded result).
  * e4m3: clip to +-448, round to nearest even on the f32 bits (normal: add 0x7FFFF + lsb, shift by 20;
    below 2^-6: the integer mantissa shifted into steps of 2^-9, ties to even), sign kept (-0 -> 0x80).
  * e2m1: `quant.round_e2m1`'s half-to-even grid as a sum of threshold tests on |y| (ties go to even
    codes), the sign bit only for a nonzero code of a negative value (as kv_format's `y < 0`).
  * bf16: round to nearest even on the f32 bits (values are finite; NaN is not handled).
Values are taken in fp32 (bf16 inputs convert exactly). f32 subnormal inputs follow IEEE (interpret mode
and GPU); a platform that flushes subnormals (TPU) flushes them in XLA's encoder too, where only the bf16 /
f32 bits of such tiny values could differ.

Backends (same math, `_encode_block`):
  tpu  Mosaic. Grid over blocks of `block_rows` rows (all "parallel"); each part is a [block_rows, words]
       BlockSpec (words = the full last dim), the output a [block_rows, words] int32 block.
  gpu  Triton. The same, with lanes and rows padded to powers of two (masked off on the way out).
The output is int32 in the kernel and bit-cast to uint32 outside (free). Deviceless Mosaic compiles of
AOT_CASES: `python -m pallas_kernels.aot --only=encode`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from dsv4_jax import quant
from dsv4_jax.kv_format import Layout
from pallas_kernels import cost, rowcodec
from pallas_kernels.platform import backend_for, check, interpret_mode, next_pow2

F32 = jnp.float32
I32 = jnp.int32
_TPU_BLOCK_ROWS = 256          # rows per TPU block (a multiple of 8)
_GPU_TILE = 4096               # elements per Triton [rows, lanes] tile (default rows = tile // lanes)

# Per scaled format: (elements per scale, qmax, amax floor). The floors are kv_format's, rounded to f32.
_SCALING = {"e4m3": (64, quant.FP8_MAX, float(np.float32(1e-4))),
            "e2m1": (32, quant.FP4_MAX, quant.FP4_MAX * 2.0 ** -126)}


def _qmax_fields(qmax: float) -> tuple[int, int]:
  """qmax = (1 + mant / 2^23) * 2^(exp - 127) -> (exp, mant): its f32 exponent field and mantissa bits."""
  bits = int(np.float32(qmax).view(np.int32))
  return bits >> 23, bits & 0x7FFFFF


def _bits(v: jnp.ndarray) -> jnp.ndarray:
  return jax.lax.bitcast_convert_type(v, I32)


def _sign(b: jnp.ndarray) -> jnp.ndarray:
  """The sign bit of f32 bits (int32), as 0 / 1 (-0.0 included). (Right shifts below act on values >= 0 only,
  where arithmetic and logical shifts agree.)"""
  return (b < 0).astype(I32)


def _scale_exponent(amax: jnp.ndarray, kind: str) -> jnp.ndarray:
  """Block amax (f32 >= 0) -> biased f32 exponent E of s = pow2_ceil(max(amax, floor) / qmax) (s = 2^(E-127);
  E is also the e8m0 byte). Exact, no division (module docstring)."""
  _, qmax, floor = _SCALING[kind]
  q_exp, q_mant = _qmax_fields(qmax)
  a = _bits(jnp.maximum(amax, floor))                        # a positive normal f32: its bits order as ints
  return (a >> 23) - (q_exp - 127) + ((a & 0x7FFFFF) > q_mant).astype(I32)


def _bf16_bits(v: jnp.ndarray) -> jnp.ndarray:
  """f32 -> its bf16 bits (round to nearest even) in the low 16 bits of an int32 (finite values)."""
  b = _bits(v)
  mag = b & 0x7FFFFFFF
  r = (mag + 0x7FFF + ((mag >> 16) & 1)) >> 16
  return r | (_sign(b) << 15)


def _e4m3_bits(q: jnp.ndarray) -> jnp.ndarray:
  """f32 (already divided by the scale) -> e4m3fn byte of clip(q, +-448), round to nearest even (int32)."""
  b = _bits(q)
  a = jnp.minimum(b & 0x7FFFFFFF, int(np.float32(quant.FP8_MAX).view(np.int32)))   # |clip(q)|'s bits
  e = a >> 23
  normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)            # e4m3 exponent bias 7 = 127 - 120
  # below 2^-6: code = round_even(|q| / 2^-9) = round_even(M >> (141 - e)), M the 24-bit f32 significand
  m = (a & 0x7FFFFF) | 0x800000
  sh = jnp.minimum(141 - e, 25)                                                # >= 21 here; >= 25 rounds to 0
  q0 = m >> sh
  rem = m - (q0 << sh)
  half = 1 << (sh - 1)
  sub = q0 + ((rem > half) | ((rem == half) & ((q0 & 1) == 1))).astype(I32)
  code = jnp.where(e >= 121, normal, sub)
  return code | (_sign(b) << 7)


def _e2m1_bits(y: jnp.ndarray) -> jnp.ndarray:
  """f32 (already divided by the scale) -> e2m1 nibble of round_e2m1(clip(y, +-6)) as kv_format codes it."""
  a = jnp.abs(y)
  code = sum(((a > t) if strict else (a >= t)).astype(I32)
             for t, strict in ((0.25, True), (0.75, False), (1.25, True), (1.75, False), (2.5, True),
                               (3.5, False), (5.0, True)))                       # half-to-even ties
  return code | (((y < 0) & (code > 0)).astype(I32) << 3)


def _encode_block(parts: list[jnp.ndarray], c: rowcodec.Codec) -> jnp.ndarray:
  """One block of rows: per part f32 [rows, lanes] (0 off the part) -> int32 words [rows, lanes]."""
  lane = jax.lax.broadcasted_iota(I32, parts[0].shape, 1)
  inv = None
  word = jnp.zeros(parts[0].shape, I32)
  if c.n_scales:
    kind = next(p.kind for p in c.parts if p.scaled)
    amax = None
    for p, v in zip(c.parts, parts):
      if p.scaled:
        amax = jnp.abs(v) if amax is None else jnp.maximum(amax, jnp.abs(v))
    blk = jax.lax.div(lane, c.scale_lanes)                        # (no `//`: Mosaic lacks signed floor div)
    inv = jnp.zeros(parts[0].shape, F32)
    for i in range(c.n_scales):
      e = _scale_exponent(jnp.max(jnp.where(blk == i, amax, 0.0), axis=1, keepdims=True), kind)   # [rows, 1]
      inv = jnp.where(blk == i, jax.lax.bitcast_convert_type((254 - e) << 23, F32), inv)          # 2^(127-e)
      word = word | jnp.where(lane == c.scale_word + i // 4, e << (8 * (i % 4)), 0)
  for p, v in zip(c.parts, parts):
    if p.kind == "f32":
      bits = _bits(v)
    elif p.kind == "bf16":
      bits = _bf16_bits(v) << (16 * p.field)
    elif p.kind == "e4m3":
      bits = _e4m3_bits(v * inv) << (8 * p.field)
    else:
      bits = _e2m1_bits(v * inv) << (4 * p.field)
    word = word | bits
  return word


def _kernel(*refs, c: rowcodec.Codec):
  """Both backends: P part blocks [rows, lanes] f32 -> the word block [rows, lanes] int32."""
  *in_refs, o_ref = refs
  o_ref[...] = _encode_block([r[...] for r in in_refs], c)


# ---- TPU (Mosaic) ---------------------------------------------------------------------------------------

def _call_tpu(parts, c, block_rows, interpret):
  from jax.experimental.pallas import tpu as pltpu
  R, lanes = parts[0].shape
  check(block_rows % 8 == 0 and block_rows > 0, f"encode_rows (TPU): block_rows={block_rows} must be a "
                                                 f"positive multiple of 8")
  br = R if R <= block_rows else block_rows
  spec = pl.BlockSpec((br, lanes), lambda i: (i, 0))
  out_shape = jax.ShapeDtypeStruct((R, lanes), I32)
  return pl.pallas_call(
      functools.partial(_kernel, c=c), grid=(-(-R // br),), in_specs=[spec] * len(parts), out_specs=spec,
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=interpret, cost_estimate=_cost(parts, out_shape),
  )(*parts)


def _cost(parts, out_shape):
  """Both backends read every part block once and write the words; ~8 integer ops a value (scale, round, pack)."""
  return cost.estimate(flops=8 * sum(p.size for p in parts), read=cost.nbytes(parts), written=cost.nbytes(out_shape))


# ---- GPU (Triton) ---------------------------------------------------------------------------------------

def _call_gpu(parts, c, block_rows, interpret):
  from jax.experimental.pallas import triton as pltriton
  R, lanes = parts[0].shape
  check(next_pow2(block_rows) == block_rows, f"encode_rows (GPU): block_rows={block_rows} must be a power of two")
  br = min(block_rows, next_pow2(R))
  Rp = -(-R // br) * br
  if Rp != R:
    parts = [jnp.pad(p, ((0, Rp - R), (0, 0))) for p in parts]
  spec = pl.BlockSpec((br, lanes), lambda i: (i, 0))
  out_shape = jax.ShapeDtypeStruct((Rp, lanes), I32)
  out = pl.pallas_call(
      functools.partial(_kernel, c=c), grid=(Rp // br,), in_specs=[spec] * len(parts), out_specs=spec,
      out_shape=out_shape,
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret, cost_estimate=_cost(parts, out_shape),
  )(*parts)
  return out[:R]


# ---- the op -----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _checked_codec(layout: Layout) -> rowcodec.Codec:
  c = rowcodec.codec(layout)
  m = rowcodec.element_map(c, layout.words)
  held = np.sort(m[m >= 0])
  check(held.shape == (layout.width,) and (held == np.arange(layout.width)).all(),
        f"encode_rows: layout {layout} is not covered by whole word fields (odd bf16 width, or a width the "
        f"format's blocks do not divide)")
  if layout.fmt == "fp8":
    check((layout.width - layout.rope_dim) % 64 == 0, "encode_rows: fp8 needs K - rope_dim divisible by 64")
  if layout.fmt == "fp4":
    check(layout.width % 32 == 0, "encode_rows: fp4 needs K divisible by 32")
  return c


def encode_rows(values: jnp.ndarray, layout: Layout, *, backend: str | None = None, interpret: bool | None = None,
                block_rows: int | None = None) -> jnp.ndarray:
  """Same arguments and result as `dsv4_jax.ops.encode_rows_ref` (= `layout.encode`): values [..., K]
  (float32 / bfloat16, finite) -> uint32 words [..., layout.words], bit for bit.

  backend: "tpu" | "gpu" | None (the default device's platform; on CPU, the TPU kernel interpreted).
  block_rows: rows per program (TPU: a multiple of 8, default 256; GPU: a power of two, default
  4096 // lanes).
  """
  backend = backend_for(backend)
  interpret = interpret_mode(backend, interpret)
  check(values.shape[-1] == layout.width, f"encode_rows: values {values.shape} are not rows of {layout.width}")
  c = _checked_codec(layout)
  lead = values.shape[:-1]
  R = int(np.prod(lead, dtype=np.int64))
  w = layout.words
  if R == 0:
    return jnp.zeros((*lead, w), jnp.uint32)
  lanes = w if backend == "tpu" else next_pow2(w)
  parts = rowcodec.split_parts(values.reshape(R, layout.width), c, lanes)
  if backend == "tpu":
    out = _call_tpu(parts, c, block_rows or _TPU_BLOCK_ROWS, interpret)
  else:
    out = _call_gpu(parts, c, block_rows or max(1, _GPU_TILE // lanes), interpret)
  return jax.lax.bitcast_convert_type(out[:, :w], jnp.uint32).reshape(*lead, w)


# ---- deviceless compile cases (pallas_kernels/aot.py) ------------------------------------------------------

def _case(layout: Layout, rows: int, dtype=jnp.bfloat16):
  fn = lambda x: encode_rows(x, layout, backend="tpu", interpret=False)
  return fn, (jax.ShapeDtypeStruct((rows, layout.width), dtype),)


# Flash (and Pro) entries: main KV K = 512 with 64 RoPE dims (the paper's fp8 + bf16 RoPE: 146 words, and
# bf16: 256 words), indexer keys cI = 128 (fp4: 17 words). Decode writes one row per sequence (one sequence
# here); prefill a 512-token chunk's entries at batch 1 (128 CSA entries) and a 4096-token prompt's (1024).
_FLASH = (("fp8", Layout("fp8", 512, 64, "bfloat16")), ("bf16", Layout("bfloat16", 512)),
          ("fp4", Layout("fp4", 128)))
AOT_CASES = [
    (f"flash_{name}_{'decode_b1' if rows == 1 else f'prefill_r{rows}'}", *_case(lay, rows))
    for name, lay in _FLASH for rows in (1, 128, 1024)
] + [("flash_fp8_f32rope_prefill_r128", *_case(Layout("fp8", 512, 64, "float32"), 128, jnp.float32))]   # fp32 models
