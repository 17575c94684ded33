"""Expert-parallel MoE (dsv4_jax/expert_parallel.py) on 8 CPU devices in one subprocess (the device count is
fixed when JAX starts): the sharded MoE equals the single-device `moe()` on meshes expert:8 and
data:2,expert:4 (score and hash routing, padding, fp4 QArray experts, every token on one expert with and
without drops), the CPU emulation of ragged_all_to_all keeps the op's contract, the compiled HLO exchanges
tokens with all-to-all and gathers no expert weight (the whole tiny model on expert:8 against one device:
tests/test_sharded_model.py). The real `ragged_all_to_all` is lowered for TPU on an abstract mesh, and (with
libtpu under .aot/) compiled for a v5e:2x4 topology in a second subprocess."""
import os
import textwrap

import pytest

from fake_devices import ROOT, run_script

LIBTPU = os.path.join(ROOT, ".aot", "libtpu")

SCRIPT = textwrap.dedent("""
    import math, re, time
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P
    from dsv4_jax import expert_parallel as ep, init_params, load_config, moe, qarray, sharding
    assert len(jax.devices()) == 8
    t0 = time.time()
    cfg = load_config("tiny")                                  # 8 experts, k = 2
    E, F, D, k = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim, cfg.n_activated_experts
    params = init_params(cfg, jax.random.key(0))
    print("init %.1fs" % (time.time() - t0), flush=True)
    score = jax.tree.map(lambda a: a[0], params["layers"]["stack"][0]["ffn"])
    hashed = params["layers"]["prefix"][0]["ffn"]
    assert "bias" in score["gate"] and "tid2eid" in hashed["gate"]
    MESHES = ({"expert": 8}, {"data": 2, "expert": 4}, {"tensor": 2, "expert": 4})   # the last: experts split on F too

    def run(p, x, ids, valid, shape, hlo=False, **opts):
      # a fresh jit per mesh (the active mesh is not part of jit's cache key); experts placed as the rules say
      mesh = sharding.make_mesh(shape) if shape else None
      if mesh is not None:
        specs = ep._expert_specs(p["experts"], ep.tensor_split(p["experts"], cfg, mesh))
        p = dict(p, experts=jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), p["experts"], specs))
      f = jax.jit(lambda p, x, ids, valid: moe.moe(p, cfg, x, ids, valid, stats=True))
      with sharding.use_mesh(mesh), ep.options(**opts):
        y, st = f(p, x, ids, valid)
        hlo = f.lower(p, x, ids, valid).compile().as_text() if hlo else ""
      return np.asarray(y), st, hlo

    def rel(a, b):
      return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

    B, S = 4, 24
    x = jax.random.normal(jax.random.key(1), (B, S, D))
    ids = jax.random.randint(jax.random.key(2), (B, S), 0, cfg.vocab_size)
    valid = jnp.arange(S)[None] < jnp.array([24, 17, 24, 5])[:, None]

    # ---- the emulation keeps ragged_all_to_all's contract (numpy model of the op, one update per peer)
    n, rows, out_rows = 8, 16, 28
    rng = np.random.default_rng(0)
    send = rng.integers(0, 3, (n, n)).astype(np.int32)         # send[i, j]: rows i sends to j
    in_off = np.cumsum(send, 1) - send
    out_off = (np.cumsum(send, 0) - send + np.cumsum(rng.integers(0, 2, (n, n)), 0)).astype(np.int32)   # gaps
    assert (out_off + send <= out_rows).all()
    operand = rng.standard_normal((n, rows, 3)).astype(np.float32)
    expect = np.full((n, out_rows, 3), -1.0, np.float32)
    for i in range(n):
      for j in range(n):
        expect[j, out_off[i, j]:out_off[i, j] + send[i, j]] = operand[i, in_off[i, j]:in_off[i, j] + send[i, j]]
    mesh8 = sharding.make_mesh({"expert": 8})
    body = lambda o, io, s, oo, rs: ep.emulated_ragged_all_to_all(
        o[0], jnp.full((out_rows, 3), -1.0), io[0], s[0], oo[0], rs[0], axis_name="expert")[None]
    got = jax.jit(jax.shard_map(body, mesh=mesh8, in_specs=P("expert"), out_specs=P("expert"), check_vma=False))(
        operand, in_off, send, out_off, send.T.copy())
    np.testing.assert_array_equal(np.asarray(got), expect)
    print("emulation contract ok", flush=True)

    # ---- sharded MoE == single device: score routing with padding, hash routing, fp4 QArray experts
    def fp4(shape):
      e, o, i = shape
      return qarray.QArray(values=jnp.asarray(rng.integers(0, 256, (e, o, i // 2), dtype=np.uint8)),
                           scales=jnp.asarray(rng.integers(120, 127, (e, o, i // 32), dtype=np.uint8)),
                           block=qarray.FP4_BLOCK, fmt="fp4")
    quantised = dict(score, experts={n: fp4(score["experts"][n].shape) for n in ("w1", "w2", "w3")})
    for name, p, v in (("score", score, valid), ("hash", hashed, valid), ("fp4", quantised, None)):
      ref, rst, _ = run(p, x, ids, v, None)
      for shape in MESHES:
        y, st, hlo = run(p, x, ids, v, shape, hlo=name == "score")
        err = rel(y, ref)
        print(name, shape, "rel err", err, "%.0fs" % (time.time() - t0), flush=True)
        assert err <= 1e-5, (name, shape, err)
        assert int(st.dropped) == 0 and rst.dropped is None
        np.testing.assert_array_equal(np.asarray(st.load), np.asarray(rst.load))    # psummed = global count
        np.testing.assert_allclose(np.asarray(st.balance), np.asarray(rst.balance), rtol=1e-6)
        if name == "score":
          # the exchange is an all-to-all; nothing gathers expert weights: no all-gather yields an
          # [.., F, D] or [.., D, F] matrix (the all-gathers left are of the [n] send sizes and of
          # activations, which XLA places around the shard_map as it likes)
          assert "all-to-all" in hlo, shape
          gathers = [ln for ln in hlo.splitlines() if "all-gather(" in ln or "all-gather-start(" in ln]
          for line in gathers:
            dims = tuple(int(d) for d in re.search(r"= \\(?\\w+\\[([\\d,]*)\\]", line).group(1).split(",") if d)
            assert dims[-2:] not in ((F, D), (D, F)), line
          print("  hlo: all-to-all x%d, all-gathers" % hlo.count("all-to-all("),
                [re.search(r"= \\(?(\\w+\\[[\\d,]*\\])", ln).group(1) for ln in gathers], flush=True)

    # ---- training through experts split over tensor too: the gradients (tokens and expert weights) equal one
    # device's (w2's partial outputs are psummed over tensor; the tokens' cotangents summed back over it)
    def loss(e, x):
      y, _ = moe.moe(dict(score, experts=e), cfg, x, ids, valid, stats=True)
      return jnp.sum(y.astype(jnp.float32) ** 2)
    g_ref = jax.grad(loss, argnums=(0, 1))(score["experts"], x)
    mesh = sharding.make_mesh({"tensor": 2, "expert": 4})
    assert ep.tensor_split(score["experts"], cfg, mesh) == 2
    specs = ep._expert_specs(score["experts"], 2)
    placed = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), score["experts"], specs)
    with sharding.use_mesh(mesh):
      g = jax.jit(jax.grad(loss, argnums=(0, 1)))(placed, x)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
      assert rel(np.asarray(a), np.asarray(b)) <= 1e-5, rel(np.asarray(a), np.asarray(b))
    print("gradients through tensor-split experts ok", flush=True)

    # ---- decode size (4 tokens x 2 slots = 8 experts; moe's gathered path for 3 tokens): both EP paths,
    # the exchange and the small-batch all-gather (chosen by size on real configs: `decode_path`), with a
    # padded row, hash routing and fp4 experts; the gather path exchanges no all-to-all
    assert ep.decode_path(1, 6, 8, 256) == "gather" and ep.decode_path(8, 6, 8, 256) == "exchange"
    assert ep.decode_path(1, 2, 4, 8) == "exchange"                # 8 pairs, 8 experts: not fewer
    vdec = jnp.array([[True], [True], [False], [True]])
    for name, p in (("score", score), ("hash", hashed), ("fp4", quantised)):
      ref, rst, _ = run(p, x[:, :1], ids[:, :1], vdec, None)
      for shape in MESHES:
        for path in ("exchange", "gather"):
          y, st, hlo = run(p, x[:, :1], ids[:, :1], vdec, shape, hlo=name == "score", path=path)
          print("decode size", name, shape, path, "rel err", rel(y, ref), flush=True)
          assert rel(y, ref) <= 1e-5 and int(st.dropped) == 0, (name, shape, path, rel(y, ref))
          np.testing.assert_array_equal(np.asarray(st.load), np.asarray(rst.load))
          if hlo and path == "gather":
            assert "all-to-all" not in hlo and "reduce-scatter" in hlo, shape
            for line in (ln for ln in hlo.splitlines() if "all-gather(" in ln or "all-gather-start(" in ln):
              dims = tuple(int(d) for d in re.search(r"= \\(?\\w+\\[([\\d,]*)\\]", line).group(1).split(",") if d)
              assert dims[-2:] not in ((F, D), (D, F)), line

    # ---- every token on experts 0 and 1: dropless at the default capacity; counted drops when smaller
    skew = dict(score, gate=dict(score["gate"], bias=jnp.zeros((E,)).at[0].set(100.0).at[1].set(50.0)))
    ref, rst, _ = run(skew, x, ids, None, None)
    assert np.asarray(rst.load).tolist() == [B * S, B * S] + [0] * (E - 2)
    T = B * S
    for shape in MESHES:
      y, st, _ = run(skew, x, ids, None, shape)
      assert rel(y, ref) <= 1e-5 and int(st.dropped) == 0, (shape, rel(y, ref), st.dropped)
      nd, ne = shape.get("data", 1), shape["expert"]
      T_l = T // (nd * ne)
      for cf in ((1.0,) if nd == 1 else (1.5,)):
        cap = ep.capacity_rows(T_l, k, ne, cf)
        # per data row: T/nd pairs for expert 0 and as many for expert 1, on shard e // (E/ne); C rows each
        per_shard = np.bincount(np.array([0, 1]) // (E // ne), minlength=ne) * (T // nd)
        expect = nd * int(np.maximum(per_shard - cap, 0).sum())
        y, st, _ = run(skew, x, ids, None, shape, capacity_factor=cf)
        print("all on experts 0,1", shape, "capacity", cap, "dropped", int(st.dropped), "expected", expect,
              flush=True)
        assert int(st.dropped) == expect > 0, (shape, cf, int(st.dropped), expect)
        np.testing.assert_array_equal(np.asarray(st.load), np.asarray(rst.load))   # load counts before drops
        if shape == {"expert": 8}:
          # senders in token order, first sender wins: the first `cap` tokens keep both pairs
          yf, rf = y.reshape(T, D), ref.reshape(T, D)
          assert rel(yf[:cap], rf[:cap]) <= 1e-5
          assert np.abs(yf[cap:] - rf[cap:]).max(axis=-1).min() > 1e-3            # the rest lost both

    # ---- the real ragged_all_to_all lowers for TPU (abstract 8-device mesh, no devices needed)
    amesh = AbstractMesh((8,), ("expert",))
    sd = lambda shape, dt, spec: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(amesh, spec))
    pe = {n: sd(score["experts"][n].shape, jnp.bfloat16, P("expert")) for n in ("w1", "w2", "w3")}
    f = lambda pe, x, idx, w: ep.routed_experts(pe, cfg, x, idx, w, None, amesh, impl="native")
    txt = jax.jit(f).trace(pe, sd((64, D), jnp.bfloat16, P("expert")), sd((64, k), jnp.int32, P("expert")),
                           sd((64, k), jnp.float32, P("expert"))).lower(lowering_platforms=("tpu",)).as_text()
    assert txt.count("ragged_all_to_all") == 3, txt.count("ragged_all_to_all")
    print("tpu lowering ok %.1fs" % (time.time() - t0))
    print("ok")
""")

