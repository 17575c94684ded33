"""The whole model on the pod meshes, 8 CPU devices in a subprocess (the device count is fixed when JAX
starts): forward logits, prefill + decode steps equal one device's (fp32, <= 1e-5 relative), and greedy
generation gives the same ids (on expert:8, data:2,tensor:2,expert:2 and sequence:4,expert:2; on
data:2,expert:4 `launch.decode` does, tests/test_pods.py; generate's prefill is the program the prefill check
compiled, found again in the run's persistent compilation cache, tests/conftest.py). On the `sequence` mesh
the prompt runs context-parallel (dsv4_jax/context_parallel.py): a prompt of 70 tokens is padded to 4 shards
of 32, rows of different lengths share the batch, the compiled forward passes halos (collective-permute)
and gathers entries (all-gather), decoding continues from the cache it filled, and a training step's loss
and gradients through it equal one device's.

The model is tiny (configs/tiny.py) cut to 5 layers: a hash-routed layer, then HCA / CSA twice under scan,
and the MTP block; compile time, which dominates, follows the unrolled and stacked layer kinds (about 25% less
than tiny's 7 layers, 3 of them unrolled).

The meshes are split over two test files, one subprocess each (about 4 minutes each on one core):
tests/test_sharded_model.py (expert:8, data:2,expert:4, data:2,tensor:2,expert:2) and
tests/test_sharded_context.py (sequence:4,expert:2 and the training step). Each computes the one-device
reference; tests/conftest.py runs the second after the first on one xdist worker, so that it finds the
reference's programs in the run's compilation cache (39 s -> 25 s)."""
import subprocess
import sys
import textwrap

from fake_devices import ROOT, cpu_env

SCRIPT = textwrap.dedent("""
    import dataclasses, sys, time
    import jax, jax.numpy as jnp, numpy as np
    from dsv4_jax import (context_parallel, decode_step, forward, generate, init_cache, init_params, load_config,
                          prefill, sharding)
    from dsv4_jax.params import logical_axes
    from dsv4_jax.transformer import param_specs
    assert len(jax.devices()) == 8
    MESHES = sys.argv[1].split(";")
    t0 = time.time()
    # tiny with 5 layers: a hash-routed sliding-window-only layer, then (HCA 8x, CSA 4x) twice under scan
    cfg = dataclasses.replace(load_config("tiny"), n_layers=5, compress_ratios=(0, 8, 4, 8, 4, 0), n_hash_layers=1)
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

    def grad_check(placed, mesh):
      # training through context-parallel attention: the loss and every gradient equal one device's (fp32;
      # per leaf against the largest gradient of all); bf16 compiles (XLA:CPU needs fp32 reductions there)
      from dsv4_jax import train
      batch = {"tokens": toks[:, :50], "loss_mask": np.ones((B, 50), np.float32)}
      tc = train.TrainConfig(compute_dtype="float32")
      vg = lambda p: jax.value_and_grad(lambda p: train.loss_fn(p, cfg, batch, tc)[0], allow_int=True)(p)
      l0, g0 = jax.jit(vg)(params)
      with sharding.use_mesh(mesh):
        l1, g1 = jax.jit(vg)(placed)
      pairs = [(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1))
               if jnp.issubdtype(a.dtype, jnp.floating)]
      top = max(float(np.abs(a).max()) for a, _ in pairs)
      gerr = max(float(np.abs(a - b).max()) for a, b in pairs) / top
      print(f"training loss {float(l0):.6f} / {float(l1):.6f}, gradient error {gerr:.1e} of the largest", flush=True)
      assert abs(float(l0) - float(l1)) <= 1e-5 * abs(float(l0)) and gerr <= 1e-5, (l0, l1, gerr)
      import dataclasses
      from dsv4_jax import attention
      bcfg = dataclasses.replace(cfg, dtype="bfloat16")
      p_attn = jax.tree.map(lambda a: a[0].astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a[0],
                            placed["layers"]["stack"][1]["attn"])                  # a CSA layer (4x)
      x = jnp.ones((B, 64, cfg.dim), jnp.bfloat16)
      loss = lambda p: jnp.sum(attention.attention(p, bcfg, 4, x)[0].astype(jnp.float32))
      with sharding.use_mesh(mesh):
        g = jax.jit(jax.grad(loss, allow_int=True))(p_attn)
      assert all(bool(jnp.isfinite(a).all()) for a in jax.tree.leaves(g) if jnp.issubdtype(a.dtype, jnp.floating))

    ref, ref_ids, _ = run_all(params, None)
    print("one device %.0fs" % (time.time() - t0), flush=True)
    axes = logical_axes(param_specs(cfg))
    GREEDY = ("expert:8", "data:2,tensor:2,expert:2", "sequence:4,expert:2")   # data:2,expert:4: test_pods.py
    for spec in MESHES:
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
        t1 = time.time()
        grad_check(placed, mesh)
        print("training step through context parallel (%.0fs)" % (time.time() - t1), flush=True)
    print("ok")
""")


def check_meshes(*meshes: str, timeout: float = 1800) -> str:
  """Runs SCRIPT on 8 fake CPU devices for `meshes`; asserts that it printed "ok" last."""
  proc = subprocess.run([sys.executable, "-c", SCRIPT, ";".join(meshes)], cwd=ROOT, env=cpu_env(8),
                        capture_output=True, text=True, timeout=timeout)
  print(proc.stdout)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc.stdout
