"""Quantisation-aware numerics of the reference (docs/architecture.md §4.2), as round-trips.

All scales are powers of two ("ue8m0"), so dequantisation is exact; the only loss is rounding the
scaled values to fp8 e4m3 or fp4 e2m1. These run when `cfg.quant_sim` is on.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

F32 = jnp.float32
FP8_MAX = 448.0
FP4_MAX = 6.0
# fp4 e2m1 code -> value: codes 0-7 the grid, 8-15 the same negated (sign bit 3), as the released checkpoints.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def slots_first(x: jnp.ndarray, per: int) -> jnp.ndarray:
  """[..., n] -> the same values slot by slot: x[..., 0::per], then x[..., 1::per], ... (the order in which
  values packed `per` to a word or byte come out when each slot is decoded on its own); per 1: x."""
  if per == 1:
    return x
  return jnp.concatenate([x[..., j::per] for j in range(per)], -1)    # strided slices: no [..., n, per] array


def slots_last(y: jnp.ndarray, per: int) -> jnp.ndarray:
  """`slots_first` inverted."""
  n = y.shape[-1] // per
  return interleave([y[..., j * n:(j + 1) * n] for j in range(per)])


def interleave(parts: list) -> jnp.ndarray:
  """`per` arrays [..., n] -> [..., per * n], element per * i + j from parts[j][..., i]: each part dilated
  into place (`lax.pad`, interior per - 1) and picked by lane, element-wise into the output's own layout.
  (A stack + reshape, or reshape + transpose, made XLA:TPU lay out the [..., H, n, per] intermediate
  heads-minor, padded to 128 lanes, and copy it: 256 KB for a toy decode step's 16 KB attention output.)"""
  per = len(parts)
  if per == 1:
    return parts[0]
  lane = jnp.arange(per * parts[0].shape[-1]) % per
  out = None
  for j, x in enumerate(parts):
    d = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] * (x.ndim - 1) + [(j, per - 1 - j, per - 1)])
    out = d if out is None else jnp.where(lane == j, d, out)
  return out


def round_to(x: jnp.ndarray, dtype) -> jnp.ndarray:
  """fp32 x rounded to `dtype`'s grid (bfloat16: round to nearest even on the bits), still fp32; fp32 as it is.

  The same values as `x.astype(dtype).astype(jnp.float32)`, but by integer ops that no compiler drops: under
  its default excess precision XLA removes such a round trip in some programs and not others, so a score
  rounded that way depends on how the program around it was compiled (and Pallas TPU has no
  `lax.reduce_precision`). Finite values; the indexer's roundings (ops, pallas_kernels/indexer.py)."""
  if jnp.dtype(dtype) == jnp.dtype(jnp.float32):
    return x
  if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
    raise ValueError(f"round_to: compute dtype {jnp.dtype(dtype).name}; expected float32 or bfloat16")
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  bits = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))) & jnp.uint32(0xFFFF0000)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def e2m1_to_f32(code: jnp.ndarray) -> jnp.ndarray:
  """e2m1 codes (an unsigned integer array, values 0..15) -> E2M1_VALUES[code] as fp32, built from the bits
  (sign: bit 3, exponent: bits 2-1, mantissa: bit 0) element-wise: no table gather, whose int32 index array
  XLA:TPU materialises and relays out."""
  c = code.astype(jnp.uint32)
  e, m = (c >> 1) & 3, c & 1
  bits = jnp.where(e == 0, m * jnp.uint32(126 << 23), ((e + 126) << 23) | (m << 22))   # 0 / 0.5 ; 2^(e-1)(1+m/2)
  return jax.lax.bitcast_convert_type(bits | ((c >> 3) << 31), jnp.float32)


