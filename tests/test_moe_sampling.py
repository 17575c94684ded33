"""Routed experts (padding, accumulation order, bounded dequantisation, the decode path), the head's fp32
accumulation, exact top-k sampling and the memory estimate."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax import head, init_cache, init_params, load_config, mhc, moe, qarray
from dsv4_jax.linear import f32_linear
from dsv4_jax.norm import rms_norm
from dsv4_jax.runtime import required_memory_bytes
from dsv4_jax.sampling import Sampling, sample, top_k_mask


@pytest.fixture(scope="module")
def tiny():
  cfg = load_config("tiny")
  return cfg, init_params(cfg, jax.random.key(0))


_routed = jax.jit(moe.routed_experts, static_argnums=1, static_argnames="group")


def _ffn(params, hashed: bool) -> dict:
  """Layer 0's MoE (hash-routed) or layer 3's (score-routed, first of the scanned stack)."""
  if hashed:
    return params["layers"]["prefix"][0]["ffn"]
  return jax.tree.map(lambda a: a[0], params["layers"]["stack"][0]["ffn"])


def _fp4(rng, shape):
  E, O, I = shape
  return qarray.QArray(values=jnp.asarray(rng.integers(0, 256, (E, O, I // 2), dtype=np.uint8)),
                       scales=jnp.asarray(rng.integers(120, 127, (E, O, I // 32), dtype=np.uint8)),
                       block=qarray.FP4_BLOCK, fmt="fp4")


# ---- padding ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hashed", [True, False])
@pytest.mark.parametrize("S,lens", [(12, (12, 5)), (1, (1, 0))])          # grouped path / decode path
def test_moe_padded_rows_give_zero_and_change_nothing(tiny, hashed, S, lens):
  cfg, params = tiny
  p = _ffn(params, hashed)
  x = jax.random.normal(jax.random.key(20), (2, S, cfg.dim))
  ids = jax.random.randint(jax.random.key(21), (2, S), 0, cfg.vocab_size)
  valid = jnp.arange(S)[None] < jnp.array(lens)[:, None]
  x = jnp.where(valid[..., None], x, jnp.nan)                            # pads hold garbage ...
  ids = jnp.where(valid, ids, cfg.vocab_size + 7)                        # ... and ids outside the vocabulary
  f = jax.jit(moe.moe, static_argnums=1)
  out = np.asarray(f(p, cfg, x, ids, valid))
  assert (out[~np.asarray(valid)] == 0).all()
  for b, n in enumerate(lens):
    if n:
      alone = np.asarray(f(p, cfg, x[b:b + 1, :n], ids[b:b + 1, :n]))   # valid=None: all valid
      np.testing.assert_allclose(out[b, :n], alone[0], rtol=1e-6, atol=1e-6)


def test_padded_pairs_take_no_rows_and_read_no_expert():
  E = 8
  idx = jnp.array([[1, 5], [5, 2], [7, 6], [1, 2]])
  valid = jnp.array([True, True, False, True])
  order, sizes = moe.dispatch(idx, valid, E)
  assert sizes.tolist() == [0, 2, 2, 0, 0, 2, 0, 0]                     # experts 6 and 7 only for the pad
  flat = np.asarray(idx).reshape(-1)
  assert flat[np.asarray(order)[:6]].tolist() == [1, 1, 2, 2, 5, 5]
  assert sorted(np.asarray(order)[6:].tolist()) == [4, 5]               # the pad's pairs, after all groups
  ids, real, slot = moe.chosen_experts(idx, valid, E)
  assert ids.tolist() == [1, 2, 5, 5, 5, 5, 5, 5] and real.tolist() == [True] * 3 + [False] * 5
  assert np.asarray(slot)[[0, 1, 3]].tolist() == [[0, 2], [2, 1], [0, 1]] and (np.asarray(slot)[2] >= 3).all()
  # no padding: every distinct chosen expert once, the fill repeats the largest (no other expert is read)
  ids, real, slot = moe.chosen_experts(idx[:2], jnp.ones(2, bool), E)
  assert ids.tolist() == [1, 2, 5, 5] and real.tolist() == [True, True, True, False]
  assert slot.tolist() == [[0, 2], [2, 1]]


def test_chosen_experts_are_the_sorted_unique_ids():
  """`chosen_experts` (comparisons of the pairs with each other) against numpy's sorted unique ids, on random
  choices with repeats, invalid tokens, and more pairs than experts (the expert-parallel decode path)."""
  rng = np.random.default_rng(5)
  for T, k, E in [(1, 2, 8), (3, 2, 8), (5, 3, 8), (4, 6, 64), (16, 6, 16)]:
    idx = rng.integers(0, E, (T, k))
    valid = rng.random(T) < 0.7
    ids, real, slot = (np.asarray(a) for a in jax.jit(moe.chosen_experts, static_argnums=2)(
        jnp.asarray(idx), jnp.asarray(valid), E))
    want = np.unique(idx[valid])
    U = min(T * k, E)
    assert ids.shape == real.shape == (U,) and slot.shape == (T, k)
    assert ids[:len(want)].tolist() == want.tolist() and real.tolist() == [True] * len(want) + [False] * (U - len(want))
    assert (ids[len(want):] == (want.max() if len(want) else 0)).all()
    assert (ids[slot[valid]] == idx[valid]).all() and (slot[~valid] >= len(want)).all()



def _passed_on(jaxpr, var):
  """(eqn, sub-jaxpr, the sub-jaxpr's input) for each sub-jaxpr (loop, map, call, cond branch) `var` is passed
  into, inputs aligned from the end (a scan's or call's inputs are its operands, a cond's follow its index)."""
  from jax.extend.core import jaxprs_in_params
  for eqn in jaxpr.eqns:
    for sub in jaxprs_in_params(eqn.params):
      for inner, outer in zip(reversed(sub.invars), reversed(eqn.invars)):
        if outer is var:
          yield eqn, sub, inner


def _consumers(jaxpr, var) -> set:
  """The primitives that take `var` (name, and a dynamic slice's leading slice sizes: all but the last two
  axes), looking through the sub-jaxprs it is passed into."""
  from jax.extend.core import jaxprs_in_params
  found = {(eqn.primitive.name, tuple(eqn.params.get("slice_sizes", (0, 0, 0))[:-2])) for eqn in jaxpr.eqns
           if any(o is var for o in eqn.invars) and not list(jaxprs_in_params(eqn.params))}
  for _, sub, inner in _passed_on(jaxpr, var):
    found |= _consumers(sub, inner)
  return found


@pytest.mark.parametrize("stacked", [False, True])
def test_decode_path_reads_chosen_experts_in_place(tiny, stacked, monkeypatch):
  """A stack stored in the compute dtype: the decode path slices each chosen expert where it lies (a dynamic
  slice per expert, the matmul's operand), in one group or in a loop of groups; it never gathers experts
  into a copy. A packed (fp4) stack is copied out (a gather), as documented."""
  cfg, params = tiny
  monkeypatch.setattr(moe, "DECODE_GROUP", 2)                          # 6 slots: a loop of 3 groups
  e = params["layers"]["stack"][0]["ffn"]["experts"] if stacked else _ffn(params, False)["experts"]
  x = jax.random.normal(jax.random.key(3), (3, cfg.dim))
  idx = jnp.array([[5, 1], [1, 4], [2, 5]], jnp.int32)
  w = jnp.full((3, 2), 0.5)
  run = (lambda e, x, i, w: moe.routed_experts(moe.Stacked(e, jnp.int32(0)), cfg, x, i, w)) if stacked else (
      lambda e, x, i, w: moe.routed_experts(e, cfg, x, i, w))
  closed = jax.make_jaxpr(run)(e, x, idx, w)
  for v in closed.jaxpr.invars[:len(jax.tree.leaves(e))]:                # one expert ([1, 1] of [reps, E])
    assert _consumers(closed.jaxpr, v) == {("dynamic_slice", (1,) * (v.aval.ndim - 2))}
  q = {name: _fp4(np.random.default_rng(1), e[name].shape[-3:]) for name in ("w1", "w2", "w3")}
  closed = jax.make_jaxpr(lambda e, x, i, w: moe.routed_experts(e, cfg, x, i, w))(q, x, idx, w)
  assert "gather" in {name for v in closed.jaxpr.invars[:6] for name, _ in _consumers(closed.jaxpr, v)}


def _conds_on(jaxpr, var) -> list:
  """For each `cond` that `var` reaches (through loops, maps, calls), the primitives that take it in each
  branch (`_consumers`)."""
  found = []
  for eqn, sub, inner in _passed_on(jaxpr, var):
    found += [_consumers(sub, inner)] if eqn.primitive.name == "cond" else _conds_on(sub, inner)
  return found


@pytest.mark.parametrize("packed", [False, True])
def test_decode_groups_of_spare_slots_read_no_expert(tiny, packed, monkeypatch):
  """The decode path's U = min(T*k, E) slots are static, the real (distinct chosen) ones first: a group of
  DECODE_GROUP slots with no real one is skipped (a `cond` whose other branch reads no expert), so a shard
  of the expert-parallel path, whose all-gathered pairs mostly choose other shards' experts, reads only
  the groups it needs."""
  cfg, params = tiny
  monkeypatch.setattr(moe, "DECODE_GROUP", 2)                          # 6 slots: 3 groups
  e = _ffn(params, False)["experts"]
  if packed:
    e = {name: _fp4(np.random.default_rng(1), e[name].shape) for name in ("w1", "w2", "w3")}
  x = jax.random.normal(jax.random.key(4), (3, cfg.dim))
  idx = jnp.array([[5, 1], [1, 4], [2, 5]], jnp.int32)
  closed = jax.make_jaxpr(lambda e, x, i, w: moe.routed_experts(e, cfg, x, i, w))(e, x, idx, jnp.ones((3, 2)))
  for v in closed.jaxpr.invars[:len(jax.tree.leaves(e))]:
    branches = _conds_on(closed.jaxpr, v)
    assert sorted(map(bool, branches)) == [False, True], branches
  # the same outputs whichever groups are real: 4 distinct experts (2 groups) and 1 (1 group of 3)
  run = jax.jit(lambda e, x, i, w: moe.routed_experts(e, cfg, x, i, w))
  for i in (idx, jnp.array([[3, 3], [3, 3], [3, 3]], jnp.int32)):
    want = np.asarray(run(e, jnp.tile(x, (4, 1)), jnp.tile(i, (4, 1)), jnp.ones((12, 2))))[:3]  # grouped path
    got = np.asarray(run(e, x, i, jnp.ones((3, 2))))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()          # fp32 summation order only


def test_sort_slots_values_and_derivatives():
  """`sort_slots` (one sort of ids and weights, a custom JVP) against argsort + take_along_axis: the sorted
  ids and weights (stable on repeated ids), and the weights' gradient and forward-mode derivative."""
  rng = np.random.default_rng(7)
  idx = jnp.asarray(rng.integers(0, 5, (9, 4)), jnp.int32)                # repeats: stability matters
  w = jnp.asarray(rng.random((9, 4)), jnp.float32)
  c = jnp.asarray(rng.random((9, 4)), jnp.float32)

  def ref(w):
    order = jnp.argsort(idx, axis=-1, stable=True)
    return jnp.take_along_axis(idx, order, axis=-1), jnp.take_along_axis(w, order, axis=-1)
  got, want = moe.sort_slots(idx, w), ref(w)
  assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
  loss = lambda f: (lambda w: jnp.sum(f(w)[1] * c))
  np.testing.assert_array_equal(jax.grad(loss(lambda w: moe.sort_slots(idx, w)))(w), jax.grad(loss(ref))(w))
  np.testing.assert_array_equal(jax.jvp(lambda w: moe.sort_slots(idx, w)[1], (w,), (c,))[1],
                                jax.jvp(lambda w: ref(w)[1], (w,), (c,))[1])

# ---- accumulation order -------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [2, 40])                                  # 2 x 3 slots < 8 experts: decode path
def test_routed_experts_add_in_ascending_expert_id(tiny, T):
  """Expert outputs of very different magnitudes (2^0, 2^10, 2^20, either sign): their fp32 sum depends on the
  order. Every product is exact (integer inputs, +-1/0 weights, w2 a scaled selection), so each slot's output
  is the same number whichever path computes it, and the result must be the numpy fp32 sum in ascending
  expert id, bit for bit, whatever the order of the slots."""
  cfg, _ = tiny
  E, F, D, k = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim, 3
  rng = np.random.default_rng(T)
  sparse = lambda *s: (rng.integers(-1, 2, s) * (rng.random(s) < 0.1)).astype(np.float32)
  c = np.array([(-1.0) ** e * 2.0 ** (10 * (e % 3)) for e in range(E)], np.float32)
  w2 = c[:, None, None] * (np.arange(F)[None, None, :] == (np.arange(D) % F)[None, :, None])
  p = {"w1": jnp.asarray(sparse(E, F, D)), "w3": jnp.asarray(sparse(E, F, D)),
       "w2": jnp.asarray(w2, jnp.float32)}
  x = jnp.asarray(rng.integers(-2, 3, (T, D)).astype(np.float32))
  idx = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int32)     # slots in random order
  w = jnp.asarray(rng.uniform(0.2, 1.0, (T, k)).astype(np.float32))
  f = _routed
  slot = np.stack([np.asarray(f(p, cfg, x, jnp.asarray(idx[:, j:j + 1]), w[:, j:j + 1]))   # one slot each
                   for j in range(k)], 1)
  asc = np.argsort(idx, axis=1)
  want = slot[np.arange(T), asc[:, 0]]
  for j in range(1, k):
    want = want + slot[np.arange(T), asc[:, j]]                       # float32 adds, ascending expert id
  got = np.asarray(f(p, cfg, x, jnp.asarray(idx), w))
  np.testing.assert_array_equal(got, want)
  in_slot_order = (slot[:, 0] + slot[:, 1]) + slot[:, 2]
  assert not np.array_equal(in_slot_order, want)                        # the order does matter here
  rev = np.ascontiguousarray(idx[:, ::-1])                              # any slot order gives the same
  np.testing.assert_array_equal(np.asarray(f(p, cfg, x, jnp.asarray(rev), w[:, ::-1])), want)


# ---- quantised experts: bounded dequantisation; decode path --------------------------------------------

@pytest.mark.parametrize("group", [1, 3, 8])                            # 3 -> groups of 2 (a divisor of 8)
def test_grouped_path_dequantises_groups_and_matches_dense(tiny, group):
  cfg, params = tiny
  p = _ffn(params, False)
  rng = np.random.default_rng(group)
  q = {name: _fp4(rng, p["experts"][name].shape) for name in ("w1", "w2", "w3")}
  d = {name: qarray.dense(v, jnp.float32) for name, v in q.items()}
  x = jax.random.normal(jax.random.key(22), (40, cfg.dim))
  idx, w = moe.route(p["gate"], cfg, x, jnp.arange(40))
  valid = jnp.arange(40) < 33
  got = _routed(q, cfg, x, idx, w, valid, group=group)                  # scanned groups
  want = np.asarray(_routed(d, cfg, x, idx, w, valid))                  # one ragged_dot on the dense stack
  # the same products summed in another order (XLA:CPU tiles the two matmuls differently, and differently on
  # different CPUs): fp32 rounding, relative to the outputs' scale (|want| reaches ~300 with fp4 experts)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-6 * np.abs(want).max())
  assert (np.asarray(got)[33:] == 0).all()


def test_grouped_path_temp_memory_is_bounded():
  """64 fp4 experts: the compiled temp memory stays below half of ONE dense fp32 [E, F, D] matrix with groups
  of 4 experts (it held all three dequantised before), and grows with the group size."""
  cfg = dataclasses.replace(load_config("tiny"), n_routed_experts=64)
  E, F, D, T = 64, cfg.moe_inter_dim, cfg.dim, 64
  rng = np.random.default_rng(0)
  q = {"w1": _fp4(rng, (E, F, D)), "w3": _fp4(rng, (E, F, D)), "w2": _fp4(rng, (E, D, F))}
  x = jnp.ones((T, D))
  idx = jnp.asarray(np.stack([rng.permutation(E)[:2] for _ in range(T)]).astype(np.int32))
  w = jnp.ones((T, 2))

  def temp(group):
    f = jax.jit(lambda q, x, idx, w: moe.routed_experts(q, cfg, x, idx, w, group=group))
    return f.lower(q, x, idx, w).compile().memory_analysis().temp_size_in_bytes

  small, whole = temp(4), temp(64)
  assert small < E * F * D * 4 // 2 < whole


@pytest.mark.parametrize("decode_group", [None, 2, 4])
def test_decode_path_reads_shared_experts_once(tiny, decode_group, monkeypatch):
  """Tokens that share experts: the decode path (each distinct expert gathered once, applied to every token)
  gives what the grouped path gives, on fp4 experts and with a padded token; also when its U = 6 expert slots
  are applied DECODE_GROUP at a time (2: three groups; 4: two, the last padded)."""
  cfg, params = tiny
  if decode_group:
    monkeypatch.setattr(moe, "DECODE_GROUP", decode_group)
  _routed = jax.jit(lambda *a, **kw: moe.routed_experts(*a, **kw), static_argnums=1,
                    static_argnames="group")            # a new function: jit's cache is per function, not wrapper
  p = _ffn(params, False)
  q = {name: _fp4(np.random.default_rng(1), p["experts"][name].shape) for name in ("w1", "w2", "w3")}
  x = jax.random.normal(jax.random.key(23), (3, cfg.dim))
  idx = jnp.array([[5, 1], [1, 5], [2, 5]], jnp.int32)
  w = jax.random.uniform(jax.random.key(24), (3, 2), minval=0.3, maxval=1.0)
  valid = jnp.array([True, True, False])
  few = np.asarray(_routed(q, cfg, x, idx, w, valid))                   # 6 pairs < 8 experts: decode path
  many = np.asarray(_routed(q, cfg, jnp.tile(x, (4, 1)), jnp.tile(idx, (4, 1)), jnp.tile(w, (4, 1)),
                            jnp.tile(valid, 4)))[:3]
  assert np.abs(few - many).max() <= 1e-5 * np.abs(many).max()         # fp32 summation order only
  assert (few[2] == 0).all()


# ---- head ---------------------------------------------------------------------------------------------

def test_head_accumulates_in_fp32_without_an_fp32_weight_copy(tiny):
  cfg, params = tiny
  V, D = cfg.vocab_size, cfg.dim
  X = jax.random.normal(jax.random.key(25), (2, 3, cfg.hc_mult, D))
  args = (params["hc_head"], params["norm"])
  hw = params["head"]

  def reference(X, cfg):          # the reference: the normed activations and the weight upcast to fp32
    x = rms_norm(mhc.hc_head(X, args[0], cfg.hc_eps, cfg.norm_eps), args[1], cfg.norm_eps)
    return f32_linear(x, hw.astype(cfg.dtype))

  np.testing.assert_array_equal(np.asarray(head.logits(X, *args, hw, cfg)), np.asarray(reference(X, cfg)))
  bf = dataclasses.replace(cfg, dtype="bfloat16")
  Xb, hb = X.astype(jnp.bfloat16), hw.astype(jnp.bfloat16)
  f = jax.jit(lambda X, hw: head.logits(X, *args, hw, bf))
  got = f(Xb, hb)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(reference(Xb, bf)), rtol=1e-5, atol=1e-5)
  hlo = f.lower(Xb, hb).compile().as_text()
  assert f"f32[{V},{D}]" not in hlo and f"f32[{D},{V}]" not in hlo


