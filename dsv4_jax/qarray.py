"""Quantised weights as a pytree: the released fp8 / fp4 formats, consumed directly by the matmuls
(docs/architecture.md §2.0, §5.2).

    fp8:  values float8_e4m3fn [..., O, I],       scales uint8 e8m0 [..., ceil(O/128), ceil(I/128)], block (128, 128)
    fp4:  values uint8 [..., O, I/2] (e2m1 x2,    scales uint8 e8m0 [..., O, I/32],                    block (1, 32)
          element 2k in the low nibble)

    W[..., o, i] = value[..., o, i] * 2^(scale[..., o // block[0], i // block[1]] - 127)

The leading `...` axes are stacked layers (lax.scan) and routed experts; `block` covers the last two
axes only. Scales are the raw e8m0 exponent bytes (uint8), so every format round-trips through
Orbax / tensorstore. Every e4m3 or e2m1 value times a power of two is exact in bf16, so `dense` gives
bit for bit the weight a dequantised checkpoint holds. The model calls `dense(w, dtype)` wherever it
uses a weight: the same code runs on plain arrays and on `QArray`s.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

F32 = jnp.float32
FP8_BLOCK = (128, 128)
FP4_BLOCK = (1, 32)
FORMATS = ("fp8", "fp4")
from dsv4_jax.quant import e2m1_to_f32, slots_first  # noqa: E402


@struct.dataclass
class QArray:
  """A block-scaled weight. `values` and `scales` are arrays (jax or numpy); `block`, `fmt` static."""
  values: jax.Array
  scales: jax.Array
  block: tuple[int, int] = struct.field(pytree_node=False, default=FP8_BLOCK)
  fmt: str = struct.field(pytree_node=False, default="fp8")

  @property
  def shape(self) -> tuple[int, ...]:
    """The logical (dequantised) shape."""
    s = tuple(self.values.shape)
    return s[:-1] + (2 * s[-1],) if self.fmt == "fp4" else s

  @property
  def ndim(self) -> int:
    return len(self.values.shape)

  @property
  def nbytes(self) -> int:
    return int(self.values.nbytes) + int(self.scales.nbytes)

  def dequantize(self, dtype=jnp.bfloat16) -> jax.Array:
    return dequantize(self, dtype)


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
  """e8m0 scale shape for a logical weight shape [..., O, I] (partial blocks round up, as the reference)."""
  *lead, o, i = shape
  return tuple(lead) + (-(-o // block[0]), -(-i // block[1]))


def e8m0_to_f32(s: jax.Array) -> jax.Array:
  """uint8 exponent bytes -> fp32 2^(s-127), exact (bit construction; 0 -> 2^-127, 255 -> NaN)."""
  f = jax.lax.bitcast_convert_type(s.astype(jnp.uint32) << 23, F32)
  f = jnp.where(s == 0, F32(2.0 ** -127), f)
  return jnp.where(s == 255, F32(jnp.nan), f)


def unpack_fp4(packed: jax.Array, dtype=F32) -> jax.Array:
  """uint8 [..., I/2] -> e2m1 values [..., I] in `dtype` (low nibble first; exact in bf16 and fp32)."""
  b = packed.astype(jnp.uint8)
  vals = jnp.stack([e2m1_to_f32(b & 0xF).astype(dtype), e2m1_to_f32(b >> 4).astype(dtype)], axis=-1)
  return vals.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def _apply_block_scales(v: jax.Array, s: jax.Array, block: tuple[int, int]) -> jax.Array:
  """v: [..., O, I], s: [..., ceil(O/b0), ceil(I/b1)] (same dtype) -> v * s broadcast over the blocks."""
  *lead, o, i = v.shape
  b0, b1 = block
  po, pi = s.shape[-2] * b0 - o, s.shape[-1] * b1 - i
  if po or pi:                                   # partial edge blocks: pad, scale, cut
    v = jnp.pad(v, [(0, 0)] * len(lead) + [(0, po), (0, pi)])
  vb = v.reshape(*lead, s.shape[-2], b0, s.shape[-1], b1) * s[..., :, None, :, None]
  return vb.reshape(*lead, o + po, i + pi)[..., :o, :i]


def dequantize(w: QArray, dtype=jnp.bfloat16) -> jax.Array:
  """The dense weight [..., O, I] in `dtype` (exact for bf16 and fp32).

  For bf16 the arithmetic is done in bf16: an e4m3 or e2m1 value (at most 4 significant bits) times a power
  of two is exact there, and where it underflows, one IEEE multiply rounds the exact product once, as the
  fp32 product cast to bf16 would (tests/test_modules.py checks every byte against every scale). No fp32
  copy of the weight exists then: the decode path's gathered experts ([U, out, in], dequantised per step)
  had fp32 buffers of 768 MiB per matrix for Flash at batch 4 on a v5p chip of expert:4; now the largest are
  bf16, 384 MiB (4 layers, deviceless compile; that step's peak, 2.65 GiB, is set elsewhere and unchanged)."""
  cdt = jnp.dtype(dtype) if jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(F32)) else jnp.dtype(F32)
  if w.fmt == "fp8":
    v = jnp.asarray(w.values).astype(cdt)
  elif w.fmt == "fp4":
    v = unpack_fp4(jnp.asarray(w.values), cdt)
  else:
    raise ValueError(f"QArray: unknown format {w.fmt!r}; expected one of {FORMATS}.")
  return _apply_block_scales(v, e8m0_to_f32(jnp.asarray(w.scales)).astype(cdt), w.block).astype(dtype)


