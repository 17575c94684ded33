"""The compressor's gated softmax pooling of m tokens into one entry, as Pallas kernels.

Reference (must equal): `dsv4_jax.ops.compress_pool_ref` (= `dsv4_jax.compressor.pool`). C, Z: fp32
[B, n*m, coff*c], window-aligned (window i = rows i*m .. i*m+m-1); entry i, per channel ch:

    HCA (m != 4, coff = 1):  E[i, ch] = sum_t softmax_t(Z[i*m + t, ch]) * C[i*m + t, ch]      (m slots)
    CSA (m == 4, coff = 2):  the same over 2m slots: first-half channels [0, c) of window i-1 (for i = 0 the
                             carried `prev` window [B, m, 2c], default C = 0 / Z = -inf) and second-half
                             channels [c, 2c) of window i.

The softmax is jax.nn.softmax's formula (max, exp(z - max), divide by the sum, then the weighted sum), so
-inf logits get weight 0, and a slot set that is all -inf gives NaN exactly as the reference does (the model
never produces one: the second half of a CSA slot set is always real or 0, and -inf only enters through
`prev`). Sums run in a different order than XLA's, so results agree to fp32 rounding (~1e-7 relative).

Backends (same math, `_softmax_pool`):
  tpu  Mosaic. Grid (B, entry blocks of E, channel blocks of 128 lanes; all "parallel"). C and Z stay in
       their [B, n*m, coff*c] layout: a block is E*m rows x 128 lanes (no reshape in HBM, hence no relayout
       copy); the m slots of the E windows are read in the kernel with m strided loads (rows s, s+m, ...),
       or, when m is a multiple of 8, by a tile-aligned in-VMEM reshape to [E, m, 128]. CSA halo: a second
       BlockSpec on the same C/Z, 8 rows ending where the block starts (the previous block's last window),
       plus a BlockSpec on `prev` for the first block; the first-half slots are shifted down one window in
       VMEM (`pltpu.roll` by one row of the per-slot [E, 128] tiles, row 0 from the halo). This reads the
       halo's 8 rows per block instead of materialising a shifted copy of half of C and Z in the wrapper
       (which would add a full HBM write + read of that half). The two halves are the same array under two
       channel-block index maps when c is a multiple of 128; otherwise (only toy configs) the wrapper
       splits them and the block is the whole half (c lanes).
  gpu  Triton. Grid (B, entry blocks, channel blocks); each program gathers its [E, slots, cb] tile of C
       and Z with one pointer-tensor load each (rows e*m + s - m for CSA, so the halo is just the rows
       before the block, and `prev` for entry 0), all sizes padded to powers of two and masked.
Limits: CSA needs m = 4 (or any m dividing 8); HCA any m (TPU: m a multiple of 8, or m <= 32 unrolled).
The entry's finish (RMSNorm, RoPE, quantisation simulation: `compressor.finish`) stays in XLA.
Deviceless Mosaic compiles of AOT_CASES: `python -m pallas_kernels.aot`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dsv4_jax.compressor import overlaps
from pallas_kernels import cost
from pallas_kernels.platform import backend_for, check, interpret_mode, next_pow2

F32 = jnp.float32
LANES = 128
_TPU_BLOCK_ROWS = 1024        # default E*m rows per TPU block (m=4: 256 entries; m=128: 8 entries)
_GPU_TILE = 8192              # default elements per Triton [E, slots, cb] tile


def _softmax_pool(z, c, axis):
  """jax.nn.softmax(z, axis) weighted sum of c over `axis` (the reference's exact formula)."""
  mx = jnp.max(z, axis=axis, keepdims=True)
  e = jnp.exp(z - mx)
  w = e / jnp.sum(e, axis=axis, keepdims=True)
  return jnp.sum(w * c, axis=axis)


def _softmax_pool_slots(zs, cs):
  """The same over a Python list of per-slot tiles (TPU: slots unrolled, every op elementwise)."""
  mx = functools.reduce(jnp.maximum, zs)
  es = [jnp.exp(z - mx) for z in zs]
  s = functools.reduce(jnp.add, es)
  return functools.reduce(jnp.add, [(e / s) * c for e, c in zip(es, cs)])


# ---- TPU (Mosaic) ---------------------------------------------------------------------------------------

def _tpu_kernel(*refs, m: int, E: int, overlap: bool, halo: bool, aligned: bool):
  from jax.experimental.pallas import tpu as pltpu
  o_ref = refs[-1]

  def slots(ref):                                   # the m slots of the block's E windows: m x [E, cb]
    return [ref[pl.ds(s, E, stride=m), :] for s in range(m)] if E > 1 else [ref[pl.ds(s, 1), :] for s in range(m)]

  if not overlap:
    c_ref, z_ref = refs[:2]
    if aligned:                                     # m % 8 == 0: [E*m, cb] -> [E, m, cb] is tile-aligned
      cb = c_ref.shape[-1]
      o_ref[...] = _softmax_pool(z_ref[...].reshape(E, m, cb), c_ref[...].reshape(E, m, cb), 1)
    else:
      o_ref[...] = _softmax_pool_slots(slots(z_ref), slots(c_ref))
    return

  ca_ref, za_ref, cb_ref, zb_ref = refs[:4]         # first-half / second-half channels of this block's windows
  rest = refs[4:-1]
  if halo:
    ch_ref, zh_ref, cp_ref, zp_ref = rest           # halo: 8 rows ending at the block's first row
  else:
    cp_ref, zp_ref = rest
  j = pl.program_id(1)
  hb = 8

  def shifted(cur_ref, halo_ref, prev_ref):
    """First-half slots of windows e0-1 .. e0+E-2: m x [E, cb]."""
    out = []
    for s in range(m):
      h = prev_ref[pl.ds(s, 1), :]                                                 # [1, cb]
      if halo_ref is not None:
        h = jnp.where(j == 0, h, halo_ref[pl.ds(hb - m + s, 1), :])
      if E == 1:
        out.append(h)
      else:
        x = pltpu.roll(cur_ref[pl.ds(s, E, stride=m), :], 1, 0)                      # row e <- row e-1
        row = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
        out.append(jnp.where(row == 0, h, x))
    return out

  zs = shifted(za_ref, zh_ref if halo else None, zp_ref) + slots(zb_ref)
  cs = shifted(ca_ref, ch_ref if halo else None, cp_ref) + slots(cb_ref)
  o_ref[...] = _softmax_pool_slots(zs, cs)


def _pool_tpu(C, Z, m, prev, overlap, block_entries, interpret):
  from jax.experimental.pallas import tpu as pltpu
  B, L, cc = C.shape
  n = L // m
  c = cc // 2 if overlap else cc
  aligned = m % 8 == 0
  if overlap:
    check(8 % m == 0, f"compress_pool (TPU): CSA window m={m} must divide 8 (the halo is one 8-row tile)")
  else:
    check(aligned or m <= 32, f"compress_pool (TPU): HCA window m={m} must be a multiple of 8 or <= 32")
  if block_entries is None:
    block_entries = max(8, (_TPU_BLOCK_ROWS // m) // 8 * 8)
  check(block_entries % 8 == 0 and block_entries > 0,
        f"compress_pool (TPU): block_entries={block_entries} must be a positive multiple of 8")
  E = n if n <= block_entries else block_entries     # whole axis, or a multiple of 8 (E*m rows: too)
  nE = -(-n // E)
  cb = LANES if c % LANES == 0 else c
  nK = c // cb
  split = overlap and cb != LANES                   # halves not 128-lane blocks of one array: two arrays
  grid = (B, nE, nK)
  rows = lambda off: pl.BlockSpec((None, E * m, cb), lambda b, j, k: (b, j, k + off))
  if not overlap:
    in_specs, operands = [rows(0), rows(0)], [C, Z]
  else:
    if split:
      Ca, Za, Cb, Zb = C[..., :c], Z[..., :c], C[..., c:], Z[..., c:]
      Pc, Pz, off = prev[0][..., :c], prev[1][..., :c], 0
    else:
      Ca = Cb = C
      Za = Zb = Z
      Pc, Pz, off = prev[0], prev[1], nK
    in_specs, operands = [rows(0), rows(0), rows(off), rows(off)], [Ca, Za, Cb, Zb]
    halo = nE > 1
    if halo:
      per = E * m // 8
      hspec = pl.BlockSpec((None, 8, cb), lambda b, j, k: (b, jnp.maximum(j * per - 1, 0), k))
      in_specs += [hspec, hspec]
      operands += [Ca, Za]
    pspec = pl.BlockSpec((None, m, cb), lambda b, j, k: (b, 0, k))
    in_specs += [pspec, pspec]
    operands += [Pc, Pz]
  kernel = functools.partial(_tpu_kernel, m=m, E=E, overlap=overlap, halo=overlap and nE > 1, aligned=aligned)
  out_shape = jax.ShapeDtypeStruct((B, n, c), F32)
  halo_bytes = 2 * B * nE * nK * 8 * cb * 4 if overlap and nE > 1 else 0              # each block's 8-row halo
  ce = _cost(C, Z, prev, out_shape, extra_read=halo_bytes)
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs,
      out_specs=pl.BlockSpec((None, E, cb), lambda b, j, k: (b, j, k)),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=interpret, cost_estimate=ce,
  )(*operands)


def _cost(C, Z, prev, out_shape, extra_read: int = 0):
  """Both backends read every input row once (a CSA window's two halves are different channels) and write the
  entries: per input element an exp, a max, a multiply-add and a sum (softmax over the window)."""
  return cost.estimate(flops=4 * C.size, transcendentals=C.size, read=cost.nbytes(C, Z, prev) + extra_read,
                       written=cost.nbytes(out_shape))


# ---- GPU (Triton) ---------------------------------------------------------------------------------------

def _gpu_kernel(*refs, m: int, n: int, c: int, E: int, S: int, cb: int, overlap: bool):
  from jax.experimental.pallas import triton as pltriton
  if overlap:
    c_ref, z_ref, cp_ref, zp_ref, o_ref = refs
  else:
    c_ref, z_ref, o_ref = refs
  j, k = pl.program_id(1), pl.program_id(2)
  shape = (E, S, cb)
  e = j * E + jax.lax.broadcasted_iota(jnp.int32, shape, 0)                    # entry
  s = jax.lax.broadcasted_iota(jnp.int32, shape, 1)                            # slot
  ch = k * cb + jax.lax.broadcasted_iota(jnp.int32, shape, 2)                  # channel of the entry
  n_slots = 2 * m if overlap else m
  live = (e < n) & (ch < c) & (s < n_slots)
  if overlap:
    row = e * m + s - m                              # slots 0..2m-1 = rows of windows e-1, e
    col = jnp.where(s >= m, ch + c, ch)
  else:
    row, col = e * m + s, ch
  from_x = live & (row >= 0)
  r, cl = jnp.maximum(row, 0), jnp.minimum(col, c_ref.shape[-1] - 1)
  Cx = pltriton.load(c_ref.at[r, cl], mask=from_x, other=0.0)
  Zx = pltriton.load(z_ref.at[r, cl], mask=from_x, other=0.0)
  if overlap:                                        # entry 0's first half: the carried window
    from_p = live & (row < 0)
    pr = jnp.minimum(s, m - 1)
    Cx = jnp.where(from_p, pltriton.load(cp_ref.at[pr, cl], mask=from_p, other=0.0), Cx)
    Zx = jnp.where(from_p, pltriton.load(zp_ref.at[pr, cl], mask=from_p, other=0.0), Zx)
  Zx = jnp.where(s < n_slots, Zx, -jnp.inf)          # padding slots: weight 0
  o_ref[...] = _softmax_pool(Zx, Cx, 1)                                          # [E, cb]


def _pool_gpu(C, Z, m, prev, overlap, block_entries, interpret):
  from jax.experimental.pallas import triton as pltriton
  B, L, cc = C.shape
  n = L // m
  c = cc // 2 if overlap else cc
  S = next_pow2(2 * m if overlap else m)
  cb = min(next_pow2(c), LANES, max(1, _GPU_TILE // S))
  if block_entries is None:
    block_entries = max(1, _GPU_TILE // (S * cb))
  check(next_pow2(block_entries) == block_entries,
        f"compress_pool (GPU): block_entries={block_entries} must be a power of two")
  E = min(block_entries, next_pow2(n))
  grid = (B, -(-n // E), -(-c // cb))
  whole = lambda a: pl.BlockSpec((None,) + a.shape[1:], lambda b, j, k: (b, 0, 0))
  operands = [C, Z] + (list(prev) if overlap else [])
  kernel = functools.partial(_gpu_kernel, m=m, n=n, c=c, E=E, S=S, cb=cb, overlap=overlap)
  out_shape = jax.ShapeDtypeStruct((B, grid[1] * E, grid[2] * cb), F32)
  out = pl.pallas_call(                              # padded to whole blocks (1/(coff*m) of the input)
      kernel, grid=grid, in_specs=[whole(a) for a in operands],
      out_specs=pl.BlockSpec((None, E, cb), lambda b, j, k: (b, j, k)),
      out_shape=out_shape,
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret, cost_estimate=_cost(C, Z, prev, out_shape),
  )(*operands)
  return out if out.shape[1:] == (n, c) else out[:, :n, :c]


# ---- the op -----------------------------------------------------------------------------------------------

def pool(C, Z, ratio: int, prev=None, *, backend: str | None = None, interpret: bool | None = None,
         block_entries: int | None = None):
  """Same arguments and result as `dsv4_jax.ops.compress_pool_ref`: C, Z fp32 [B, n*m, coff*c], prev
  (CSA) = (C, Z) [B, m, 2c] or None -> entries [B, n, c] fp32.

  backend: "tpu" | "gpu" | None (the default device's platform; on CPU, the TPU kernel interpreted).
  block_entries: entries per program (TPU: a multiple of 8, default 1024 // m rows' worth; GPU: a power of
  two, default filling an 8192-element tile).
  """
  backend = backend_for(backend)
  interpret = interpret_mode(backend, interpret)
  m = int(ratio)
  B, L, cc = C.shape
  overlap = overlaps(m)
  check(Z.shape == C.shape, f"compress_pool: C {C.shape} and Z {Z.shape} differ")
  check(L % m == 0, f"compress_pool: {L} rows are not whole windows of m={m}")
  check(not overlap or cc % 2 == 0, f"compress_pool: CSA needs 2c channels, got {cc}")
  C, Z = C.astype(F32), Z.astype(F32)
  n, c = L // m, (cc // 2 if overlap else cc)
  if n == 0:
    return jnp.zeros((B, 0, c), F32)
  if overlap:
    if prev is None:
      prev = (jnp.zeros((B, m, cc), F32), jnp.full((B, m, cc), -jnp.inf, F32))
    check(prev[0].shape == (B, m, cc) and prev[1].shape == (B, m, cc),
          f"compress_pool: prev must be [B, m, 2c] = {(B, m, cc)}, got {prev[0].shape}, {prev[1].shape}")
    prev = (prev[0].astype(F32), prev[1].astype(F32))
  else:
    prev = None
  fn = _pool_tpu if backend == "tpu" else _pool_gpu
  return fn(C, Z, m, prev, overlap, block_entries, interpret)


# ---- deviceless Mosaic compilation (AOT) ------------------------------------------------------------------

def _case(ratio: int, c: int, batch: int, entries: int):
  cc = (2 if overlaps(ratio) else 1) * c
  x = jax.ShapeDtypeStruct((batch, entries * ratio, cc), F32)
  if overlaps(ratio):
    p = jax.ShapeDtypeStruct((batch, ratio, cc), F32)
    fn = lambda C, Z, pc, pz: pool(C, Z, ratio, (pc, pz), backend="tpu", interpret=False)
    return fn, (x, x, p, p)
  return (lambda C, Z: pool(C, Z, ratio, None, backend="tpu", interpret=False)), (x, x)


# Flash and Pro share these dims: main KV c = head_dim 512 (CSA m=4 with 2c channels, HCA m=128), indexer
# keys c = 128 (CSA only). Decode pools one entry; prefill a chunk of 512 tokens (129 CSA / 5 HCA windows
# with the carried partial window) or a 4096-token prompt (1024 CSA entries).
AOT_CASES = [
    (f"{name}_{'decode' if n == 1 else 'prefill'}_b{b}_n{n}", *_case(ratio, c, b, n))
    for name, ratio, c in (("csa512", 4, 512), ("hca512", 128, 512), ("csa128", 4, 128))
    for b, n in ((1, 1), (8, 1), (8, 129 if ratio == 4 else 5), (1, 1024 if ratio == 4 else 32))
]
