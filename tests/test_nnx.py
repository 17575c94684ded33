"""The NNX module (dsv4_jax/nnx.py) over the functional core: its state is the functional parameter tree (same
paths, same arrays), its forward is `forward` bit for bit, `from_pretrained` is `load_params`, one
`nnx.Optimizer` step is one functional `train_step`, and under an 8-device mesh its Params carry the
shardings the rules table promises (Flax's partitioning resolves their metadata the same way)."""
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv4_jax import config, generation, load_params, params as params_lib, train, transformer
from dsv4_jax.nnx import DeepseekV4, make_optimizer, to_params, train_step
from dsv4_jax.qarray import QArray
from fake_devices import run_script

# 3 sliding-window layers (hash, then 2 score-routed ones scanned) + an MTP block: every container of the tree
SMALL = dict(n_layers=3, compress_ratios=(0, 0, 0, 0), n_hash_layers=1, dim=64, vocab_size=128, n_heads=2,
             head_dim=64, rope_head_dim=32, q_lora_rank=32, o_lora_rank=32, o_groups=2, index_n_heads=4,
             index_head_dim=64, index_topk=4, n_routed_experts=8, n_activated_experts=2, moe_inter_dim=32,
             window_size=8, max_seq_len=64)
# training compiles the backward pass twice (both styles): one score-routed layer kind, scanned, no MTP
TRAIN = dict(SMALL, n_layers=2, compress_ratios=(0, 0), n_hash_layers=0, n_mtp_layers=0)


@pytest.fixture(scope="module")
def small():
  cfg = config.load_config("tiny", **SMALL)
  plan = transformer.layer_plan(cfg)
  assert plan.prefix and plan.reps == 2 and cfg.n_mtp_layers == 1, plan
  return cfg, DeepseekV4(cfg, rngs=nnx.Rngs(0))


def _flat(tree):
  return {params_lib.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _same_arrays(a, b) -> bool:
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      x is y for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_state_is_the_functional_tree(small):
  cfg, model = small
  params = model.params
  ref = transformer.init_params(cfg, nnx.Rngs(0).params())            # the same init, the same key
  assert jax.tree.structure(params) == jax.tree.structure(ref)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)))

  state = nnx.state(model)
  specs = {params_lib.path_str(p): s for p, s in
           jax.tree_util.tree_flatten_with_path(transformer.param_specs(cfg), is_leaf=params_lib.is_spec)[0]}
  variables = {params_lib.path_str(p): v for p, v in
               jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]}
  flat = _flat(params)
  assert set(variables) == set(specs) == set(flat)                       # one Param per leaf, the same paths
  for path, var in variables.items():
    assert isinstance(var, nnx.Param) and var.out_sharding == specs[path].axes, (path, var)
    assert var.get_value() is flat[path], path                           # the same array, no copy

  assert _same_arrays(to_params(state), params)                          # state -> functional
  again = DeepseekV4(cfg, params=params)                                 # functional -> module
  assert _same_arrays(again.params, params)
  graphdef, st = nnx.split(again)
  assert _same_arrays(nnx.merge(graphdef, st).params, params)
  bumped = jax.tree.map(lambda x: x + 1, params)
  again.set_params(bumped)
  assert _same_arrays(again.params, bumped) and _same_arrays(model.params, params)

  with pytest.raises(ValueError, match="rngs="):
    DeepseekV4(cfg)
  broken = dict(params, norm=params["norm"][:-1])
  with pytest.raises(ValueError, match="norm has shape"):
    DeepseekV4(cfg, params=broken)


def test_forward_matches_functional_and_generate_is_reachable(small, monkeypatch):
  cfg, model = small
  params = model.params
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 20), 0, cfg.vocab_size), np.int32)
  ref = jax.jit(transformer.forward, static_argnums=1)(params, cfg, tokens)
  got = nnx.jit(lambda m, t: m(t))(model, tokens)
  assert isinstance(got, transformer.ForwardOutput)
  for name, a, b in zip(ref._fields, ref, got):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)      # bitwise on CPU fp32
  with pytest.raises(ValueError, match="outside the vocabulary"):
    model(np.array([[1, cfg.vocab_size]]))

  # generate is the functional one on the module's arrays (compiling it again here would only re-test it)
  calls = []
  monkeypatch.setattr(generation, "generate", lambda *a, **kw: calls.append((a, kw)) or "result")
  assert model.generate([[5, 17, 30]], 3, stop_on_eos=False) == "result"
  (p, c, prompts, n), kw = calls[0]
  assert _same_arrays(p, model.params) and c is cfg and prompts == [[5, 17, 30]] and n == 3
  assert kw == {"stop_on_eos": False}


