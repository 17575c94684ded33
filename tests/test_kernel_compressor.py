"""The Pallas compressor pooling kernel (pallas_kernels/compressor.py) against its reference
`dsv4_jax.compressor.pool` (= ops.compress_pool_ref), both backends in interpret mode, plus the CUDA lowering
of the Triton kernel and the model's compressor running through the kernel. (Deviceless Mosaic compiles:
`python -m pallas_kernels.aot`, and tests/test_pallas_aot.py.)"""
import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax import compressor, init_params, load_config, ops
from pallas_kernels import compressor as kc
from pallas_kernels.platform import KernelUnsupported

warnings.filterwarnings("ignore", message=".*Triton backend is deprecated.*")
BACKENDS = ("tpu", "gpu")
TOL = dict(rtol=2e-6, atol=2e-6)


def _inputs(B, n, m, c, prev, seed=0):
  cc = (2 if compressor.overlaps(m) else 1) * c
  k = jax.random.split(jax.random.key(seed), 4)
  C = jax.random.normal(k[0], (B, n * m, cc), jnp.float32)
  Z = 3.0 * jax.random.normal(k[1], (B, n * m, cc), jnp.float32)
  if prev == "random":
    prev = (jax.random.normal(k[2], (B, m, cc)), 3.0 * jax.random.normal(k[3], (B, m, cc)))
  elif prev == "empty":                               # compressor.empty_state: C = 0, Z = -inf
    prev = (jnp.zeros((B, m, cc)), jnp.full((B, m, cc), -jnp.inf))
  return C, Z, prev


