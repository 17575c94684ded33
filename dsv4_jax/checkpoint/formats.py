"""The released quantised weight formats (docs/architecture.md §5.2), dequantised exactly.

FP8: e4m3 [out, in] with one e8m0 scale per 128x128 block [ceil(out/128), ceil(in/128)].
FP4: e2m1 packed two per int8 byte [out, in/2] (element 2k in the low nibble) with one e8m0 scale per
32 values [out, in/32].  Every value times a power of two is exact in bf16, so nothing is lost.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from dsv4_jax.quant import E2M1_VALUES as _E2M1  # noqa: E402

E2M1_VALUES = np.array(_E2M1, np.float32)


def scale_to_f32(scale: np.ndarray) -> np.ndarray:
  """e8m0 bytes (or already-float scales, as HF's weight_scale_inv) -> fp32 powers of two."""
  if scale.dtype == ml_dtypes.float8_e8m0fnu:
    return scale.astype(np.float32)
  if scale.dtype == np.uint8:
    return np.ldexp(np.float32(1), scale.astype(np.int32) - 127).astype(np.float32)
  return scale.astype(np.float32)


def dequant_fp8(w: np.ndarray, scale: np.ndarray, block: int = 128) -> np.ndarray:
  """w: e4m3 [out, in], scale [ceil(out/b), ceil(in/b)] -> fp32 [out, in]."""
  out, inp = w.shape
  expect = (-(-out // block), -(-inp // block))
  if scale.shape != expect:
    raise ValueError(f"fp8 weight {w.shape} needs a scale of shape {expect}, got {scale.shape}.")
  s = np.repeat(np.repeat(scale_to_f32(scale), block, 0), block, 1)[:out, :inp]
  return w.astype(np.float32) * s


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
  """int8/uint8 [out, in/2] -> fp32 e2m1 values [out, in]; low nibble first."""
  b = packed.view(np.uint8)
  vals = np.stack([E2M1_VALUES[b & 0xF], E2M1_VALUES[b >> 4]], axis=-1)
  return vals.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequant_fp4(packed: np.ndarray, scale: np.ndarray, block: int = 32) -> np.ndarray:
  """packed [out, in/2], scale [out, in/32] -> fp32 [out, in]."""
  w = unpack_fp4(packed)
  if scale.shape != (w.shape[0], w.shape[1] // block):
    raise ValueError(f"fp4 weight of logical shape {w.shape} needs a scale of shape "
                     f"{(w.shape[0], w.shape[1] // block)}, got {scale.shape}.")
  return w * np.repeat(scale_to_f32(scale), block, axis=1)


def dequantize(w: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
  """Any stored weight -> fp32 (or int for integer tables without a scale)."""
  if scale is None:
    if w.dtype in (ml_dtypes.float8_e4m3fn,):
      raise ValueError("an fp8 weight has no scale tensor beside it.")
    return w if np.issubdtype(w.dtype, np.integer) else w.astype(np.float32)
  if w.dtype in (np.int8, np.uint8):
    return dequant_fp4(w, scale)
  return dequant_fp8(w, scale)