# ---- sampling -----------------------------------------------------------------------------------------

def test_top_k_keeps_exactly_k_with_ties():
  logits = jnp.array([[0.0, 3.0, 3.0, 3.0, 1.0],                        # three tied for the top 2
                      [5.0, 1.0, 2.0, 2.0, 2.0],                        # three tied for places 2-3
                      [1.0, 1.0, 1.0, 1.0, 1.0]])
  kept = np.isfinite(np.asarray(top_k_mask(logits, 2)))
  assert kept.tolist() == [[False, True, True, False, False],            # lower token id wins
                           [True, False, True, False, False],
                           [True, True, False, False, False]]
  np.testing.assert_array_equal(np.asarray(top_k_mask(logits, 9)), np.asarray(logits))   # k >= V: all
  keys = jax.random.split(jax.random.key(26), 400)
  draws = np.asarray(jax.vmap(lambda k: sample(logits, k, Sampling(temperature=1.0, top_k=2)))(keys))
  assert set(draws[:, 0]) == {1, 2} and set(draws[:, 1]) == {0, 2} and set(draws[:, 2]) == {0, 1}


# ---- memory estimate ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cache_dtype", [None, "paper", "float32"])
def test_required_memory_counts_what_init_cache_allocates(cache_dtype):
  cfg = load_config("tiny")
  need = required_memory_bytes(cfg, 3, 80, cache_dtype)
  cache = init_cache(cfg, 3, 80, cache_dtype)
  assert need["cache"] == sum(int(a.nbytes) for a in jax.tree.leaves(cache)) > 0
  assert need["total"] == need["params"] + need["cache"]
