"""The Pallas KV-entry encoder (pallas_kernels/encode.py) against `Layout.encode` (= ops.encode_rows_ref),
bit for bit, in every storage format, both backends in interpret mode: random entries and edge cases (zeros,
values exactly at rounding ties and one ulp either side, fp8 subnormals, tiny values under the scale floor,
huge values, negative zero, f32 subnormals), odd row counts, Flash's dims (K = 512 with 64 RoPE dims,
indexer cI = 128). Plus the CUDA lowering of the Triton kernel, the TPU lowering of AOT_CASES (the Mosaic
compile itself: `python -m pallas_kernels.aot --only=encode`, tests/test_pallas_aot.py) and the op wired
into `LayerCache.write`."""
import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsv4_jax import load_config, ops
from dsv4_jax.cache import LayerCache
from dsv4_jax.kv_format import Layout, Store
from pallas_kernels import encode
from pallas_kernels.platform import KernelUnsupported

warnings.filterwarnings("ignore", message=".*Triton backend is deprecated.*")
BACKENDS = ("tpu", "gpu")
F32 = np.float32

# Flash's layouts (main entries: fp8 + bf16 RoPE as the paper, fp8 + fp32 RoPE for fp32 models, bf16, f32;
# indexer keys: fp4), and two small ones (one fp8 block, two fp4 blocks: scale bytes that do not fill a word).
LAYOUTS = [Layout("fp8", 512, 64, "bfloat16"), Layout("fp8", 512, 64, "float32"), Layout("bfloat16", 512),
           Layout("float32", 512), Layout("fp4", 128), Layout("fp8", 72, 8, "bfloat16"), Layout("fp4", 64)]


def _ids(v):
  return f"{v.fmt}-{v.width}-{v.rope_dim}-{v.rope_dtype}" if isinstance(v, Layout) else str(v)


def _with_neighbours(v: np.ndarray) -> np.ndarray:
  v = v.astype(F32)
  return np.concatenate([v, np.nextafter(v, F32(np.inf)), np.nextafter(v, F32(-np.inf))])


def _grid_points(fmt: str) -> np.ndarray:
  """Positive grid values of the scaled code (e4m3fn finite / e2m1), the midpoints (ties) between them, and
  each one ulp either side."""
  if fmt == "fp8":
    g = np.unique(np.abs(np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(F32)))
    g = g[np.isfinite(g)]
  else:
    g = np.array([0, .5, 1, 1.5, 2, 3, 4, 6], F32)
  mids = (g[:-1] + g[1:]) / 2
  return _with_neighbours(np.concatenate([g, mids]))


def _bf16_ties(rng, n: int) -> np.ndarray:
  """f32 values exactly halfway between two bf16 values, one ulp either side, and specials."""
  hi = rng.integers(0x0080, 0x7F00, n).astype(np.uint32) << 16
  v = (hi | 0x8000).view(F32) * rng.choice(np.array([-1, 1], F32), n)
  special = np.array([0.0, -0.0, 1e-40, -1e-40, 3e-39, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8),
                      np.finfo(F32).max, -np.finfo(F32).max, np.finfo(F32).tiny], F32)
  return np.concatenate([_with_neighbours(v), special])


