"""Storage of KV-cache entries (docs/architecture.md §3.3): every row is one run of 32-bit words.

A stored row is `uint32[words]`, whatever it holds, because that is what a kernel gathers best: on TPU a
row DMA out of a packed bf16/fp8 `[N, K]` array is rejected (sub-tile offsets, ../shared/docs/pallas.md
§0), while `uint32[N, words]` rows copy one at a time; on GPU a row is one contiguous pointer range.
Formats (`Layout.fmt`):

    "bfloat16" / "float32"  the K values, bit-cast to words (K/2 or K words)
    "fp8"   the paper's main-entry format: bytes [K-r fp8 e4m3 | (K-r)/64 e8m0 scales, padded to 4 bytes |
            r RoPE dims in `rope_dtype` (bf16, or fp32 for fp32 test runs)]        (Flash: 146 words = 584 B)
    "fp4"   indexer keys: bytes [K/2 e2m1 codes, two per byte, low nibble first | K/32 e8m0 scales, padded]
                                                                                   (Flash: 17 words = 68 B)
Under `quant_sim` the entries are already rounded onto exactly these grids, so the quantised formats are
lossless there; without it they quantise. Entries are encoded on write and decoded on read; `Store` is a
pytree (the words are its only leaf, the layout and packing are static).

Lane-dense packing (`lane_pack`): XLA:TPU lays out an array whose minor dimension is narrower than the 128
lanes with the *rows* minor, while the layer loop and the kernels want rows contiguous, so such a store is
relaid out whole, in and out of the scanned layer loop, on every decode step
(bench/results/decode_memory_tpu_v5p.txt). A store of short rows therefore keeps P = 128 / words rows per
line of 128 words: row r is words [(r % P) * words, (r % P + 1) * words) of line r // P. Only element-wise
formats (bfloat16 / float32) pack: a line of P such rows is one row of P * width values in the same format,
which is how the kernels read it (pallas_kernels/indexer.py).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dsv4_jax import quant

F32 = jnp.float32
_E2M1 = np.array(quant.E2M1_VALUES[:8], np.float32)   # NumPy: no backend at import time
FORMATS = ("bfloat16", "float32", "fp8", "fp4")


def _pad4(n: int) -> int:
  return -(-n // 4) * 4


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one row of `width` values is laid out in 32-bit words."""
  fmt: str
  width: int
  rope_dim: int = 0
  rope_dtype: str = "bfloat16"

  def __post_init__(self):
    if self.fmt not in FORMATS:
      raise ValueError(f"unknown KV storage format {self.fmt!r}; expected one of {FORMATS}.")

  @property
  def nbytes(self) -> int:
    """Bytes of one stored row (a multiple of 4)."""
    K, r = self.width, self.rope_dim
    if self.fmt in ("bfloat16", "float32"):
      return _pad4(K * jnp.dtype(self.fmt).itemsize)
    if self.fmt == "fp8":
      return (K - r) + _pad4((K - r) // 64) + _pad4(r * jnp.dtype(self.rope_dtype).itemsize)
    return K // 2 + _pad4(K // 32)

  @property
  def words(self) -> int:
    return self.nbytes // 4

  @property
  def scale_bytes(self) -> int:
    """Bytes of a row that are scales or padding (not entry values)."""
    K, r = self.width, self.rope_dim
    if self.fmt == "fp8":
      return _pad4((K - r) // 64)
    if self.fmt == "fp4":
      return _pad4(K // 32)
    return self.nbytes - K * jnp.dtype(self.fmt).itemsize

  def encode(self, x: jnp.ndarray) -> jnp.ndarray:
    """Entries x [..., width] -> uint32 words [..., words]."""
    lead = x.shape[:-1]
    if self.fmt in ("bfloat16", "float32"):
      return _to_words(_bytes(x.astype(self.fmt)), lead)
    if self.fmt == "fp8":
      r = self.rope_dim
      nope = x[..., :-r]
      s = _block_scales(nope, 64, quant.FP8_MAX, 1e-4)
      q = jnp.clip(nope.astype(F32).reshape(*s.shape, 64) / s[..., None], -quant.FP8_MAX, quant.FP8_MAX)
      parts = [_bytes(q.reshape(nope.shape).astype(jnp.float8_e4m3fn)), _padded(_exponent_byte(s)),
               _padded(_bytes(x[..., -r:].astype(self.rope_dtype)))]
      return _to_words(jnp.concatenate(parts, -1), lead)
    s = _block_scales(x, 32, quant.FP4_MAX, quant.FP4_MAX * 2.0 ** -126)
    y = quant.round_e2m1(jnp.clip(x.astype(F32).reshape(*s.shape, 32) / s[..., None], -6, 6)).reshape(x.shape)
    code = jnp.argmin(jnp.abs(jnp.abs(y)[..., None] - _E2M1), axis=-1).astype(jnp.uint8) | jnp.where(
        y < 0, 8, 0).astype(jnp.uint8)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return _to_words(jnp.concatenate([packed, _padded(_exponent_byte(s))], -1), lead)

  def decode(self, words: jnp.ndarray, dtype) -> jnp.ndarray:
    """uint32 words [..., words] -> entries [..., width] in `dtype`."""
    K, r = self.width, self.rope_dim
    if self.fmt == "float32":
      return jax.lax.bitcast_convert_type(words, F32).astype(dtype)
    if self.fmt == "bfloat16":
      v = jax.lax.bitcast_convert_type(words, jnp.bfloat16)               # [..., words, 2]
      return v.reshape(*words.shape[:-1], K).astype(dtype)
    b = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(*words.shape[:-1], -1)   # [..., bytes]
    if self.fmt == "fp8":
      n = K - r
      s = _from_exponent_byte(b[..., n: n + n // 64])
      nope = jax.lax.bitcast_convert_type(b[..., :n], jnp.float8_e4m3fn).astype(F32)
      nope = (nope.reshape(*s.shape, 64) * s[..., None]).reshape(nope.shape)
      o = n + _pad4(n // 64)
      isz = jnp.dtype(self.rope_dtype).itemsize
      rope = jax.lax.bitcast_convert_type(b[..., o: o + r * isz].reshape(*b.shape[:-1], r, isz), self.rope_dtype)
      return jnp.concatenate([nope.astype(dtype), rope.astype(dtype)], -1)
    c = b[..., : K // 2]
    s = _from_exponent_byte(b[..., K // 2: K // 2 + K // 32])
    codes = jnp.stack([c & 15, c >> 4], -1).reshape(*c.shape[:-1], K)
    vals = jnp.where(codes >= 8, -1.0, 1.0) * jnp.asarray(_E2M1)[(codes & 7).astype(jnp.int32)]
    return (vals.reshape(*s.shape, 32) * s[..., None]).reshape(vals.shape).astype(dtype)


def _bytes(x: jnp.ndarray) -> jnp.ndarray:
  """Any array [..., n] -> its little-endian bytes uint8 [..., n * itemsize]."""
  return jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(*x.shape[:-1], -1)


def _padded(b: jnp.ndarray) -> jnp.ndarray:
  pad = _pad4(b.shape[-1]) - b.shape[-1]
  return jnp.pad(b, [(0, 0)] * (b.ndim - 1) + [(0, pad)]) if pad else b


def _to_words(b: jnp.ndarray, lead: tuple) -> jnp.ndarray:
  return jax.lax.bitcast_convert_type(b.reshape(*lead, -1, 4), jnp.uint32)


def _exponent_byte(s: jnp.ndarray) -> jnp.ndarray:
  """Power-of-two scale -> e8m0 byte (2^(b-127))."""
  return (jnp.frexp(s)[1] - 1 + 127).astype(jnp.uint8)


def _from_exponent_byte(b: jnp.ndarray) -> jnp.ndarray:
  return jnp.ldexp(jnp.ones(b.shape, F32), b.astype(jnp.int32) - 127)


def _block_scales(x: jnp.ndarray, block: int, qmax: float, floor: float) -> jnp.ndarray:
  xb = x.astype(F32).reshape(*x.shape[:-1], -1, block)
  return quant.pow2_ceil(jnp.maximum(jnp.max(jnp.abs(xb), -1), floor) / qmax)            # [..., n/block]


LANES = 128               # TPU vector lanes (32-bit words); a lane-dense line is a multiple of this


def lane_pack(layout: Layout) -> int:
  """Rows per line of a lane-dense store of this layout: 128 / words for element-wise formats whose rows
  divide the 128 lanes (e.g. bf16 indexer keys of 128 values: 64 words, 2 per line), else 1."""
  w = layout.words
  return LANES // w if layout.fmt in ("bfloat16", "float32") and w < LANES and LANES % w == 0 else 1


def line_layout(layout: Layout, pack: int) -> Layout:
  """The layout of one line of `pack` packed rows: a row of pack * width values in the same format."""
  if pack > 1 and layout.fmt not in ("bfloat16", "float32"):
    raise ValueError(f"rows of format {layout.fmt!r} do not pack into lines (element-wise formats only)")
  return layout if pack == 1 else dataclasses.replace(layout, width=layout.width * pack)


def unpack(words: jnp.ndarray, pack: int) -> jnp.ndarray:
  """Lines uint32 [..., L, pack * w] -> rows [..., L * pack, w] (a reshape: row r = line r // pack, slot
  r % pack)."""
  if pack == 1:
    return words
  *lead, L, pw = words.shape
  return words.reshape(*lead, L * pack, pw // pack)


def pack_lines(words: jnp.ndarray, pack: int) -> jnp.ndarray:
  """Rows uint32 [..., N, w] (N a multiple of pack) -> lines [..., N / pack, pack * w]: `unpack` inverted."""
  if pack == 1:
    return words
  *lead, N, w = words.shape
  return words.reshape(*lead, N // pack, pack * w)


@struct.dataclass
class Store:
  """Rows of KV entries as stored: `words` uint32 [..., N / pack, pack * layout.words] (leading axes:
  stacked layers, batch), encoded with the static `layout`; `pack` rows per line (`lane_pack`)."""
  words: jax.Array
  layout: Layout = struct.field(pytree_node=False)
  pack: int = struct.field(pytree_node=False, default=1)

  @property
  def n_rows(self) -> int:
    return self.words.shape[-2] * self.pack

  def rows(self) -> jnp.ndarray:
    """The stored words as rows: uint32 [..., N, layout.words]."""
    return unpack(self.words, self.pack)

  def decode(self, dtype) -> jnp.ndarray:
    return self.layout.decode(self.rows(), dtype)


def empty(lead: tuple, n: int, layout: Layout, pack: int = 1) -> Store:
  """A store of at least `n` zero rows per leading index, `pack` per line (n rounded up to a whole line;
  zero words decode to zeros in every format)."""
  lines = -(-n // pack)
  return Store(jnp.zeros((*lead, lines, pack * layout.words), jnp.uint32), layout, pack)
