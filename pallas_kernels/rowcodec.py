"""Decoding stored KV rows inside a kernel, with element-wise ops only (TPU Mosaic, Triton, interpret).

A stored row is `uint32[w]` (dsv4_jax/kv_format.py). Its values are not contiguous lanes of one dtype, so a
kernel does not rebuild the row: it splits it into *parts*, each a word-lane range decoding one value per
lane with shifts, masks and bit-casts:

    float32    1 part:   lane j          -> element j
    bfloat16   2 parts:  lane j, half h  -> element 2j + h                       (h = low / high 16 bits)
    fp8        4 parts:  lane j, byte t  -> element 4j + t, e4m3 x its 64-block's e8m0 scale
               + RoPE:   bf16 halves (2 parts) or f32 (1 part) from word (K-r + scale bytes) / 4 on
    fp4        8 parts:  lane j, nibble t -> element 8j + t, e2m1 x its 32-block's e8m0 scale

A query is split the same way outside the kernel (`split_query`: q_p[j] = q[element of part p, lane j], 0
where a part has no lane j), so that q . k = sum_p q_p . part_p(k) and the kernel never permutes lanes;
P.V comes out per part (`merge_parts` puts the elements back). Lanes outside a part are zeroed before use,
since their bits may be any value of another field (a NaN bit pattern included).

Scale bytes are pulled out of their word lane by a masked lane reduction (one per scale byte, at most 8),
which every backend lowers; no unaligned lane slice or in-kernel gather is needed.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.kv_format import Layout, line_layout
from dsv4_jax.ops import Rows

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Part:
  """Lanes [lo, lo + n) of a row, each giving element `elem0 + stride * (lane - lo)`."""
  kind: str          # "f32" | "bf16" | "e4m3" | "e2m1"
  field: int         # bf16: half (0 low, 1 high); e4m3: byte; e2m1: nibble
  lo: int
  n: int
  elem0: int
  stride: int
  scaled: bool = False


@dataclasses.dataclass(frozen=True)
class Codec:
  """The parts of one layout, and where its e8m0 scales sit (scaled formats)."""
  layout: Layout
  parts: tuple[Part, ...]
  scale_word: int = 0        # first word holding scale bytes
  n_scales: int = 0
  scale_block: int = 1       # elements per scale
  scale_lanes: int = 1       # lanes per scale: lane j of a scaled part uses scale (j - lo) // scale_lanes


@functools.lru_cache(maxsize=None)
def codec(layout: Layout) -> Codec:
  K, r = layout.width, layout.rope_dim
  if layout.fmt == "float32":
    return Codec(layout, (Part("f32", 0, 0, K, 0, 1),))
  if layout.fmt == "bfloat16":
    return Codec(layout, tuple(Part("bf16", h, 0, K // 2, h, 2) for h in (0, 1)))
  if layout.fmt == "fp8":
    n = K - r
    parts = [Part("e4m3", t, 0, n // 4, t, 4, True) for t in range(4)]
    o = (n + -(-(n // 64) // 4) * 4) // 4
    if layout.rope_dtype == "float32":
      parts.append(Part("f32", 0, o, r, n, 1))
    else:
      parts += [Part("bf16", h, o, r // 2, n + h, 2) for h in (0, 1)]
    return Codec(layout, tuple(parts), scale_word=n // 4, n_scales=n // 64, scale_block=64, scale_lanes=16)
  if layout.fmt == "fp4":
    parts = tuple(Part("e2m1", t, 0, K // 8, t, 8, True) for t in range(8))
    return Codec(layout, parts, scale_word=K // 8, n_scales=K // 32, scale_block=32, scale_lanes=4)
  raise ValueError(f"no in-kernel decoder for KV format {layout.fmt!r}")


def element_map(c: Codec, lanes: int) -> np.ndarray:
  """[P, lanes] int: the element each part's lane holds, -1 where none (static)."""
  m = np.full((len(c.parts), lanes), -1, np.int64)
  for i, p in enumerate(c.parts):
    m[i, p.lo:p.lo + p.n] = p.elem0 + p.stride * np.arange(p.n)
  return m


def split_query(q: jnp.ndarray, c: Codec, lanes: int) -> jnp.ndarray:
  """q [..., K] -> [..., P, lanes] in fp32, laid out like the row's parts (zeros where no element)."""
  m = element_map(c, lanes)
  x = jnp.take(q.astype(F32), jnp.asarray(np.maximum(m, 0)), axis=-1)
  return jnp.where(jnp.asarray(m >= 0), x, 0.0)


def merge_parts(o: jnp.ndarray, c: Codec, lanes: int) -> jnp.ndarray:
  """o [..., P, lanes] (per-part P.V) -> [..., K]: each element from the one lane that holds it."""
  m = element_map(c, lanes)
  part, lane = np.zeros(c.layout.width, np.int64), np.zeros(c.layout.width, np.int64)
  for i in range(m.shape[0]):
    for j in np.nonzero(m[i] >= 0)[0]:
      part[m[i, j]], lane[m[i, j]] = i, j
  flat = o.reshape(*o.shape[:-2], -1)
  return jnp.take(flat, jnp.asarray(part * lanes + lane), axis=-1)


