"""Meshes for pods on 8 CPU devices (the device count is fixed when JAX starts, hence subprocesses):
`make_mesh` specs, defaults and errors, `check_mesh`, random init under a mesh (promised shardings, the same
values as on one device, `jax.eval_shape`), and `launch.decode --mesh` end to end."""
import subprocess
import sys
import textwrap

from fake_devices import ROOT, cpu_env, run_script

ENV8 = cpu_env(8)

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from dsv4_jax import abstract_params, init_params, load_config, param_specs, params as params_lib, sharding
    from dsv4_jax.sharding import make_mesh
    assert len(jax.devices()) == 8
    cfg = load_config("tiny")                  # 8 experts, 4 heads, o_groups 2

    def error(fn, *words):
      try:
        fn()
      except ValueError as e:
        msg = str(e)
        assert all(w in msg for w in words), (msg, words)
        return msg
      raise AssertionError(f"no ValueError; expected one naming {words}")

    # ---- make_mesh: the three spellings, subsets, errors --------------------------------------------------
    m = make_mesh("data:2,expert:4", cfg)
    assert dict(m.shape) == {"data": 2, "sequence": 1, "tensor": 1, "expert": 4}, m.shape
    assert dict(make_mesh({"data": 2, "expert": 4}).shape) == dict(m.shape)
    assert dict(make_mesh(" expert:2 , tensor:2,data:2 ").shape) == {"data": 2, "sequence": 1, "tensor": 2,
                                                                     "expert": 2}
    assert make_mesh("data:2,expert:2", devices=jax.devices()[:4]).size == 4
    print(error(lambda: make_mesh("expert:7", cfg, devices=jax.devices()[:7]), "'expert'", "size 7",
                "n_routed_experts=8"))
    print(error(lambda: make_mesh("tensor:4,data:2", cfg), "'tensor'", "size 4", "o_groups=2"))
    print(error(lambda: make_mesh("model:8"), "unknown axis 'model'", "data, sequence, tensor, expert"))
    print(error(lambda: make_mesh("data:2"), "2 devices", "8 cpu device(s)"))
    print(error(lambda: make_mesh("data:2,data:4"), "given twice"))
    print(error(lambda: make_mesh("data=8"), "AXIS:SIZE"))
    print(error(lambda: make_mesh("data:0,expert:8"), "AXIS:SIZE"))
    print(error(lambda: make_mesh({"experts": 8}), "unknown mesh axes"))
    sharding.check_mesh(make_mesh("data:2,tensor:2,expert:2"), cfg)

    # ---- the default: experts over as many devices as divide the expert count, data over the rest ---------
    assert dict(make_mesh(None, cfg).shape) == {"data": 1, "sequence": 1, "tensor": 1, "expert": 8}
    assert dict(make_mesh(None, cfg, devices=jax.devices()[:6]).shape) == {"data": 3, "sequence": 1, "tensor": 1,
                                                                           "expert": 2}
    assert dict(make_mesh(None).shape) == {"data": 8, "sequence": 1, "tensor": 1, "expert": 1}

    # ---- init_params under a mesh: the promised shardings, the single-device values ----------------------
    key = jax.random.key(7)
    mesh = make_mesh("data:2,tensor:2,expert:2", cfg)
    ref = init_params(cfg, key)
    got = init_params(cfg, key, mesh=mesh)
    flat = {params_lib.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(got)[0]}
    golden = {
        "embed": P("tensor", None),
        "head": P("tensor", None),
        "norm": P(None),
        "layers/prefix/0/ffn/experts/w1": P("expert", "tensor", None),
        "layers/prefix/0/ffn/experts/w2": P("expert", None, "tensor"),
        "layers/prefix/0/ffn/gate/tid2eid": P("tensor", None),   # [vocab, topk]
        "layers/stack/0/ffn/experts/w1": P(None, "expert", "tensor", None),
        "layers/stack/0/attn/wo_a": P(None, "tensor", None),
    }
    for name, spec in golden.items():
      assert flat[name].sharding.mesh == mesh and flat[name].sharding.spec == spec, (name, flat[name].sharding)
    for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree.leaves(got)):
      assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), params_lib.path_str(p)

    # the pod path (one jit with out_shardings, what accelerators run) on a few leaves: same values, same layout
    specs = param_specs(cfg)
    sub = {"embed": specs["embed"], "norm": specs["norm"], "prefix0_ffn": specs["layers"]["prefix"][0]["ffn"],
           "stack0_experts": specs["layers"]["stack"][0]["ffn"]["experts"]}
    shard = jax.tree.map(lambda s: sharding.param_sharding(s.axes, s.shape, mesh), sub, is_leaf=params_lib.is_spec)
    for dtype in ("float32", "bfloat16"):
      host = params_lib.init_from_specs(sub, key, dtype, shard)
      dev = params_lib.init_from_specs(sub, key, dtype, shard, on_device=True)
      pairs = zip(jax.tree_util.tree_flatten_with_path(host)[0], jax.tree.leaves(dev), jax.tree.leaves(shard))
      for (p, a), b, s in pairs:
        assert b.sharding.is_equivalent_to(s, b.ndim) and a.dtype == b.dtype, (params_lib.path_str(p), b.sharding)
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        # equal up to XLA:CPU's fused multiply-add (normal_plus_one leaves): 1 ulp at most
        assert np.array_equal(a, b) or np.abs(a - b).max() <= 2 ** -22, (dtype, params_lib.path_str(p))
    alone = params_lib.init_from_specs({"embed": specs["embed"]}, key, "bfloat16")["embed"]   # other leaves absent
    assert np.array_equal(np.asarray(dev["embed"]), np.asarray(alone))

    # ---- eval_shape: traceable, nothing allocated --------------------------------------------------------
    shapes = jax.eval_shape(init_params, cfg, key)
    sd = lambda tree: jax.tree.map(lambda s: (s.shape, s.dtype), tree)
    assert sd(shapes) == sd(abstract_params(cfg))
    print("ok")
""")

DECODE = [sys.executable, "-m", "launch.decode", "--config=tiny", "--prompt_ids=5,17,300", "--max_new_tokens=4"]


def _run(cmd, env):
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _ids(proc):
  lines = [l for l in proc.stdout.splitlines() if l.startswith("[0] ids:")]
  assert proc.returncode == 0 and lines, proc.stderr[-3000:]
  return lines[0]


def test_meshes_and_sharded_init_on_8_devices():
  run_script(SCRIPT, n_devices=8)


def test_decode_with_mesh_matches_one_device_and_bad_mesh_is_one_error_line():
  want = _ids(_run(DECODE, cpu_env(1)))
  got = _run(DECODE + ["--mesh=data:2,expert:4"], ENV8)
  assert "mesh: data:2,expert:4 over 8 cpu devices" in got.stderr, got.stderr[-2000:]
  assert _ids(got) == want, (got.stdout, want)
  for mesh, message in [("data:1,expert:7", "error: mesh expert:7 has 7 devices but 8 cpu device(s) are present"),
                        ("tensor:4,data:2", "error: mesh axis 'tensor' has size 4, which does not divide o_groups=2"),
                        ("expert:8,model:1", "error: mesh 'expert:8,model:1': unknown axis 'model'")]:
    bad = _run(DECODE + [f"--mesh={mesh}"], ENV8)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and lines[-1].startswith(message), bad.stderr
    assert sum(l.startswith("error:") for l in lines) == 1 and "RANDOM weights" not in bad.stderr, bad.stderr