TPU_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from dsv4_jax import load_config, expert_parallel as ep
    cfg = load_config("tiny")
    E, F, D, k = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim, cfg.n_activated_experts
    devs = topologies.get_topology_desc(topology_name="v5e:2x4", platform="tpu").devices
    mesh = Mesh(np.asarray(devs).reshape(2, 4), ("data", "expert"))
    sd = lambda shape, dt, spec: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, spec))
    pe = {"w1": sd((E, F, D), jnp.bfloat16, P("expert")), "w2": sd((E, D, F), jnp.bfloat16, P("expert")),
          "w3": sd((E, F, D), jnp.bfloat16, P("expert"))}
    tok = P(("data", "expert"))
    f = lambda pe, x, idx, w: ep.routed_experts(pe, cfg, x, idx, w, None, mesh, capacity_factor=2.0)
    hlo = jax.jit(f).trace(pe, sd((256, D), jnp.bfloat16, tok), sd((256, k), jnp.int32, tok),
                           sd((256, k), jnp.float32, tok)).lower().compile().as_text()
    print("ragged-all-to-all ops", hlo.count("ragged-all-to-all("))
    assert "ragged-all-to-all" in hlo
    print("ok")
""")


def test_expert_parallel_moe_on_8_cpu_devices():
  run_script(SCRIPT, n_devices=8)


@pytest.mark.skipif(not os.path.isdir(os.path.join(LIBTPU, "libtpu")), reason="no libtpu under .aot/ (make setup)")
def test_expert_parallel_compiles_for_tpu_with_the_real_ragged_all_to_all():
  """Deviceless compile with libtpu (as pallas_kernels/aot.py): the platform switch picks the native op."""
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env.update(PYTHONPATH=os.pathsep.join([LIBTPU, ROOT]), TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="localhost",
             TPU_ACCELERATOR_TYPE="v6e-4",
             ALLOW_MULTIPLE_LIBTPU_LOAD="1")   # launch.aot's test may compile on the other xdist worker
  run_script(TPU_SCRIPT, env=env, timeout=300)
