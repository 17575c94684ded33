"""The whole model on the pod meshes, 8 CPU devices in one subprocess (the device count is fixed when JAX
starts): on expert:8, data:2,expert:4, data:2,tensor:2,expert:2 and sequence:4,expert:2, forward logits,
prefill + decode steps equal one device's (fp32, <= 1e-5 relative), and greedy generation gives the same
ids on the last two (on data:2,expert:4 `launch.decode` does, tests/test_pods.py). On the
`sequence` mesh the prompt runs context-parallel (dsv4_jax/context_parallel.py): a prompt of 70 tokens is
padded to 4 shards of 32, rows of different lengths share the batch, the compiled forward passes halos
(collective-permute) and gathers entries (all-gather), and decoding continues from the cache it filled."""
import textwrap

from fake_devices import run_script

SCRIPT = textwrap.dedent("""
    import time
    import jax, jax.numpy as jnp, numpy as np
    from dsv4_jax import (context_parallel, decode_step, forward, generate, init_cache, init_params, load_config,
                          prefill, sharding)
    from dsv4_jax.params import logical_axes
    from dsv4_jax.transformer import param_specs
    assert len(jax.devices()) == 8
    t0 = time.time()
    cfg = load_config("tiny")
    params = init_params(cfg, jax.random.key(0))
    B, S, CAP = 2, 70, 96
    toks = np.asarray(jax.random.randint(jax.random.key(1), (B, S), 0, cfg.vocab_size), np.int32)
    lengths = np.array([70, 45])
    nxt = np.asarray(jax.random.randint(jax.random.key(2), (3, B), 0, cfg.vocab_size), np.int32)
    prompts = [toks[0, :70].tolist(), toks[1, :45].tolist()]

    def run_all(p, mesh, greedy=True):
      f = jax.jit(forward, static_argnums=1)
      with sharding.use_mesh(mesh):
        out = [f(p, cfg, toks).logits]
        logits, cache = prefill(p, cfg, toks, lengths, init_cache(cfg, B, CAP, mesh=mesh))
        out.append(logits)
        for t in nxt:
          logits, cache = decode_step(p, cfg, t, cache)
          out.append(logits)
        ids = generate(p, cfg, prompts, 4, max_seq_len=CAP).tokens if greedy else None
        cp = context_parallel.shards() > 1
        hlo = f.lower(p, cfg, toks).compile().as_text() if cp else ""
      return [np.asarray(o) for o in out], ids, hlo

    ref, ref_ids, _ = run_all(params, None)
    print("one device %.0fs" % (time.time() - t0), flush=True)
    axes = logical_axes(param_specs(cfg))
    GREEDY = ("data:2,tensor:2,expert:2", "sequence:4,expert:2")   # data:2,expert:4: tests/test_pods.py
    for spec in ("expert:8", "data:2,expert:4", "data:2,tensor:2,expert:2", "sequence:4,expert:2"):
      t1 = time.time()
      mesh = sharding.make_mesh(spec, cfg)
      placed = jax.device_put(params, jax.tree.map(lambda a: sharding.logical_sharding(a, mesh), axes,
                                                   is_leaf=lambda x: isinstance(x, tuple)))
      got, ids, hlo = run_all(placed, mesh, greedy=spec in GREEDY)
      errs = [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(got, ref)]
      print(f"{spec}: rel err forward {errs[0]:.1e}, prefill {errs[1]:.1e}, decode {max(errs[2:]):.1e}; "
            f"greedy ids equal {ids == ref_ids if ids else 'not run'} ({time.time() - t1:.0f}s)", flush=True)
      assert max(errs) <= 1e-5, (spec, errs)
      assert ids is None or (ids == ref_ids and len(ids[0]) == 4), (spec, ids, ref_ids)
      if spec.startswith("sequence"):
        with sharding.use_mesh(mesh):
          assert context_parallel.shards() == 4 and context_parallel.padded_length(cfg, S, 4) == 128
        assert "collective-permute" in hlo and "all-gather" in hlo
    print("ok")
""")


def test_pod_meshes_match_one_device():
  run_script(SCRIPT, n_devices=8)