def _edge_rows(layout: Layout, rows: int, seed: int = 0) -> np.ndarray:
  """[rows, K] f32 rows of edge cases for the layout (see the module docstring)."""
  rng = np.random.default_rng(seed)
  K, r = layout.width, layout.rope_dim
  x = np.zeros((rows, K), F32)
  if layout.fmt in ("float32", "bfloat16"):
    pool = _bf16_ties(rng, K)
    x[:] = rng.choice(pool, (rows, K))
    x[0] = 0.0
    return x
  n = K - r if layout.fmt == "fp8" else K
  bs, qmax = (64, 448.0) if layout.fmt == "fp8" else (32, 6.0)
  pool = _grid_points(layout.fmt)
  q = rng.choice(pool, (rows, n)) * rng.choice(np.array([-1, 1], F32), (rows, n))
  q[rng.random((rows, n)) < 0.03] = -0.0
  q[rng.random((rows, n)) < 0.03] = F32(1e-30)
  q = q.reshape(rows, n // bs, bs)
  k = rng.integers(-40, 40, (rows, n // bs, 1)).astype(F32)
  q[:, :, 0] = qmax * rng.choice(np.array([-1, 1], F32), (rows, n // bs))   # amax = qmax * 2^k: scale 2^k
  x_n = q * np.exp2(k)
  # per block, at random: amax one ulp above qmax * 2^k (scale 2^(k+1)); all values under the floor
  # (incl. f32 subnormals); huge values; an all-zero block
  kind = rng.integers(0, 6, (rows, n // bs))
  up = kind == 1
  away = (np.sign(x_n[:, :, 0]) * np.inf).astype(F32)
  x_n[:, :, 0] = np.where(up, np.nextafter(x_n[:, :, 0], away), x_n[:, :, 0])
  tiny = np.exp2(rng.uniform(-149, -124 if layout.fmt == "fp4" else -20, (rows, n // bs, bs))).astype(F32)
  x_n = np.where((kind == 2)[..., None], tiny * np.sign(q + 0.5), x_n)
  huge = (q / qmax * F32(3e38)).astype(F32)
  x_n = np.where((kind == 3)[..., None], huge, x_n)
  x_n = np.where((kind == 4)[..., None], 0.0, x_n)
  x[:, :n] = x_n.reshape(rows, n)
  if r:
    x[:, n:] = rng.choice(_bf16_ties(rng, r), (rows, r))
  x[0] = 0.0                                            # an all-zero row
  if rows > 1:
    x[1] = -0.0
  return x


def _random(layout: Layout, shape, dtype, seed=1):
  k1, k2 = jax.random.split(jax.random.key(seed))
  mag = jnp.exp(jax.random.uniform(k2, (*shape, 1), minval=-10, maxval=10))
  return (jax.random.normal(k1, (*shape, layout.width)) * mag).astype(dtype)


def _assert_same(got, want):
  got, want = np.asarray(got), np.asarray(want)
  assert got.dtype == want.dtype == np.uint32 and got.shape == want.shape
  bad = np.argwhere(got != want)
  assert bad.size == 0, f"{len(bad)} words differ, first at {bad[:4].tolist()}: {got[tuple(bad[0])]:#010x} vs " \
                        f"{want[tuple(bad[0])]:#010x}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=_ids)
def test_encode_matches_reference(backend, layout):
  """Edge rows then random rows (f32), 3 x 13 rows: several row blocks with a ragged last one."""
  edge = _edge_rows(layout, 20)
  rand = np.asarray(_random(layout, (19,), jnp.float32))
  x = jnp.asarray(np.concatenate([edge, rand]).reshape(3, 13, layout.width))
  got = encode.encode_rows(x, layout, backend=backend, interpret=True, block_rows=8)
  _assert_same(got, layout.encode(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[2], LAYOUTS[4]], ids=_ids)
def test_encode_bf16_values(backend, layout):
  """bf16 entries (the bf16 model's), default row blocks, one decode row and 5 x 3 rows."""
  for shape in ((1, 1), (5, 3)):
    x = _random(layout, shape, jnp.bfloat16, seed=sum(shape))
    _assert_same(encode.encode_rows(x, layout, backend=backend, interpret=True), layout.encode(x))


def test_edge_rows_hit_the_edges():
  """The edge rows do reach what they are for: fp8 subnormal codes, -0 bytes, ties, bf16 infinities."""
  lay = Layout("fp8", 512, 64, "bfloat16")
  b = np.asarray(jax.lax.bitcast_convert_type(lay.encode(jnp.asarray(_edge_rows(lay, 20))), jnp.uint8))
  codes = b[..., :448].reshape(-1)
  assert ((codes & 0x78) == 0).any() and (codes == 0x80).any() and ((codes & 0x7F) == 0x7E).any()
  assert ((codes & 0x7F) > 0).sum() > 1000 and (((codes & 0x78) == 0) & ((codes & 7) > 0)).any()


def test_ops_wiring_and_layer_cache_write(monkeypatch):
  """ops.encode_rows: "xla" = Layout.encode, "pallas_tpu" = the kernel; LayerCache.write with a cfg encodes
  through the op (a stacked group's layer), without one through Layout.encode, with the same words."""
  cfg = load_config("tiny")
  lay = Layout("fp8", 128, 64, "float32")
  x = _random(lay, (2, 3), jnp.float32)
  _assert_same(ops.encode_rows(cfg, x, lay), lay.encode(x))
  calls = []

  def spy(values, layout):
    calls.append(values.shape)
    return encode.encode_rows(values, layout, backend="tpu", interpret=True)

  monkeypatch.setitem(ops._IMPLS, "pallas_tpu", dict(ops._IMPLS.get("pallas_tpu", {}), encode_rows=spy))
  kcfg = dataclasses.replace(cfg, attn_impl="pallas_tpu")
  _assert_same(ops.encode_rows(kcfg, x, lay), lay.encode(x))
  tree = {"comp": Store(jnp.zeros((2, 2, 5, lay.words), jnp.uint32), lay)}
  rows = jnp.array([[0, 4, 9], [1, 2, 3]])                        # row 9: out of range, dropped
  rep = jnp.asarray(1)
  want = LayerCache(tree, rep, 5).write("comp", rows, x).tree["comp"].words
  got = LayerCache(tree, rep, 5, kcfg).write("comp", rows, x).tree["comp"].words
  _assert_same(got, want)
  assert calls[-1] == (2, 3, 128)


@pytest.mark.parametrize("layout,rows", [(LAYOUTS[0], 1), (LAYOUTS[0], 128), (LAYOUTS[4], 33),
                                         (LAYOUTS[3], 8)], ids=_ids)
def test_triton_lowers_for_cuda(layout, rows):
  f = functools.partial(encode.encode_rows, layout=layout, backend="gpu", interpret=False)
  text = jax.jit(f).trace(jax.ShapeDtypeStruct((rows, layout.width), jnp.bfloat16)).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "triton" in text


def test_aot_cases_trace_for_tpu():
  """AOT_CASES are well-formed (decode and prefill at Flash's dims) and lower for TPU."""
  names = [name for name, _, _ in encode.AOT_CASES]
  assert any("decode" in n for n in names) and any("prefill" in n for n in names)
  for name, fn, args in encode.AOT_CASES:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text, name


def test_unsupported_raise():
  with pytest.raises(KernelUnsupported, match="whole word fields"):
    encode.encode_rows(jnp.zeros((2, 7)), Layout("bfloat16", 7), backend="tpu")
  with pytest.raises(KernelUnsupported, match="multiple of 8"):
    encode.encode_rows(jnp.zeros((20, 64)), Layout("fp4", 64), backend="tpu", block_rows=6)
  with pytest.raises(KernelUnsupported, match="power of two"):
    encode.encode_rows(jnp.zeros((20, 64)), Layout("fp4", 64), backend="gpu", block_rows=6)
  with pytest.raises(KernelUnsupported, match="rows of"):
    encode.encode_rows(jnp.zeros((2, 63)), Layout("fp4", 64), backend="tpu")