# (B, n entries, m, c, prev, block_entries for TPU): CSA m=4 (2c channels) and HCA (m=8: the tiny config,
# m=128: Flash), c = Flash's head_dim 512 and indexer 128, toy 96/64 (not lane multiples), odd n, several
# entry blocks with a ragged last one (the CSA halo across blocks), decode (n = 1).
CASES = [
    (2, 5, 4, 96, None, None),
    (1, 19, 4, 128, "random", 8),
    (2, 1, 4, 128, "empty", None),
    (1, 3, 4, 512, "random", None),
    (2, 7, 8, 64, None, None),
    (1, 19, 8, 128, None, 8),
    (1, 1, 128, 512, None, None),
    (1, 3, 128, 128, None, None),
    (1, 5, 3, 64, None, None),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,n,m,c,prev,be", CASES, ids=lambda v: str(v))
def test_pool_matches_reference(backend, B, n, m, c, prev, be):
  C, Z, prev = _inputs(B, n, m, c, prev)
  got = kc.pool(C, Z, m, prev, backend=backend, interpret=True, block_entries=be if backend == "tpu" else None)
  want = compressor.pool(C, Z, m, prev)
  assert got.shape == want.shape == (B, n, c) and got.dtype == jnp.float32
  assert np.isfinite(np.asarray(want)).all()
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits(backend):
  """-inf gate logits get weight 0; a channel whose whole slot set is -inf is NaN, as in the reference
  (jax.nn.softmax of all -inf); only that channel of that entry."""
  B, n, m, c = 1, 9, 4, 128
  C, Z, _ = _inputs(B, n, m, c, None, seed=1)
  Z = Z.at[0, 4:8, 3].set(-jnp.inf)                     # entry 1, first-half channel 3: the slots of window 1
  Z = Z.at[0, 8:12, 130].set(-jnp.inf)                  # entry 2, second half channel 2: window 2
  Z = Z.at[0, 4:12, 5].set(-jnp.inf)                    # window 1 and 2 first half of channel 5
  Z = Z.at[0, 8:12, c + 5].set(-jnp.inf)                # ... and entry 2's second half: all -inf -> NaN
  prev = (jnp.ones((B, m, 2 * c)), jnp.full((B, m, 2 * c), -jnp.inf).at[0, 1, 7].set(0.5))
  got = np.asarray(kc.pool(C, Z, m, prev, backend=backend, interpret=True, block_entries=8))
  want = np.asarray(compressor.pool(C, Z, m, prev))
  assert np.isnan(want).sum() == 1 and np.isnan(want[0, 2, 5])
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  np.testing.assert_allclose(got, want, **TOL)


def test_tpu_kernel_in_the_tpu_simulator():
  """The TPU program under the Mosaic interpreter with eager DMAs and race detection (the kernel uses only
  BlockSpecs; this checks the halo's clamped block index and the ragged last block)."""
  from jax.experimental.pallas import tpu as pltpu
  C, Z, prev = _inputs(1, 19, 4, 128, "random")
  got = kc.pool(C, Z, 4, prev, backend="tpu", block_entries=8,
                interpret=pltpu.InterpretParams(dma_execution_mode="eager", detect_races=True))
  np.testing.assert_allclose(np.asarray(got), np.asarray(compressor.pool(C, Z, 4, prev)), **TOL)


@pytest.mark.parametrize("m,c,n", [(4, 512, 1), (4, 128, 129), (128, 512, 5), (8, 96, 3)])
def test_triton_lowers_for_cuda(m, c, n):
  cc = (2 if compressor.overlaps(m) else 1) * c
  x = jax.ShapeDtypeStruct((2, n * m, cc), jnp.float32)
  if compressor.overlaps(m):
    p = jax.ShapeDtypeStruct((2, m, cc), jnp.float32)
    f = lambda C, Z, pc, pz: kc.pool(C, Z, m, (pc, pz), backend="gpu", interpret=False)
    args = (x, x, p, p)
  else:
    f = lambda C, Z: kc.pool(C, Z, m, backend="gpu", interpret=False)
    args = (x, x)
  text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "triton" in text


def test_aot_cases_trace_for_tpu():
  """AOT_CASES are well-formed: each traces and lowers for TPU (the Mosaic compile itself is aot_check's)."""
  for name, fn, args in kc.AOT_CASES:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text, name


def test_unsupported_shapes_raise():
  C = jnp.zeros((1, 12, 64))
  with pytest.raises(KernelUnsupported, match="whole windows"):
    kc.pool(C[:, :10], C[:, :10], 4, backend="tpu")
  with pytest.raises(KernelUnsupported, match="multiple of 8"):
    kc.pool(C, C, 4, backend="tpu", block_entries=6)
  with pytest.raises(KernelUnsupported, match="power of two"):
    kc.pool(C, C, 4, backend="gpu", block_entries=6)
  with pytest.raises(KernelUnsupported, match="multiple of 8 or <= 32"):
    kc.pool(jnp.zeros((1, 66, 64)), jnp.zeros((1, 66, 64)), 33, backend="tpu")


def test_model_compressor_through_the_kernel(monkeypatch):
  """compress_chunk (the one compression function of the model) with the TPU kernel (interpreted) behind
  ops.compress_pool: a prompt compressed chunk by chunk (carried prev / tail), then a decode step at an
  unaligned position per row, equal the "xla" path for the tiny config's CSA (m=4) and HCA (m=8)."""
  cfg = load_config("tiny")
  monkeypatch.setitem(ops._IMPLS, "pallas_tpu", {"compress_pool": functools.partial(kc.pool, backend="tpu")})
  kcfg = dataclasses.replace(cfg, attn_impl="pallas_tpu")
  layers = init_params(cfg, jax.random.key(0))["layers"]
  comps = {}                                              # ratio -> a compressor's params
  for p in layers["prefix"] + [jax.tree.map(lambda a: a[0], q) for q in layers["stack"]]:
    if "compressor" in p["attn"]:
      comps.setdefault(p["attn"]["compressor"]["ape"].shape[0], p["attn"]["compressor"])
  x = jax.random.normal(jax.random.key(1), (2, 21, cfg.dim), jnp.float32)

  @functools.partial(jax.jit, static_argnums=(1, 2))
  def run(p, c_, m):
    whole = compressor.compress(p, c_, x, m, False, 8)                       # 3 chunks of 8
    state = compressor.empty_state(m, p["norm"].shape[0], (2,))
    lengths = jnp.array([20, 19], jnp.int32)
    E1, _, _, state = compressor.compress_chunk(p, c_, x[:, :20], m, jnp.zeros(2, jnp.int32), lengths, state)
    E2, _, _, state = compressor.compress_chunk(p, c_, x[:, 20:], m, lengths, jnp.ones(2, jnp.int32), state)
    return whole, E1, E2, state

  for m in (4, 8):                                        # CSA, HCA
    want, got = run(comps[m], cfg, m), run(comps[m], kcfg, m)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), **TOL)