def stored(rows: Rows, lines: bool = False):
  """Rows -> (pool uint32 [rows_total, w], base int32 [B] (each sequence's first row in the pool), layout,
  N rows per sequence). A store is reshaped, never copied (a stacked group's layer `rep` is an offset);
  plain values (the window's new rows, `forward`'s entries: small or transient) are encoded once.
  A lane-dense packed store (`rows.pack` > 1, dsv4_jax/kv_format.py) comes as its lines, with the line
  layout, when the caller reads lines (`lines=True`); otherwise it is an error."""
  if not rows.whole_rows:
    from pallas_kernels.platform import KernelUnsupported
    raise KernelUnsupported(
        f"the Pallas kernels read whole rows, but this {rows.layout.fmt} store is in the lane-dense geometry "
        f"({len(rows.geometry)} plane(s), {rows.geometry[0].pack} rows a line): build the cache for the kernels "
        "(init_cache(..., lane_dense=False), the default when cfg.attn_impl is a Pallas one)")
  if rows.pack > 1 and not lines:
    raise ValueError(f"this kernel reads single rows, but the store packs {rows.pack} rows per line")
  if rows.layout is None:
    name = jnp.dtype(rows.data.dtype).name
    if name not in ("float32", "bfloat16"):
      raise ValueError(f"KV values of dtype {name}: expected float32 or bfloat16")
    layout = Layout(name, rows.data.shape[-1])
    words = layout.encode(rows.data)
  else:
    layout, words = line_layout(rows.layout, rows.pack), rows.data
  B, N, w = words.shape[-3:]
  base = jnp.arange(B, dtype=jnp.int32) * N
  if rows.rep is not None:
    base = base + rows.rep.astype(jnp.int32) * (B * N)
  return words.reshape(-1, w), base, layout, N


# ---- in-kernel decoding (element-wise on a [rows, lanes] uint32 slab) -------------------------------------

def _f32_bits(bits: jnp.ndarray) -> jnp.ndarray:
  return jax.lax.bitcast_convert_type(bits.astype(jnp.uint32), F32)


def _e4m3(b: jnp.ndarray) -> jnp.ndarray:
  """e4m3fn byte (uint32 0..255) -> f32 (finite codes; the encoder never stores NaN)."""
  sign = (b >> 7) << 31
  e, m = (b >> 3) & 15, b & 7
  normal = _f32_bits(sign | ((e + 120) << 23) | (m << 20))
  sub = m.astype(jnp.int32).astype(F32) * (2.0 ** -9)
  return jnp.where(e == 0, jnp.where(b >> 7 == 1, -sub, sub), normal)


def _e2m1(c: jnp.ndarray) -> jnp.ndarray:
  """e2m1 nibble (uint32 0..15) -> f32: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives."""
  e, m = (c >> 1) & 3, c & 1
  mag = jnp.where(e == 0, m.astype(jnp.int32).astype(F32) * 0.5, _f32_bits(((e + 126) << 23) | (m << 22)))
  return jnp.where(c >= 8, -mag, mag)


def _field(words: jnp.ndarray, p: Part) -> jnp.ndarray:
  if p.kind == "f32":
    return _f32_bits(words)
  if p.kind == "bf16":
    return _f32_bits(words << 16 if p.field == 0 else words & jnp.uint32(0xFFFF0000))
  if p.kind == "e4m3":
    return _e4m3((words >> (8 * p.field)) & 255)
  return _e2m1((words >> (4 * p.field)) & 15)


def _scales(words: jnp.ndarray, c: Codec, lane: jnp.ndarray) -> jnp.ndarray:
  """The e8m0 scale of each lane of the scaled parts: [rows, lanes] f32."""
  out = jnp.zeros(words.shape, F32)
  for i in range(c.n_scales):
    col, shift = c.scale_word + i // 4, 8 * (i % 4)
    byte = ((words >> shift) & 255).astype(jnp.int32).astype(F32)
    e = jnp.sum(jnp.where(lane == col, byte, 0.0), axis=1, keepdims=True)             # [rows, 1]
    s = _f32_bits(e.astype(jnp.int32) << 23)                                        # 2^(e - 127)
    out = jnp.where(jax.lax.div(lane, c.scale_lanes) == i, s, out)      # (no `//`: Mosaic lacks sign)
  return out


def decode_parts(words: jnp.ndarray, c: Codec, dtype=F32) -> list[jnp.ndarray]:
  """A slab of stored rows uint32 [rows, lanes] -> one f32 [rows, lanes] per part (zero off the part), with
  the values rounded to `dtype` (as the references decode rows to the compute dtype)."""
  lane = jax.lax.broadcasted_iota(jnp.int32, words.shape, 1)
  scale = _scales(words, c, lane) if c.n_scales else None
  out = []
  for p in c.parts:
    v = _field(words, p)
    if p.scaled:
      v = v * scale
    if jnp.dtype(dtype) != jnp.dtype(F32):
      v = v.astype(dtype).astype(F32)
    out.append(jnp.where((lane >= p.lo) & (lane < p.lo + p.n), v, 0.0))
  return out
