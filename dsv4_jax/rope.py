"""Partial, interleaved rotary position embedding (docs/architecture.md §2.4).

Pair i = (x[2i], x[2i+1]) of the last `r` dims is one complex number rotated by `pos * f_i`.
Sliding-only layers use plain RoPE with `rope_theta`; compressed layers (CSA/HCA) use `compress_rope_theta`
with YaRN frequency interpolation (no attention-scale correction).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from dsv4_jax import quant
from dsv4_jax.config import ModelConfig


def inv_freq(cfg: ModelConfig, compressed: bool) -> np.ndarray:
  """fp32 [r/2] inverse frequencies of a layer, computed as the reference does (fp32 pow)."""
  r = cfg.rope_head_dim
  base = cfg.compress_rope_theta if compressed else cfg.rope_theta
  exponent = np.arange(0, r, 2, dtype=np.float32) / np.float32(r)
  freqs = (np.float32(1.0) / (np.float32(base) ** exponent)).astype(np.float32)
  if compressed and cfg.rope_factor != 1.0:
    def correction_dim(n_rot):
      return r * math.log(cfg.original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))
    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), r - 1)
    if low == high:
      high += 0.001
    ramp = np.clip((np.arange(r // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    freqs = (freqs / np.float32(cfg.rope_factor) * ramp + freqs * (1 - ramp)).astype(np.float32)
  return freqs


def rope_angles(cfg: ModelConfig, compressed: bool, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos, sin of shape positions.shape + [r/2], fp32; angle = fp32(pos) * fp32(f_i)."""
  f = jnp.asarray(inv_freq(cfg, compressed))
  angles = positions.astype(jnp.float32)[..., None] * f
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, inverse: bool = False) -> jnp.ndarray:
  """Rotates the last `2 * cos.shape[-1]` dims of x, interleaved pairs, in fp32.

  x: [..., S, (N,) K]; cos/sin: [..., S, r/2], broadcast over any head axis between S and K
  (pass cos[..., None, :] for a head axis). The non-rotated leading dims are untouched.
  """
  r = 2 * cos.shape[-1]
  nope, rot = x[..., :-r], x[..., -r:].astype(jnp.float32)
  re, im = rot[..., 0::2], rot[..., 1::2]
  if inverse:
    sin = -sin
  out = quant.interleave([re * cos - im * sin, re * sin + im * cos])      # pairs back in place
  return jnp.concatenate([nope, out.astype(x.dtype)], axis=-1)
