"""Unit tests of what the HF comparison cannot check: visibility, Sinkhorn, the indexer's selection,
the quantisation round-trips, causality of the main and MTP logits, and the sharding plumbing."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsv4_jax import abstract_params, forward, init_params, load_config, param_specs
from dsv4_jax import attention, compressor, indexer, mhc, quant, sharding
from dsv4_jax import params as params_lib


@pytest.fixture(scope="module")
def tiny():
  cfg = load_config("tiny")
  return cfg, init_params(cfg, jax.random.key(0))


@pytest.mark.parametrize("m", [4, 128])
def test_visibility_rule(m):
  t = np.arange(301)
  idx = np.asarray(attention.hca_indices(jnp.asarray(t)[None], 301 // m + 1, m))[0]
  for ti in t:
    expected = [i for i in range(301 // m + 1) if (i + 1) * m - 1 <= ti]     # window i complete at t
    assert [i for i in idx[ti] if i >= 0] == expected
  # examples of docs/architecture.md §2.9
  if m == 4:
    assert compressor.visible_count(jnp.array([2, 3, 7]), 4).tolist() == [0, 1, 2]


def test_window_indices():
  idx = np.asarray(attention.window_indices(jnp.arange(6)[None], 4))[0]
  assert idx[0].tolist() == [-1, -1, -1, 0]
  assert idx[5].tolist() == [2, 3, 4, 5]


def test_sinkhorn_is_doubly_stochastic():
  logits = jax.random.normal(jax.random.key(1), (64, 4, 4)) * 3
  m = np.asarray(mhc.sinkhorn(logits, 20, 1e-6))
  np.testing.assert_allclose(m.sum(-2), 1.0, atol=1e-5)     # ends on a column normalisation
  np.testing.assert_allclose(m.sum(-1), 1.0, atol=5e-2)     # rows: 20 iterations, not fully converged
  assert (m > 0).all()
  # the reference's loop, written out in numpy float64
  x = np.exp(np.asarray(logits, np.float64) - np.asarray(logits, np.float64).max(-1, keepdims=True))
  r = x / x.sum(-1, keepdims=True) + 1e-6
  r = r / (r.sum(-2, keepdims=True) + 1e-6)
  for _ in range(19):
    r = r / (r.sum(-1, keepdims=True) + 1e-6)
    r = r / (r.sum(-2, keepdims=True) + 1e-6)
  np.testing.assert_allclose(m, r, atol=1e-5)


def test_indexer_selects_exactly_the_visible_set_when_it_fits():
  B, S, C, k = 2, 40, 10, 12                     # at most 10 visible entries <= k
  scores = jax.random.normal(jax.random.key(2), (B, S, C))
  pos = jnp.broadcast_to(jnp.arange(S), (B, S))
  sel = np.asarray(indexer.select_topk(scores, pos, k))
  for t in range(S):
    chosen = sorted(i for i in sel[0, t] if i >= 0)
    assert chosen == list(range(min((t + 1) // 4, C)))


def test_indexer_picks_the_largest_visible_scores():
  B, S, C, k = 1, 64, 16, 3
  scores = jax.random.normal(jax.random.key(3), (B, S, C))
  sel = np.asarray(indexer.select_topk(scores, jnp.arange(S)[None], k))
  s = np.asarray(scores)
  for t in range(S):
    n_vis = (t + 1) // 4
    want = set(np.argsort(-s[0, t, :n_vis])[:k].tolist())
    assert set(i for i in sel[0, t] if i >= 0) == want


def test_pow2_ceil_exact():
  v = jnp.array([1.0, 2.0, 3.0, 0.75, 2.0 ** -20, 448.0, 449.0])
  assert quant.pow2_ceil(v).tolist() == [1.0, 2.0, 4.0, 1.0, 2.0 ** -20, 512.0, 512.0]


def test_act_quant_hand_values():
  # block amax 896 -> scale pow2ceil(896/448) = 2; 3.3/2 = 1.65 -> e4m3 1.625 -> 3.25; 0.01/2 = .005 -> e4m3
  x = jnp.array([[896.0, 3.3, -0.01, 0.0]])
  y = np.asarray(quant.act_quant(x, block=4))
  e4m3_005 = float(np.float32(0.005).astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
  np.testing.assert_array_equal(y, [[896.0, 3.25, -2 * e4m3_005, 0.0]])
  # two blocks get independent scales
  y2 = np.asarray(quant.act_quant(jnp.array([[1000.0, 1.1, 1.1, 1.1]]), block=2))
  assert y2[0, 3] == np.float32(1.125)        # scale 1/256 -> 1.1 rounds to 1.125 on e4m3's 1/8 grid
  assert y2[0, 1] == 0.0 or abs(y2[0, 1] - 1.1) > 0.01


def test_fp4_hand_values():
  # amax 24 -> scale 4: 5/4 = 1.25 ties to even (1.0) -> 4; 1.3/4 = .325 -> .5 -> 2; 7/4 = 1.75 ties to 2 -> 8
  x = jnp.array([[24.0, 5.0, 1.3, 7.0, -0.9, 0.2, 14.0, -10.0]])
  y = np.asarray(quant.fp4_act_quant(x, block=8))
  np.testing.assert_array_equal(y, [[24.0, 4.0, 2.0, 8.0, -0.0, 0.0, 16.0, -8.0]])
  grid = np.array([0, .5, 1, 1.5, 2, 3, 4, 6], np.float32)
  r = np.random.default_rng(0).uniform(-6, 6, 1000).astype(np.float32)
  got = np.asarray(quant.round_e2m1(jnp.asarray(r)))
  nearest = np.sign(r) * grid[np.argmin(np.abs(np.abs(r)[:, None] - grid), axis=1)]
  np.testing.assert_array_equal(got, nearest)          # no exact ties in random draws


def test_hadamard_is_orthonormal_and_sylvester():
  h = quant.hadamard_matrix(128)
  np.testing.assert_allclose(h @ h.T, np.eye(128), atol=1e-6)
  signs = np.sign(h)
  assert (signs[0] == 1).all() and signs[1, :4].tolist() == [1, -1, 1, -1]      # Sylvester order
  assert signs[2, :4].tolist() == [1, 1, -1, -1]
  np.testing.assert_allclose(np.abs(h), 128 ** -0.5, rtol=1e-7)


def test_kv_fp8_sim_leaves_rope_dims():
  kv = jax.random.normal(jax.random.key(4), (2, 3, 128)).astype(jnp.bfloat16)
  out = quant.kv_fp8_sim(kv, 64)
  np.testing.assert_array_equal(np.asarray(out[..., 64:]), np.asarray(kv[..., 64:]))
  assert not np.array_equal(np.asarray(out[..., :64]), np.asarray(kv[..., :64]))


def test_compressed_entries_are_causal(tiny):
  cfg, params = tiny
  p = params["layers"]["prefix"][2]["attn"]["compressor"]       # layer 2: CSA
  x = jax.random.normal(jax.random.key(5), (1, 24, cfg.dim))
  e1 = compressor.compress(p, cfg, x, 4)
  x2 = x.at[:, 13].add(1.0)                                     # token 13 lies in window 3
  e2 = compressor.compress(p, cfg, x2, 4)
  diff = np.abs(np.asarray(e1 - e2)).max(-1)[0]
  assert (diff[:3] == 0).all() and diff[3] > 0 and diff[4] > 0  # window 3, and window 4 via the overlap
  assert (diff[5:] == 0).all()


def test_logits_are_causal_and_mtp_shapes(tiny):
  cfg, params = tiny
  S, j = 30, 17
  tokens = jax.random.randint(jax.random.key(6), (2, S), 0, cfg.vocab_size)
  f = jax.jit(forward, static_argnums=1)
  a = f(params, cfg, tokens)
  b = f(params, cfg, tokens.at[:, j].set((tokens[:, j] + 1) % cfg.vocab_size))
  assert a.logits.shape == (2, S, cfg.vocab_size) and a.mtp_logits.shape == (2, S - 1, cfg.vocab_size)
  assert a.logits.dtype == jnp.float32 and a.mtp_logits.dtype == jnp.float32
  d_main = np.abs(np.asarray(a.logits - b.logits)).max((0, 2))
  d_mtp = np.abs(np.asarray(a.mtp_logits - b.mtp_logits)).max((0, 2))
  assert (d_main[:j] == 0).all() and d_main[j] > 0
  assert (d_mtp[: j - 1] == 0).all() and d_mtp[j - 1] > 0       # MTP position i sees token i+1


def test_bf16_and_quant_sim_paths_track_fp32(tiny):
  cfg, params = tiny
  tokens = jax.random.randint(jax.random.key(7), (1, 40), 0, cfg.vocab_size)
  f = jax.jit(forward, static_argnums=1)
  ref = np.asarray(f(params, cfg, tokens).logits)
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 and x.ndim > 1 else x, params)
  bf16 = np.asarray(f(p16, dataclasses.replace(cfg, dtype="bfloat16"), tokens).logits)
  sim = np.asarray(f(p16, dataclasses.replace(cfg, dtype="bfloat16", quant_sim=True), tokens).logits)
  for got in (bf16, sim):
    assert got.dtype == np.float32 and np.isfinite(got).all()
  assert np.linalg.norm(bf16 - ref) / np.linalg.norm(ref) < 0.15
  assert (bf16.argmax(-1) == ref.argmax(-1)).mean() > 0.75
  # The simulation is on (fp8 activations, fp8 KV, fp4 indexer: a few % per op on random weights) yet the
  # model still computes the same function roughly.
  rel = np.linalg.norm(sim - bf16) / np.linalg.norm(ref)
  assert 1e-3 < rel < 0.4
  assert (sim.argmax(-1) == ref.argmax(-1)).mean() > 0.5


def test_bad_tokens_raise(tiny):
  cfg, params = tiny
  with pytest.raises(ValueError, match="outside the vocabulary"):
    forward(params, cfg, np.array([[1, cfg.vocab_size]]))
  with pytest.raises(ValueError, match="outside the vocabulary"):
    forward(params, cfg, np.array([[-1, 2]]))
  with pytest.raises(ValueError, match="batch, seq"):
    forward(params, cfg, np.array([1, 2]))


def test_every_parameter_has_logical_axes_and_init_matches_specs(tiny):
  cfg, params = tiny
  specs = param_specs(cfg)
  params_lib.check_tree(params, specs)
  rules = dict(sharding.AXIS_RULES)
  for spec in jax.tree.leaves(specs, is_leaf=params_lib.is_spec):
    assert all(a is None or a in rules or a == "embed_out" for a in spec.axes), spec
  abstract = abstract_params(cfg)
  assert jax.tree.structure(abstract) == jax.tree.structure(params)


def test_forward_under_a_mesh(tiny):
  cfg, params = tiny
  mesh = sharding.make_mesh()
  tokens = jax.random.randint(jax.random.key(8), (2, 20), 0, cfg.vocab_size)
  ref = jax.jit(forward, static_argnums=1)(params, cfg, tokens).logits
  with sharding.use_mesh(mesh):
    got = jax.jit(forward, static_argnums=1)(params, cfg, tokens).logits
    spec = sharding.logical_to_spec(("batch", "seq", "act_heads", None), mesh)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
  assert spec == jax.sharding.PartitionSpec(None, None, None, None)    # size-1 axes are dropped


def test_query_chunking_changes_nothing(tiny):
  """Attention and the indexer run `query_chunk` queries at a time (bounded memory); results are the same."""
  from dsv4_jax import init_cache, prefill
  cfg, params = tiny
  small = dataclasses.replace(cfg, query_chunk=7)
  tokens = np.asarray(jax.random.randint(jax.random.key(9), (2, 40), 0, cfg.vocab_size), np.int32)
  f = jax.jit(forward, static_argnums=1)
  a, b = f(params, cfg, tokens), f(params, small, tokens)
  np.testing.assert_allclose(np.asarray(b.logits), np.asarray(a.logits), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(b.mtp_logits), np.asarray(a.mtp_logits), rtol=1e-5, atol=1e-5)
  lens = np.array([40, 23])
  la, _ = prefill(params, cfg, tokens, lens, init_cache(cfg, 2, 48))
  lb, _ = prefill(params, small, tokens, lens, init_cache(small, 2, 48))
  np.testing.assert_allclose(np.asarray(lb), np.asarray(la), rtol=1e-5, atol=1e-5)


def test_moe_gathered_and_grouped_paths_agree(tiny):
  """Decode-sized batches read only the chosen experts; larger ones use grouped matmuls: same outputs."""
  from dsv4_jax import moe
  cfg, params = tiny
  p = params["layers"]["prefix"][0]["ffn"]
  x = jax.random.normal(jax.random.key(10), (3, cfg.dim))             # 3 tokens x 2 slots < 8 experts
  idx, w = moe.route(p["gate"], cfg, x, jnp.array([1, 2, 3]))
  few = moe.routed_experts(p["experts"], cfg, x, idx, w)
  many = moe.routed_experts(p["experts"], cfg, jnp.tile(x, (4, 1)), jnp.tile(idx, (4, 1)), jnp.tile(w, (4, 1)))
  np.testing.assert_allclose(np.asarray(many[:3]), np.asarray(few), rtol=1e-5, atol=1e-5)


def test_moe_paths_on_quantised_fp4_experts(tiny):
  """Routed experts held as packed fp4 QArrays give the same outputs as their exact dequantisation, on
  both the gathered (decode) and the grouped path."""
  from dsv4_jax import moe, qarray
  cfg, params = tiny
  p = params["layers"]["prefix"][0]["ffn"]
  rng = np.random.default_rng(0)

  def fp4(shape):
    E, O, I = shape
    return qarray.QArray(values=jnp.asarray(rng.integers(0, 256, (E, O, I // 2), dtype=np.uint8)),
                         scales=jnp.asarray(rng.integers(120, 127, (E, O, I // 32), dtype=np.uint8)),
                         block=qarray.FP4_BLOCK, fmt="fp4")

  q = {name: fp4(p["experts"][name].shape) for name in ("w1", "w2", "w3")}
  d = {name: qarray.dense(v, jnp.float32) for name, v in q.items()}
  for T in (3, 40):                                                    # 3 x 2 slots < 8 experts: gathered
    x = jax.random.normal(jax.random.key(T), (T, cfg.dim))
    idx, w = moe.route(p["gate"], cfg, x, jnp.arange(T))
    np.testing.assert_allclose(np.asarray(moe.routed_experts(q, cfg, x, idx, w)),
                               np.asarray(moe.routed_experts(d, cfg, x, idx, w)), rtol=1e-6, atol=1e-6)