def planar_operands(x: jax.Array, w, dtype) -> tuple[jax.Array, jax.Array]:
  """(x', W') with x' @ W'^T == x @ dense(w, dtype)^T, for x [..., I] and w [..., O, I]. For an fp4 QArray
  (scale blocks of one row) W' keeps the input dimension in planar order: the low nibble of every byte, then
  the high one (elements 0, 2, 4, ... then 1, 3, 5, ...), each half decoded element-wise on the [..., O, I/2] bytes, so that no [..., I/2, 2]
  interleave exists for XLA:TPU to lay out and relay out through memory (as dsv4_jax/kv_format.py's planar
  decode); x' is x permuted to match (small: the activations). Exact values, the products summed in another
  order. Otherwise (x, dense(w, dtype))."""
  if not (isinstance(w, QArray) and w.fmt == "fp4" and w.block[0] == 1):
    return x, dense(w, dtype)
  cdt = jnp.dtype(dtype) if jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(F32)) else jnp.dtype(F32)
  b = jnp.asarray(w.values).astype(jnp.uint8)                                     # [..., O, I/2]
  half = b.shape[-1]
  s = jnp.repeat(e8m0_to_f32(jnp.asarray(w.scales)).astype(cdt), w.block[1] // 2, axis=-1)[..., :half]
  lo, hi = (e2m1_to_f32(n).astype(cdt) * s for n in (b & 0xF, b >> 4))             # byte p: elements 2p, 2p+1
  W = jnp.concatenate([lo, hi], axis=-1).astype(dtype)
  return slots_first(x, 2), W


def dense(w, dtype) -> jax.Array:
  """The one place the model turns a stored weight into a matmul operand: a plain array is cast to
  `dtype`, a QArray dequantised blockwise to `dtype` (inside the caller's jit, layer by layer)."""
  if isinstance(w, QArray):
    return dequantize(w, dtype)
  return w.astype(dtype)


# ---- host-side (numpy) helpers used by the checkpoint reader ------------------------------------

def np_e8m0_bytes(scale: np.ndarray) -> np.ndarray | None:
  """Released scales (float8_e8m0fnu, uint8 bytes, or float powers of two as HF's weight_scale_inv)
  -> uint8 exponent bytes; None when a float scale is not an exact power of two."""
  import ml_dtypes
  if scale.dtype == ml_dtypes.float8_e8m0fnu:
    return np.asarray(scale).view(np.uint8)
  if scale.dtype == np.uint8:
    return np.asarray(scale)
  f = np.asarray(scale, np.float32)
  mant, exp = np.frexp(f)
  if not (np.all(mant == 0.5) and np.all(exp - 1 + 127 >= 1) and np.all(exp - 1 + 127 <= 254)):
    return None
  return (exp - 1 + 127).astype(np.uint8)