def test_from_pretrained_is_load_params(small, tmp_path):
  import released_format as rf
  cfg, _ = small
  rf.write_released(str(tmp_path), rf.random_official(cfg, seed=2), {}, n_shards=2)
  model = DeepseekV4.from_pretrained(tmp_path, cfg)
  want = load_params(tmp_path, cfg)
  got = model.params
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert any(isinstance(v.get_value(), QArray) for v in jax.tree.leaves(
      nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable)))   # fp8 / fp4 weights stay quantised
  for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), params_lib.path_str(p)


def test_optimizer_step_matches_functional_train_step():
  cfg = config.load_config("tiny", **TRAIN)
  tc = train.TrainConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10, batch_size=2, seq_len=24,
                         bias_update_gamma=1e-2, loss_chunk=8, remat="none", compute_dtype="float32",
                         mtp_weight=0.0)
  p32 = transformer.init_params(cfg, jax.random.key(3), jnp.float32)
  start = {k: np.asarray(v) for k, v in _flat(p32).items()}
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(2, cfg.vocab_size, (2, 24)).astype(np.int32),
           "loss_mask": (rng.random((2, 24)) < 0.7).astype(np.float32)}

  model = DeepseekV4(cfg, params=jax.tree.map(jnp.copy, p32))          # train_step donates its state
  optimizer = nnx.Optimizer(model, make_optimizer(tc, model), wrt=nnx.Param)
  labels = _flat(train.param_labels(p32))
  with pytest.raises(ValueError, match="param_dtype=float32"):
    make_optimizer(tc, DeepseekV4(cfg, params=jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32
                                                           else x, p32)))
  assert _flat(nnx.as_pure(nnx.state(model, nnx.Param))).keys() == labels.keys()
  metrics = train_step(model, optimizer, batch, tc)

  state = train.init_train_state(p32, train.make_optimizer(tc, p32), cfg, tc)
  state, want = train.train_step(state, batch)
  assert int(optimizer.step.get_value()) == 1 and set(metrics) == set(want)
  for k in want:
    np.testing.assert_allclose(float(metrics[k]), float(want[k]), rtol=1e-6, err_msg=k)
  got, ref = _flat(model.params), _flat(state.params)
  err = {k: float(np.max(np.abs(np.asarray(got[k], np.float64) - np.asarray(ref[k], np.float64)))) for k in ref}
  assert max(err.values()) <= 1e-6, sorted(err.items(), key=lambda kv: -kv[1])[:3]
  moved = {k: not np.array_equal(np.asarray(got[k]), start[k]) for k in ref}
  for kind in ("muon", "adamw"):                                          # both optimizers moved their leaves
    assert all(moved[k] for k, lab in labels.items() if lab == kind), kind
  bias = [k for k in ref if k.endswith("gate/bias")]
  assert bias and all(moved[k] for k in bias)                             # the routers' bias balanced


MESH_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    import flax.linen as nn
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from dsv4_jax import load_config, params as params_lib, sharding
    from dsv4_jax.nnx import DeepseekV4
    assert len(jax.devices()) == 8
    cfg = load_config("tiny")
    mesh = sharding.make_mesh("data:2,tensor:2,expert:2", cfg)
    with sharding.use_mesh(mesh):
      model = DeepseekV4(cfg, rngs=nnx.Rngs(7))
      assert model.mesh is mesh and nn.get_logical_axis_rules() == sharding.mesh_rules(mesh)
      state = nnx.state(model)
      flax_specs = nnx.get_partition_spec(state)          # Flax resolving the Params' logical axes
    is_var = lambda x: isinstance(x, nnx.Variable)
    variables = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_var)[0]
    flax_flat = jax.tree.leaves(flax_specs, is_leaf=is_var)
    spec = {}
    for (p, var), fs in zip(variables, flax_flat):
      name, x = params_lib.path_str(p), var.get_value()
      want = sharding.param_sharding(var.out_sharding, x.shape, mesh)
      assert x.sharding.mesh == mesh and x.sharding.spec == want.spec, (name, x.sharding, want)
      assert fs.get_value() == want.spec, (name, fs, want.spec)
      spec[name] = x.sharding.spec
    golden = {
        "embed": P("tensor", None),
        "head": P("tensor", None),
        "norm": P(None),
        "layers/prefix/0/ffn/experts/w1": P("expert", "tensor", None),
        "layers/prefix/0/ffn/experts/w2": P("expert", None, "tensor"),
        "layers/prefix/0/ffn/gate/tid2eid": P("tensor", None),
        "layers/stack/0/ffn/experts/w1": P(None, "expert", "tensor", None),
        "layers/stack/0/attn/wo_a": P(None, "tensor", None),
    }
    for name, want in golden.items():
      assert spec[name] == want, (name, spec[name], want)
    print("sharded params", sum(s != P(*[None] * len(s)) for s in spec.values()), "of", len(spec))
    print("ok")
""")


def test_module_under_8_device_mesh_has_the_promised_shardings():
  run_script(MESH_SCRIPT, n_devices=8)
