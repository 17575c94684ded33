"""The logical-axis rules on a real multi-device mesh: 4 CPU devices in a subprocess (the device count is
fixed when JAX starts): `load_params` straight onto a mesh shards the weights and the logits are unchanged.
(Forward, prefill, decode and generation on the pod meshes: tests/test_sharded_model.py.)"""
import textwrap

from fake_devices import run_script


SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from dsv4_jax import forward, sharding
    assert len(jax.devices()) == 4
    # load_params straight onto the mesh: every weight arrives sharded, and the logits are unchanged
    import dataclasses, sys, tempfile
    sys.path.insert(0, "tests")
    import hf_oracle
    from dsv4_jax import ModelConfig, load_params
    spec = hf_oracle.SPEC_A
    model, hf_cfg = hf_oracle.make_hf_model(spec, 0)
    d = tempfile.mkdtemp()
    hf_oracle.save_official(model, hf_cfg, d, spec)
    cfg = dataclasses.replace(ModelConfig.from_hf_config(d), dtype="float32", quant_sim=False)
    toks = hf_oracle.make_tokens(spec, 0, B=4, S=37).astype(np.int32)
    ref = np.asarray(jax.jit(forward, static_argnums=1)(load_params(d, cfg), cfg, toks).logits)
    mesh = sharding.make_mesh({"data": 2, "tensor": 2})
    placed = load_params(d, cfg, mesh=mesh)
    n_sharded = sum(len(x.sharding.device_set) == 4 and not x.sharding.is_fully_replicated
                    for x in jax.tree.leaves(placed))
    assert n_sharded > 10, n_sharded
    with sharding.use_mesh(mesh):
      got = np.asarray(jax.jit(forward, static_argnums=1)(placed, cfg, toks).logits)
    print("load_params on mesh: sharded leaves", n_sharded, "max abs diff", float(np.abs(got - ref).max()))
    assert float(np.abs(got - ref).max()) < 2e-5
    # a decode step's rows per device: the batch is split over `data`, so one token per sequence at batch 2 is
    # one row per device, and the output projection pads S to 8 rows (linear.pad_seq_rows)
    from dsv4_jax import linear
    with sharding.use_mesh(mesh):
      assert sharding.axis_shards("batch") == 2 and sharding.axis_shards("heads") == 2
      assert sharding.axis_shards("experts") == 1                         # the mesh has no expert axis
      assert linear.pad_seq_rows(np.ones((2, 1, 3)))[0].shape == (2, 8, 3)
      assert linear.pad_seq_rows(np.ones((16, 1, 3)))[0].shape == (16, 1, 3)
    assert linear.pad_seq_rows(np.ones((2, 1, 3)))[0].shape == (2, 4, 3)   # no mesh: 2 rows on one device
    print("ok")
""")


def test_load_params_onto_a_mesh_matches_single_device():
  run_script(SCRIPT, n_devices=4)


def test_a_mesh_is_part_of_jits_cache_key():
  """A function jitted outside a mesh is traced again under `use_mesh`: code that branches on the active mesh
  (the expert-parallel MoE, every constraint) never reuses an executable traced without it."""
  import jax
  from dsv4_jax import sharding
  seen = []

  @jax.jit
  def f(x):
    seen.append(sharding.active_mesh()[0])
    return x + 1

  f(1.0)
  with sharding.use_mesh(sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])):
    f(1.0)
  assert len(seen) == 2 and seen[0] is None and seen[1] is not None
