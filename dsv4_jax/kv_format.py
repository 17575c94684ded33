"""Storage formats of KV-cache entries (docs/architecture.md §3.3).

"dense": one array in the storage dtype (bf16 or fp32).
"fp8":   the paper's main-entry format: the K-r non-RoPE dims as fp8 e4m3 with one power-of-two scale per 64
         (kept as an e8m0 exponent byte), the r RoPE dims in bf16 (the compute dtype).  {"nope", "scale", "rope"}
"fp4":   indexer keys as fp4 e2m1 codes packed two per byte with one power-of-two scale per 32.
         {"codes", "scale"}
Under `quant_sim` the entries are already rounded onto exactly these grids, so the formats are lossless
there; without it they quantise. Entries are encoded on write and decoded on read.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax import quant

F32 = jnp.float32
_E2M1 = jnp.array(quant.E2M1_VALUES[:8], F32)


def _exponent_byte(s: jnp.ndarray) -> jnp.ndarray:
  """Power-of-two scale -> e8m0 byte (2^(b-127))."""
  return (jnp.frexp(s)[1] - 1 + 127).astype(jnp.uint8)


def _from_exponent_byte(b: jnp.ndarray) -> jnp.ndarray:
  return jnp.ldexp(jnp.ones(b.shape, F32), b.astype(jnp.int32) - 127)


def _block_scales(x: jnp.ndarray, block: int, qmax: float, floor: float) -> jnp.ndarray:
  xb = x.astype(F32).reshape(*x.shape[:-1], -1, block)
  return quant.pow2_ceil(jnp.maximum(jnp.max(jnp.abs(xb), -1), floor) / qmax)            # [..., n/block]


def empty(shape: tuple, fmt: str, dtype, rope_dim: int):
  """Zero entries of `shape` [..., K] in format `fmt`."""
  *lead, K = shape
  if fmt == "dense":
    return jnp.zeros(shape, dtype)
  if fmt == "fp8":
    n = K - rope_dim
    return {"nope": jnp.zeros((*lead, n), jnp.float8_e4m3fn), "scale": jnp.full((*lead, n // 64), 127, jnp.uint8),
            "rope": jnp.zeros((*lead, rope_dim), dtype)}
  if fmt == "fp4":
    return {"codes": jnp.zeros((*lead, K // 2), jnp.uint8), "scale": jnp.full((*lead, K // 32), 127, jnp.uint8)}
  raise ValueError(f"unknown KV storage format {fmt!r}; expected 'dense', 'fp8' or 'fp4'.")


def format_of(stored) -> str:
  if not isinstance(stored, dict):
    return "dense"
  return "fp8" if "nope" in stored else "fp4"


def encode(x: jnp.ndarray, fmt: str, rope_dim: int, dtype=None):
  """Entries x [..., K] -> stored form (`dtype`: of dense storage, or of the fp8 format's RoPE dims)."""
  if fmt == "dense":
    return x.astype(dtype or x.dtype)
  if fmt == "fp8":
    nope = x[..., :-rope_dim]
    s = _block_scales(nope, 64, quant.FP8_MAX, 1e-4)
    q = jnp.clip(nope.astype(F32).reshape(*s.shape, 64) / s[..., None], -quant.FP8_MAX, quant.FP8_MAX)
    return {"nope": q.reshape(nope.shape).astype(jnp.float8_e4m3fn), "scale": _exponent_byte(s),
            "rope": x[..., -rope_dim:].astype(dtype or jnp.bfloat16)}
  s = _block_scales(x, 32, quant.FP4_MAX, quant.FP4_MAX * 2.0 ** -126)
  y = quant.round_e2m1(jnp.clip(x.astype(F32).reshape(*s.shape, 32) / s[..., None], -6, 6)).reshape(x.shape)
  code = jnp.argmin(jnp.abs(jnp.abs(y)[..., None] - _E2M1), axis=-1).astype(jnp.uint8) | jnp.where(
      y < 0, 8, 0).astype(jnp.uint8)
  return {"codes": code[..., 0::2] | (code[..., 1::2] << 4), "scale": _exponent_byte(s)}


def decode(stored, dtype) -> jnp.ndarray:
  """Stored form -> entries [..., K] in `dtype`."""
  fmt = format_of(stored)
  if fmt == "dense":
    return stored.astype(dtype)
  s = _from_exponent_byte(stored["scale"])
  if fmt == "fp8":
    nope = stored["nope"].astype(F32)
    nope = (nope.reshape(*s.shape, 64) * s[..., None]).reshape(nope.shape)
    return jnp.concatenate([nope.astype(dtype), stored["rope"].astype(dtype)], -1)
  c = stored["codes"]
  codes = jnp.stack([c & 15, c >> 4], -1).reshape(*c.shape[:-1], -1)
  vals = jnp.where(codes >= 8, -1.0, 1.0) * _E2M1[(codes & 7).astype(jnp.int32)]
  return (vals.reshape(*s.shape, 32) * s[..., None]).reshape(vals.shape).astype(dtype)


def write_rows(stored, rows: jnp.ndarray, values: jnp.ndarray, rope_dim: int):
  """stored [B, N, ...], rows [B, M] (>= N: dropped), values [B, M, K] -> stored with the rows replaced."""
  fmt = format_of(stored)
  dtype = {"dense": lambda: stored.dtype, "fp8": lambda: stored["rope"].dtype, "fp4": lambda: None}[fmt]()
  enc = encode(values, fmt, rope_dim, dtype)
  return jax.tree.map(lambda s, v: jax.vmap(lambda a, i, b: a.at[i].set(b, mode="drop"))(s, rows, v), stored, enc)
