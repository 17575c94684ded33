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

Keys stored as tiles (kv_format.Tiles: a key's words down the rows of a tile, 128 keys across its lanes)
decode the other way round (`decode_tile`): each part is its words' rows, [body, 128 keys], and the parts
stacked give a key's values down the rows in the layout's planar order, ready for one matmul with the query.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax import quant
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
  """The parts of one layout, and where its e8m0 scales sit (scaled formats). A *line* codec reads `slots`
  rows side by side in one line (a lane-dense store, dsv4_jax/kv_format.py): row p's lanes are the row
  codec's shifted by p * slot_lanes, its elements by p * layout.width (so a line decodes as one row of
  slots * width values)."""
  layout: Layout
  parts: tuple[Part, ...]
  scale_word: int = 0        # first word holding scale bytes
  n_scales: int = 0
  scale_block: int = 1       # elements per scale
  scale_lanes: int = 1       # lanes per scale: lane j of a scaled part uses scale (j - lo) // scale_lanes
  slots: int = 1
  slot_lanes: int = 0
  tiled: bool = False        # every slot's lanes hold the same elements (a plane of rows read one row a
                             # line, the row's own slot picked per row: `plane_codecs`)

  @property
  def width(self) -> int:
    """Elements per decoded line (the row's values, one row per slot; a tiled codec's: one row's)."""
    return self.layout.width * (1 if self.tiled else self.slots)


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


def line_codec(layout: Layout, slots: int, slot_lanes: int) -> Codec:
  """The codec of a line holding `slots` rows of `layout`, row p at words [p * slot_lanes, ...) (a lane-dense
  plane of whole rows, kv_format.lane_dense: e.g. fp4 keys of 17 words, 7 to a line)."""
  if slots == 1:
    return codec(layout)
  return dataclasses.replace(codec(layout), slots=slots, slot_lanes=slot_lanes)


def plane_codecs(layout: Layout, planes) -> list[Codec]:
  """One codec per plane of a store (kv_format.Plane): the row codec's parts and scales that fall in the
  plane, lanes counted from the plane's first word; a plane of P > 1 rows a line gets a *tiled* codec (P
  slots of `words` lanes, each the same elements), since a kernel reads one row's line and picks the row's
  slot per row."""
  c, out = codec(layout), []
  for pl_ in planes:
    parts = tuple(dataclasses.replace(p, lo=p.lo - pl_.lo) for p in c.parts if pl_.lo <= p.lo < pl_.hi)
    scaled = c.n_scales and pl_.lo <= c.scale_word < pl_.hi
    pc = Codec(layout, parts, c.scale_word - pl_.lo if scaled else 0, c.n_scales if scaled else 0,
               c.scale_block, c.scale_lanes)
    if any(p.scaled for p in parts) and not scaled:
      raise ValueError(f"plane {pl_} of {layout} holds scaled values without their scales")
    out.append(dataclasses.replace(pc, slots=pl_.pack, slot_lanes=pl_.words, tiled=True) if pl_.pack > 1 else pc)
  return out


def element_map(c: Codec, lanes: int) -> np.ndarray:
  """[P, lanes] int: the element each part's lane holds, -1 where none (static)."""
  m = np.full((len(c.parts), lanes), -1, np.int64)
  for i, p, lo, e0 in runs(c):
    m[i, lo:lo + p.n] = e0 + p.stride * np.arange(p.n)
  return m


def runs(c: Codec):
  """(part index, part, first lane, first element) of each part in each slot of a line: lanes [lo, lo + p.n)
  hold elements e0, e0 + p.stride, ... (a tiled codec's slots hold the same elements)."""
  for i, p in enumerate(c.parts):
    for s in range(c.slots):
      yield i, p, p.lo + s * c.slot_lanes, (0 if c.tiled else s * c.layout.width) + p.elem0


def split_parts(x: jnp.ndarray, c: Codec, lanes: int) -> list[jnp.ndarray]:
  """x [..., K] -> one [..., lanes] fp32 array per part, laid out like the row's parts (`element_map`; zeros
  where no element). Built from strided slices and zero padding: a gather (`jnp.take` of the element map)
  makes XLA:TPU lay the elements out major and the rows minor, padded to 128 lanes (a Flash-shaped decode
  step's [512, 8] query gather took 256 KB for 16 KB)."""
  x = x.astype(F32)
  out = []
  for _, part_runs in itertools.groupby(runs(c), key=lambda r: r[0]):       # a part's slots, lane by lane
    pieces, at = [], 0
    for _, p, lo, e0 in part_runs:
      pieces += [jnp.zeros(x.shape[:-1] + (lo - at,), F32), x[..., e0: e0 + p.stride * (p.n - 1) + 1: p.stride]]
      at = lo + p.n
    out.append(jnp.concatenate(pieces + [jnp.zeros(x.shape[:-1] + (lanes - at,), F32)], -1))
  return out


def split_query(q: jnp.ndarray, c: Codec, lanes: int) -> jnp.ndarray:
  """q [..., K] -> [..., P, lanes] in fp32, laid out like the row's parts (zeros where no element). A row's
  (or tiled plane's) parts by strided slices (`split_parts`); a line codec's (the indexer's virtual heads:
  P x slots slices, 56 for fp4 keys) by one gather, which XLA:TPU counts as far less traffic there
  (pallas_kernels.aot: the fp4 decode case 44 MB against 105 MB)."""
  if c.slots > 1 and not c.tiled:
    m = element_map(c, lanes)
    x = jnp.take(q.astype(F32), jnp.asarray(np.maximum(m, 0)), axis=-1)
    return jnp.where(jnp.asarray(m >= 0), x, 0.0)
  return jnp.stack(split_parts(q, c, lanes), -2)


def merge_parts(o: jnp.ndarray, c: Codec, lanes: int) -> jnp.ndarray:
  """o [..., P, lanes] (per-part P.V) -> [..., K]: each element from the lane(s) that hold it (a tiled codec:
  the sum over its slots). By slices: the parts whose elements interleave (a bf16 row's two halves, an fp8
  row's four bytes) are interleaved into their elements' run (`quant.interleave`), and the runs concatenated
  (zeros for the elements another plane holds), the inverse of `split_parts`. A gather (`jnp.take` of the
  element map) made XLA:TPU lay the output out elements-major, padded to 128 lanes (a Flash-shaped decode
  step's [512, 8] output: 256 KB for 16 KB); it stays the fallback for a codec whose parts do not tile runs
  of elements so."""
  by_elem = {}                                             # (first element, stride, n) -> [..., n]
  for i, p, lo, e0 in runs(c):
    key, v = (e0, p.stride, p.n), o[..., i, lo:lo + p.n]
    by_elem[key] = by_elem[key] + v if key in by_elem else v
  keys, out, at = sorted(by_elem), [], 0
  zeros = lambda n: jnp.zeros(o.shape[:-2] + (n,), o.dtype)
  while keys and keys[0][0] >= at:
    e0, stride, n = keys[0]
    group = [(e0 + j, stride, n) for j in range(stride)]
    if keys[:stride] != group:
      break
    v = [by_elem[k] for k in group]
    out += [zeros(e0 - at)] if e0 > at else []                 # elements no part holds (another plane's): 0
    out.append(quant.interleave(v))
    keys, at = keys[stride:], e0 + stride * n
  if not keys and at <= c.width:
    out += [zeros(c.width - at)] if at < c.width else []
    return out[0] if len(out) == 1 else jnp.concatenate(out, -1)
  return _merge_by_gather(o, c, lanes)


def _merge_by_gather(o: jnp.ndarray, c: Codec, lanes: int) -> jnp.ndarray:
  """`merge_parts` for any codec, by gathering each element from the lanes that hold it."""
  m = element_map(c, lanes)
  copies = [[] for _ in range(c.width)]                    # every (part, lane) holding each element
  for i in range(m.shape[0]):
    for j in np.nonzero(m[i] >= 0)[0]:
      copies[m[i, j]].append(i * lanes + j)
  flat = o.reshape(*o.shape[:-2], -1)
  zero = flat.shape[-1]                                    # an element a plane does not hold: 0
  flat = jnp.concatenate([flat, jnp.zeros(flat.shape[:-1] + (1,), flat.dtype)], -1)
  out = None
  for k in range(max(len(x) for x in copies)):             # a tiled codec: the sum over its slots
    v = jnp.take(flat, jnp.asarray([x[k] if k < len(x) else zero for x in copies]), axis=-1)
    out = v if out is None else out + v
  return out


def stored_lines(rows: Rows):
  """Rows read as lines -> (pool uint32 [lines_total, line], base int32 [B] (each sequence's first line in
  the pool), codec of a line, lines per sequence). Any one-plane store: whole rows (pack 1), element-wise
  rows packed P a line, or a lane-dense plane of P rows a line (line codec)."""
  if rows.layout is not None and len(rows.geometry) > 1:
    from pallas_kernels.platform import KernelUnsupported
    raise KernelUnsupported(f"this kernel reads rows of one plane; this {rows.layout.fmt} store has "
                            f"{len(rows.geometry)} (kv_format.lane_dense)")
  if not rows.whole_rows:
    layout, [(pool, base, plane)] = stored_planes(rows)
    return pool, base, line_codec(layout, plane.pack, plane.words), rows.data.shape[-2]
  pool, base, layout, N = stored(rows, lines=True)
  return pool, base, codec(layout), N


def stored_planes(rows: Rows):
  """Rows -> (layout, [(pool uint32 [lines_total, line], base int32 [B] (each sequence's first line in the
  pool), kv_format.Plane)] one per plane). A store is reshaped, never copied (a stacked group's layer
  `rep` is an offset); plain values are encoded once, as whole rows."""
  from dsv4_jax.kv_format import rows_geometry
  if rows.layout is None:
    pool, base, layout, _ = stored(rows)
    return layout, [(pool, base, rows_geometry(layout)[0])]
  out = []
  for a, plane in zip(rows.arrays, rows.geometry):
    B, L = a.shape[-3], a.shape[-2]
    base = jnp.arange(B, dtype=jnp.int32) * L
    if rows.rep is not None:
      base = base + rows.rep.astype(jnp.int32) * (B * L)
    out.append((a.reshape(-1, a.shape[-1]), base, plane))
  return rows.layout, out


def stored(rows: Rows, lines: bool = False):
  """Rows -> (pool uint32 [rows_total, w], base int32 [B] (each sequence's first row in the pool), layout,
  N rows per sequence). A store is reshaped, never copied (a stacked group's layer `rep` is an offset);
  plain values (the window's new rows, `forward`'s entries: small or transient) are encoded once.
  A store of whole rows packed P to a line (`rows.pack` > 1, element-wise formats) comes as its lines, with
  the line layout, when the caller reads lines (`lines=True`); otherwise it is an error. Other geometries:
  `stored_planes`, `stored_lines`."""
  if not rows.whole_rows:
    raise ValueError("rowcodec.stored reads whole rows; read a lane-dense store with stored_planes or stored_lines")
  pack = rows.geometry[0].pack if rows.layout is not None else 1
  if pack > 1 and not lines:
    raise ValueError(f"this kernel reads single rows, but the store packs {pack} rows per line")
  if rows.layout is None:
    name = jnp.dtype(rows.data.dtype).name
    if name not in ("float32", "bfloat16"):
      raise ValueError(f"KV values of dtype {name}: expected float32 or bfloat16")
    layout = Layout(name, rows.data.shape[-1])
    words = layout.encode(rows.data)
  else:
    layout, words = line_layout(rows.layout, pack), rows.data
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


def _slot_lanes(c: Codec, lane: jnp.ndarray):
  """(slot, lane within the slot's row) of each lane; (0, lane) for a row codec."""
  if c.slots == 1:
    return None, lane
  slot = jax.lax.div(lane, c.slot_lanes)                                 # (no `//`: Mosaic lacks sign)
  return slot, lane - slot * c.slot_lanes


def _scales(words: jnp.ndarray, c: Codec, lane: jnp.ndarray) -> jnp.ndarray:
  """The e8m0 scale of each lane of the scaled parts: [rows, lanes] f32."""
  out = jnp.zeros(words.shape, F32)
  slot, rel = _slot_lanes(c, lane)
  blk = jax.lax.div(rel, c.scale_lanes)
  for t in range(c.slots):
    for i in range(c.n_scales):
      col, shift = t * c.slot_lanes + c.scale_word + i // 4, 8 * (i % 4)
      byte = ((words >> shift) & 255).astype(jnp.int32).astype(F32)
      e = jnp.sum(jnp.where(lane == col, byte, 0.0), axis=1, keepdims=True)           # [rows, 1]
      s = _f32_bits(e.astype(jnp.int32) << 23)                                      # 2^(e - 127)
      hit = blk == i if slot is None else (blk == i) & (slot == t)
      out = jnp.where(hit, s, out)
  return out


def decode_parts(words: jnp.ndarray, c: Codec, dtype=F32) -> list[jnp.ndarray]:
  """A slab of stored rows (or lines of a line codec) uint32 [rows, lanes] -> one f32 [rows, lanes] per part
  (zero off the part), with the values rounded to `dtype` (as the references decode rows to the compute
  dtype)."""
  lane = jax.lax.broadcasted_iota(jnp.int32, words.shape, 1)
  scale = _scales(words, c, lane) if c.n_scales else None
  slot, rel = _slot_lanes(c, lane)
  out = []
  for p in c.parts:
    v = _field(words, p)
    if p.scaled:
      v = v * scale
    if jnp.dtype(dtype) != jnp.dtype(F32):
      v = v.astype(dtype).astype(F32)
    on = (rel >= p.lo) & (rel < p.lo + p.n)
    out.append(jnp.where(on if slot is None else on & (slot < c.slots), v, 0.0))
  return out


# ---- tiles (kv_format.Tiles): keys across the lanes ------------------------------------------------------

def tile_parts_whole(c: Codec, body: int) -> bool:
  """Whether every part of the codec spans a tile group's body words (rows [0, body)): then a part is one
  field of the body and a tile decodes with no sublane slice (fp4: 8 nibbles of 16 words; bf16: 2 halves)."""
  return all(p.lo == 0 and p.n == body for p in c.parts) and (not c.n_scales or c.scale_word >= body)


def planar_order(c: Codec) -> np.ndarray:
  """The element each row of `decode_tile`'s result holds: the parts' elements, part after part."""
  return np.concatenate([p.elem0 + p.stride * np.arange(p.n) for p in c.parts])


def decode_tile(body: jnp.ndarray, tail, c: Codec, dtype=F32) -> jnp.ndarray:
  """One group of 128 keys stored as tiles: its body words uint32 [rows >= body, 128] (rows past the body
  are zero, or ignored: they only meet zeros of the query) and its tail words [tail, 128] (scales; None
  without) -> fp32 [P * rows, 128]: part p's values at rows [p * rows, (p + 1) * rows), element
  `planar_order(c)` of each key, rounded to `dtype` (`tile_parts_whole` must hold)."""
  scale = None
  if c.n_scales:
    t0 = c.scale_word - c.parts[0].n                                 # the first scale word's row in the tail
    s = jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, body.shape, 0), c.scale_lanes)   # scale of each row
    word = tail[t0: t0 + 1]                                                            # [1, 128]
    for k in range(1, -(-c.n_scales // 4)):
      word = jnp.where(jax.lax.div(s, 4) == k, tail[t0 + k: t0 + k + 1], word)
    byte = (word >> (8 * jax.lax.rem(s, 4)).astype(jnp.uint32)) & 255
    scale = _f32_bits(byte << 23)                                                      # 2^(e - 127)
  out = []
  for p in c.parts:
    v = _field(body, p)
    if p.scaled:
      v = v * scale
    out.append(v.astype(dtype).astype(F32) if jnp.dtype(dtype) != jnp.dtype(F32) else v)
  return out[0] if len(out) == 1 else jnp.concatenate(out, 0)
