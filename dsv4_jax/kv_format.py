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

Where rows sit (a store's *geometry*, a tuple of `Plane`s, or one `Tiles`): XLA:TPU lays out an array whose minor dimension
is not a multiple of the 128 lanes with the *rows* minor, while the layer loop and the ops want rows
contiguous, so such a store is relaid out whole, in and out of the scanned layer loop, on every decode step
(bench/results/decode_memory_tpu_v5p.txt). Three geometries:

  rows        (`rows_geometry`) every row whole and contiguous, `pack` rows per line (`lane_pack`: only
              element-wise formats whose rows divide 128 words, e.g. bf16 indexer keys of 128 values, 2 a
              line). The paper's rows exactly (584 B a Flash entry); `init_cache(lane_dense=False)`.
  lane-dense  (`lane_dense`, the cache's default) every array 128 words wide, so XLA:TPU never relays it
              out: a row is cut into planes at its fields' boundaries, and a plane of w < 128 words keeps
              128 // w rows per 128-word line (the rest padding), a wider one its rows padded to whole
              lines. The paper's fp8 entry (Flash: 146 words) becomes [448 fp8 | 7 scales | pad] = one
              128-word line and its 64 bf16 RoPE dims (32 words) 4 to a line, 640 B an entry against 584
              (tpu-inference keeps the same 512 + 128 B, compress_and_store/config.py); fp4 indexer keys
              (17 words) 7 to a line, 73.1 B a key against 68. A store is whole (8, 128) tiles (`empty`).

  tiles       (`key_tiles`, the indexer keys' default) rows transposed: a key's words run down the lines
              and 128 keys sit side by side in the lanes, 1024 keys a block (fp4: 136 lines, 68 B a key),
              so a kernel scores 128 keys with one matmul over their values (`Tiles`).

The byte format of a row (`Layout.encode` / `decode`) is the same in all; geometries only move its words. The
XLA ops (`ops.Rows`) and the Pallas kernels (pallas_kernels/rowcodec.py: a packed plane's line is decoded
whole and the row's slot picked per row) read both.
"""
from __future__ import annotations

import dataclasses
import math

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
  def rope_word(self) -> int:
    """fp8: the first word of the RoPE dims (after the fp8 values and their padded scales)."""
    K, r = self.width, self.rope_dim
    return ((K - r) + _pad4((K - r) // 64)) // 4

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
    if self.fmt == "float32":
      return jax.lax.bitcast_convert_type(x.astype(F32), jnp.uint32)
    if self.fmt == "bfloat16":                 # value 2i in word i's low half, by shifts (no [.., n, 2])
      h = jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)
      return h[..., 0::2] | (h[..., 1::2] << 16)
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

  @property
  def segments(self) -> tuple[tuple[int, int, int], ...]:
    """(first dim, dims, per word) of each run of dims packed `per word` into the row's 32-bit words: dim
    first + i of a run sits in slot i % per of its word i // per (little-endian: slot 0 is the low bits)."""
    K, r = self.width, self.rope_dim
    if self.fmt == "fp8":
      return ((0, K - r, 4), (K - r, r, 4 // jnp.dtype(self.rope_dtype).itemsize))
    return ((0, K, {"float32": 1, "bfloat16": 2, "fp4": 8}[self.fmt]),)

  def to_planar(self, x: jnp.ndarray) -> jnp.ndarray:
    """Values [..., width] in natural dim order -> the planar order `decode_planar` returns: each run lists
    its dims slot by slot (slot 0 of every word, then slot 1, ...), e.g. bf16 [d0, d2, ..., d1, d3, ...]."""
    return self._per_segment(x, quant.slots_first)

  def from_planar(self, y: jnp.ndarray) -> jnp.ndarray:
    """`to_planar` inverted."""
    return self._per_segment(y, quant.slots_last)

  def _per_segment(self, x: jnp.ndarray, permute) -> jnp.ndarray:
    parts = [permute(x[..., a: a + n], per) for a, n, per in self.segments]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, -1)

  def decode(self, words: jnp.ndarray, dtype) -> jnp.ndarray:
    """uint32 words [..., words] -> entries [..., width] in `dtype`."""
    return self.from_planar(self.decode_planar(words, dtype))

  def decode_planar(self, words: jnp.ndarray, dtype) -> jnp.ndarray:
    """uint32 words [..., words] -> entries [..., width] in `dtype`, dims in the planar order (`to_planar`).

    Every slot is decoded straight from the words by shifts and masks, element-wise on [..., words] arrays:
    nothing is ever laid out with a minor dimension of 2, 4 or 8 slots, which XLA:TPU materialises (and
    relays out) where a natural-order decode interleaves the slots (bench/decode_memory.py). The values are
    those of `decode`, bit for bit. The ops read rows this way and permute the (small) query to match
    (`ops.Rows`)."""
    K, r = self.width, self.rope_dim
    if self.fmt == "float32":
      return jax.lax.bitcast_convert_type(words, F32).astype(dtype)
    if self.fmt == "bfloat16":
      return jnp.concatenate(_bf16_slots(words), -1).astype(dtype)
    if self.fmt == "fp8":
      n = K - r
      nw = n // 4
      s = jnp.repeat(_from_exponent_byte(_bytes(words[..., nw: self.rope_word])[..., : n // 64]), 16, -1)
      nope = [jax.lax.bitcast_convert_type(_slot(words[..., :nw], k, 8).astype(jnp.uint8), jnp.float8_e4m3fn)
              .astype(F32) * s for k in range(4)]                            # word w's dims share scale w // 16
      rope = words[..., self.rope_word: self.rope_word + r * jnp.dtype(self.rope_dtype).itemsize // 4]
      rope = (_bf16_slots(rope) if self.rope_dtype == "bfloat16" else [jax.lax.bitcast_convert_type(rope, F32)])
      return jnp.concatenate([v.astype(dtype) for v in nope + rope], -1)
    nw = K // 8
    s = jnp.repeat(_from_exponent_byte(_bytes(words[..., nw:])[..., : K // 32]), 4, -1)   # word w: w // 4
    return jnp.concatenate([(quant.e2m1_to_f32(_slot(words[..., :nw], k, 4)) * s).astype(dtype)
                            for k in range(8)], -1)

  def decode_tiles(self, words: jnp.ndarray, dtype) -> jnp.ndarray:
    """uint32 words [..., words, n] (rows across the last axis, their words down axis -2: `Tiles`) -> values
    [..., width, n] in `dtype`, dims in the planar order of `decode_planar` down axis -2, bit for bit its
    values: every array keeps the n rows minor (no [..., words]-minor array for XLA:TPU to pad to 128 lanes).
    fp4 and bf16 rows (the formats `key_tiles` stores)."""
    if self.fmt == "bfloat16":
      return jnp.concatenate(_bf16_slots(words), -2).astype(dtype)
    if self.fmt != "fp4":
      raise ValueError(f"rows of format {self.fmt!r} are not stored as tiles (kv_format.key_tiles)")
    nw = self.width // 8
    j = np.arange(nw) // 4                                       # code word w's scale: byte w // 4
    sw = jnp.take(words, jnp.asarray(nw + j // 4), axis=-2) if self.words > nw + 1 else words[..., nw:nw + 1, :]
    s = _from_exponent_byte((sw >> jnp.asarray(8 * (j % 4), jnp.uint32)[:, None]) & jnp.uint32(255))
    return jnp.concatenate([(quant.e2m1_to_f32(_slot(words[..., :nw, :], k, 4)) * s).astype(dtype)
                            for k in range(8)], -2)


def _slot(words: jnp.ndarray, k: int, bits: int) -> jnp.ndarray:
  """The k-th `bits`-bit field of each word (little-endian: k = 0 is the low bits) as uint32."""
  return (words >> (k * bits)) & jnp.uint32((1 << bits) - 1)


def _bf16_slots(words: jnp.ndarray) -> list[jnp.ndarray]:
  """The two bf16 values of each word as fp32 [low half, high half]: a bf16 is the top half of an fp32."""
  return [jax.lax.bitcast_convert_type(words << 16, F32),
          jax.lax.bitcast_convert_type(words & jnp.uint32(0xFFFF0000), F32)]


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
SUBLANES = 8              # rows of a TPU (8, 128) tile


def lane_pack(layout: Layout) -> int:
  """Rows per line of a `rows_geometry` store: 128 / words for element-wise formats whose rows divide the
  128 lanes (e.g. bf16 indexer keys of 128 values: 64 words, 2 per line), else 1."""
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


@dataclasses.dataclass(frozen=True)
class Plane:
  """Words [lo, hi) of every row, `pack` rows to a line of `line` words: row r's words are
  [(r % pack) * w, (r % pack + 1) * w) of line r // pack (w = hi - lo); words past pack * w pad the line."""
  lo: int
  hi: int
  pack: int
  line: int

  @property
  def words(self) -> int:
    return self.hi - self.lo

  def lines(self, n: int) -> int:
    """Lines that hold n rows."""
    return -(-n // self.pack)

  def rows_in(self, lines: int) -> int:
    """Rows that `lines` lines hold."""
    return lines * self.pack

  @property
  def row_bytes(self) -> float:
    """Stored bytes per row, line padding included."""
    return 4 * self.line / self.pack

  def unpack(self, lines: jnp.ndarray) -> jnp.ndarray:
    """Lines uint32 [..., L, line] -> this plane's words of rows [..., L * pack, w]."""
    *lead, L, _ = lines.shape
    return lines[..., : self.pack * self.words].reshape(*lead, L * self.pack, self.words)

  def pack_rows(self, rows: jnp.ndarray) -> jnp.ndarray:
    """Rows' words uint32 [..., N, words of the whole row] -> this plane's lines [..., lines(N), line]."""
    x = rows[..., self.lo: self.hi]
    *lead, N, w = x.shape
    L = self.lines(N)
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, L * self.pack - N), (0, 0)]).reshape(*lead, L, self.pack * w)
    return jnp.pad(x, [(0, 0)] * (len(lead) + 1) + [(0, self.line - self.pack * w)])


GROUPS = SUBLANES           # Tiles: groups of 128 rows a block


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Rows stored transposed (the indexer keys' geometry, `key_tiles`): a row's words run down the lines and
  128 rows sit side by side in the lanes, so a kernel decodes a tile of [words, 128 keys] and scores 128 keys
  with one matmul over the key's dims (a line of P keys side by side must score them against P groups of
  virtual heads instead: 8x the matmul for fp4 keys).

  Rows come in blocks of GROUPS x 128 = 1024. Row r is lane r % 128 of group c = (r // 128) % 8 of block
  r // 1024. A block is GROUPS * words lines of 128 words: first every group's `body` words (group c at lines
  [c * body, (c + 1) * body) of the block), then every group's other `words - body` (an fp4 key's scale word:
  group c at 8 * body + c * tail). With body a multiple of 8 each group's body is whole (8, 128) tiles and a
  block's tails are too (fp4 keys of 128 values: 16 + 1 words, 136 lines a block, 68 B a key; no padding)."""
  words: int
  body: int

  lo = 0
  line = LANES
  pack = GROUPS * LANES                 # rows a block holds: what `align` makes block reads whole

  @property
  def hi(self) -> int:
    return self.words

  @property
  def tail(self) -> int:
    return self.words - self.body

  @property
  def block_lines(self) -> int:
    return GROUPS * self.words

  def lines(self, n):
    """Lines that hold n rows (whole blocks)."""
    return -(-n // self.pack) * self.block_lines

  def rows_in(self, lines: int) -> int:
    return lines // self.block_lines * self.pack

  @property
  def row_bytes(self) -> float:
    return 4.0 * self.words

  def line_of(self, rows: jnp.ndarray) -> jnp.ndarray:
    """rows [...] -> the line of each of their words [..., words] (the lane is row % 128)."""
    i = np.arange(self.words)
    c = ((rows // LANES) % GROUPS)[..., None]
    within = jnp.where(i < self.body, c * self.body + i, GROUPS * self.body + c * self.tail + (i - self.body))
    return (rows // self.pack)[..., None] * self.block_lines + within

  def groups(self, lines: jnp.ndarray) -> jnp.ndarray:
    """Whole blocks of lines uint32 [..., L, 128] -> each group's words [..., L / block_lines * 8, words, 128]
    (group g holds rows [128 g, 128 (g + 1)), one a lane)."""
    *lead, L, _ = lines.shape
    nb = L // self.block_lines
    x = lines.reshape(*lead, nb, self.block_lines, LANES)
    x = jnp.concatenate([x[..., : GROUPS * self.body, :].reshape(*lead, nb, GROUPS, self.body, LANES),
                         x[..., GROUPS * self.body:, :].reshape(*lead, nb, GROUPS, self.tail, LANES)], -2)
    return x.reshape(*lead, nb * GROUPS, self.words, LANES)

  def unpack(self, lines: jnp.ndarray) -> jnp.ndarray:
    """Whole blocks of lines uint32 [..., L, 128] -> rows [..., L / block_lines * 1024, words]."""
    x = self.groups(lines)
    return jnp.swapaxes(x, -1, -2).reshape(*x.shape[:-3], -1, self.words)

  def pack_rows(self, rows: jnp.ndarray) -> jnp.ndarray:
    """Rows' words uint32 [..., N, words] (N whole blocks) -> lines [..., lines(N), 128]: `unpack` inverted."""
    *lead, N, w = rows.shape
    x = jnp.swapaxes(rows.reshape(*lead, N // self.pack, GROUPS, LANES, w), -1, -2)      # [..., blocks, 8, w, 128]
    body = x[..., : self.body, :].reshape(*lead, N // self.pack, GROUPS * self.body, LANES)
    tail = x[..., self.body:, :].reshape(*lead, N // self.pack, GROUPS * self.tail, LANES)
    return jnp.concatenate([body, tail], -2).reshape(*lead, -1, LANES)


def key_tiles(layout: Layout) -> tuple[Tiles, ...] | None:
  """The indexer keys' geometry where a key's words split into a body of whole (8, 128) tiles and at most
  8 more words: fp4 (codes | scales) and bf16 keys, e.g. 16 + 1 and 64 + 0 words for 128 values. None where
  not (fp32 keys, whose 128-value rows are whole lines already, and odd widths)."""
  body = {"fp4": layout.width // 8, "bfloat16": layout.width // 2}.get(layout.fmt)
  if body is None or body % SUBLANES or body == 0 or layout.words - body > SUBLANES:
    return None
  return (Tiles(layout.words, body),)


def rows_geometry(layout: Layout, pack: int = 1) -> tuple[Plane, ...]:
  """Whole rows, `pack` to a line (pack > 1: element-wise formats, `lane_pack`)."""
  line_layout(layout, pack)                                      # raises for a format that does not pack
  return (Plane(0, layout.words, pack, pack * layout.words),)


def lane_dense(layout: Layout) -> tuple[Plane, ...]:
  """Every plane 128 words wide (or a multiple): element-wise rows as `rows_geometry` where they divide 128
  words; fp8 cut into [values | scales] and [RoPE dims]; each plane of w < 128 words packed 128 // w to a
  line, a wider one padded to whole lines."""
  w = layout.words
  if layout.fmt in ("bfloat16", "float32") and (w % LANES == 0 or LANES % w == 0):
    return rows_geometry(layout, lane_pack(layout))
  cuts = (0, layout.rope_word, w) if layout.fmt == "fp8" else (0, w)
  planes = []
  for lo, hi in zip(cuts[:-1], cuts[1:]):
    n = hi - lo
    pack = LANES // n if n < LANES else 1
    planes.append(Plane(lo, hi, pack, -(-pack * n // LANES) * LANES))
  return tuple(planes)


@struct.dataclass
class Store:
  """Rows of KV entries as stored, encoded with the static `layout` and laid out by `planes` (the geometry;
  () = whole rows, one per line): `words` uint32 [..., lines, line] holds the first plane, `tail` the second
  (a split fp8 row's RoPE dims; None when there is one plane). Leading axes: stacked layers, batch."""
  words: jax.Array
  layout: Layout = struct.field(pytree_node=False)
  planes: tuple = struct.field(pytree_node=False, default=())
  tail: jax.Array | None = None

  @property
  def geometry(self) -> tuple[Plane, ...]:
    return self.planes or rows_geometry(self.layout)

  @property
  def arrays(self) -> tuple[jax.Array, ...]:
    return (self.words,) if self.tail is None else (self.words, self.tail)

  @property
  def pack(self) -> int:
    """Rows per line of the first plane."""
    return self.geometry[0].pack

  @property
  def n_rows(self) -> int:
    return min(p.rows_in(a.shape[-2]) for a, p in zip(self.arrays, self.geometry))

  def rows(self) -> jnp.ndarray:
    """The stored words as whole rows: uint32 [..., N, layout.words]."""
    n = self.n_rows
    return jnp.concatenate([p.unpack(a)[..., :n, :] for a, p in zip(self.arrays, self.geometry)], -1)

  def decode(self, dtype) -> jnp.ndarray:
    return self.layout.decode(self.rows(), dtype)

  def map(self, fn) -> "Store":
    """The same store with fn applied to each plane's array (e.g. picking one layer of a stacked group)."""
    return dataclasses.replace(self, words=fn(self.words), tail=None if self.tail is None else fn(self.tail))


def row_bytes(layout: Layout, planes: tuple[Plane, ...] = ()) -> float:
  """Stored bytes per row in a geometry, line padding included (a line's bytes over the rows it holds)."""
  return sum(p.row_bytes for p in (planes or rows_geometry(layout)))


def align(planes: tuple[Plane, ...]) -> int:
  """Rows that are whole lines in every plane: a store's capacity and its block reads are multiples of this."""
  return math.lcm(*(p.pack for p in planes)) if planes else 1


def from_rows(words: jnp.ndarray, layout: Layout, planes: tuple[Plane, ...] = ()) -> Store:
  """Whole rows' words uint32 [..., N, layout.words] -> a Store in the geometry `planes` (N rounded up to
  `align` rows)."""
  geo = planes or rows_geometry(layout)
  N, a = words.shape[-2], align(geo)
  words = jnp.pad(words, [(0, 0)] * (words.ndim - 2) + [(0, -(-N // a) * a - N), (0, 0)])
  arrays = [p.pack_rows(words) for p in geo]
  return Store(arrays[0], layout, tuple(planes), arrays[1] if len(arrays) > 1 else None)


def empty(lead: tuple, n: int, layout: Layout, planes: tuple[Plane, ...] = ()) -> Store:
  """A store of at least `n` zero rows per leading index (zero words decode to zeros in every format). n is
  rounded up to `align` rows (whole lines in every plane), and where every plane is lane-dense to whole
  (8, 128) tiles of each plane: XLA:TPU relays out a stacked group's store of another line count (an
  [2, 1, 4682, 128] fp4 key store was copied in and out of the layer loop)."""
  geo = planes or rows_geometry(layout)
  per_tile = 1 if isinstance(geo[0], Tiles) or not all(p.line % LANES == 0 for p in geo) else SUBLANES
  a = align(geo) * per_tile                                            # (Tiles: a block is whole tiles)
  n = -(-n // a) * a
  arrays = [jnp.zeros((*lead, p.lines(n), p.line), jnp.uint32) for p in geo]
  return Store(arrays[0], layout, tuple(planes), arrays[1] if len(arrays) > 1 else None)