def pow2_ceil(v: jnp.ndarray) -> jnp.ndarray:
  """2^ceil(log2 v) for fp32 v >= 2^-126 (the callers clamp to at least that), exact: powers of two are
  unchanged, any other v goes to the power of two above it. On the bits: a zero mantissa is kept, otherwise
  the exponent is raised by one and the mantissa cleared; below 2^-126 (denormals, 0), 2^-126. Two integer
  ops XLA fuses into the caller (`jnp.frexp` / `jnp.ldexp` left 145 unfused ops in a toy 6-layer decode step
  under quant_sim)."""
  bits = jax.lax.bitcast_convert_type(v.astype(F32), jnp.uint32)
  exp, mant = bits & 0x7F800000, bits & 0x007FFFFF
  up = jnp.where(mant == 0, exp, exp + 0x00800000)
  return jax.lax.bitcast_convert_type(jnp.maximum(up, 0x00800000), F32)


def _blocked(x: jnp.ndarray, block: int):
  """[..., N] -> [..., ceil(N/block), block] (zero padded; zeros never change a block's amax)."""
  n = x.shape[-1]
  pad = (-n) % block
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return x.reshape(*x.shape[:-1], (n + pad) // block, block), n


def round_e2m1(y: jnp.ndarray) -> jnp.ndarray:
  """Round-to-nearest-even onto the e2m1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} (|y| <= 6)."""
  a = jnp.abs(y)
  step = jnp.where(a < 2, 0.5, jnp.where(a < 4, 1.0, 2.0))
  return jnp.sign(y) * jnp.round(a / step) * step       # jnp.round is half-to-even


def act_quant(x: jnp.ndarray, block: int = 128) -> jnp.ndarray:
  """FP8 e4m3 round-trip with one power-of-two scale per `block` values of the last dim."""
  xb, n = _blocked(x.astype(F32), block)
  amax = jnp.maximum(jnp.max(jnp.abs(xb), axis=-1, keepdims=True), 1e-4)
  s = pow2_ceil(amax / FP8_MAX)
  q = jnp.clip(xb / s, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn).astype(F32)
  return (q * s).reshape(*x.shape[:-1], -1)[..., :n].astype(x.dtype)


def fp4_act_quant(x: jnp.ndarray, block: int = 32) -> jnp.ndarray:
  """FP4 e2m1 round-trip with one power-of-two scale per `block` values of the last dim."""
  xb, n = _blocked(x.astype(F32), block)
  amax = jnp.maximum(jnp.max(jnp.abs(xb), axis=-1, keepdims=True), FP4_MAX * 2.0 ** -126)
  s = pow2_ceil(amax / FP4_MAX)
  q = round_e2m1(jnp.clip(xb / s, -FP4_MAX, FP4_MAX))
  return (q * s).reshape(*x.shape[:-1], -1)[..., :n].astype(x.dtype)


@functools.lru_cache(maxsize=None)
def hadamard_matrix(n: int) -> np.ndarray:
  """Sylvester-ordered Walsh-Hadamard matrix scaled by n^-0.5 (orthonormal), fp32 [n, n]."""
  if n & (n - 1):
    raise ValueError(f"Hadamard size must be a power of two, got {n}.")
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return (h / np.sqrt(n)).astype(np.float32)


def hadamard(x: jnp.ndarray) -> jnp.ndarray:
  """Rotates the last dim by the orthonormal Hadamard matrix; result in x.dtype."""
  h = jnp.asarray(hadamard_matrix(x.shape[-1]))
  return jnp.einsum("...k,kj->...j", x.astype(F32), h, precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def kv_fp8_sim(kv: jnp.ndarray, rope_dim: int) -> jnp.ndarray:
  """FP8 round-trip of the non-RoPE dims in blocks of 64; the last `rope_dim` dims stay as they are."""
  return jnp.concatenate([act_quant(kv[..., :-rope_dim], 64), kv[..., -rope_dim:]], axis=-1)


def indexer_fp4_sim(x: jnp.ndarray) -> jnp.ndarray:
  """Hadamard rotation, then FP4 round-trip in blocks of 32 (indexer queries and keys)."""
  return fp4_act_quant(hadamard(x), 32)
