"""The decode MoE on an expert-parallel mesh: what a shard computes when most of its chosen-expert slots are spare.

    python bench/decode_moe.py [--devices=4] [--batches=1,2,4] [--repeats=20]

Emulates `--devices` devices on this CPU (XLA's host platform) and builds one MoE layer with Flash's routing
shape (256 routed experts, 6 active, score routing, one shared expert) at reduced width (dim 1024, expert dim
512) and fp4 routed experts (the released format), its experts split over an `expert` mesh axis. At decode batch
sizes (fewer (token, expert) pairs than experts) the expert-parallel layer all-gathers the tokens and each
shard applies its own chosen experts (`moe._gathered_experts`): U = min(pairs, local experts) static slots, of
which only the shard's distinct chosen experts are real. The jitted layer is timed two ways, same process,
same inputs:
- skip: `moe.DECODE_GROUP` as it is (4): groups of slots with no real expert are skipped (`lax.cond`);
- all: `DECODE_GROUP` = U: one group, every slot applied (each spare slot repeats a real expert), as the decode
  path did before groups were skipped.
Both give the same outputs (checked). Printed: U, the real slots per shard (mean, max), the groups the skip
runs per shard (mean), milliseconds per call (best of `--repeats`) and all / skip. On an accelerator the layer
is bound by the weight bytes it reads, so the groups it runs are what matters; this CPU's times also include
the dequantisation and the matmuls of those groups.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--devices", type=int, default=4, help="emulated devices, all on the expert axis")
  ap.add_argument("--batches", default="1,2,4", help="decode batch sizes (tokens per step)")
  ap.add_argument("--repeats", type=int, default=20)
  args = ap.parse_args()
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = " ".join(
      [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
      + [f"--xla_force_host_platform_device_count={args.devices}"])

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding

  from dsv4_jax import expert_parallel as ep, load_config, moe, qarray, sharding

  n, default_group = args.devices, moe.DECODE_GROUP
  cfg = dataclasses.replace(load_config("tiny"), dim=1024, moe_inter_dim=512, n_routed_experts=256,
                            n_activated_experts=6, n_shared_experts=1, n_hash_layers=0)
  E, F, D, k = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim, cfg.n_activated_experts
  if E % n:
    sys.exit(f"error: --devices={n} must divide the {E} experts")
  rng = np.random.default_rng(0)

  def fp4(*shape):
    return qarray.QArray(values=jnp.asarray(rng.integers(0, 256, shape[:-1] + (shape[-1] // 2,), dtype=np.uint8)),
                         scales=jnp.asarray(rng.integers(120, 127, shape[:-1] + (shape[-1] // 32,), dtype=np.uint8)),
                         block=qarray.FP4_BLOCK, fmt="fp4")
  normal = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.05, jnp.float32)
  p = {"gate": {"weight": normal(E, D), "bias": jnp.zeros((E,), jnp.float32)},
       "experts": {"w1": fp4(E, F, D), "w3": fp4(E, F, D), "w2": fp4(E, D, F)},
       "shared_experts": {"w1": normal(F, D), "w3": normal(F, D), "w2": normal(D, F)}}
  mesh = sharding.make_mesh({"expert": n})
  specs = ep._expert_specs(p["experts"], ep.tensor_split(p["experts"], cfg, mesh))
  p["experts"] = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), p["experts"], specs)
  print(f"one MoE layer, {E} experts (fp4), k = {k}, dim {D}, expert dim {F}; mesh expert:{n} on "
        f"{jax.device_count()} emulated CPU devices; best of {args.repeats} calls, jax {jax.__version__}")
  print(f"{'batch':>5} {'slots U':>7} {'real/shard':>10} {'max':>4} {'groups run':>10} "
        f"{'skip ms':>8} {'all ms':>8} {'all/skip':>8}")
  for B in map(int, args.batches.split(",")):
    x = jax.random.normal(jax.random.key(B), (B, 1, D), jnp.float32)
    ids = jnp.zeros((B, 1), jnp.int32)
    idx, _ = moe.route(p["gate"], cfg, x.reshape(B, D), ids.reshape(-1))
    T = -(-B // n) * n                                   # tokens padded to the expert axis, then all-gathered
    U = min(T * k, E // n)
    local = np.asarray(idx).reshape(-1) // (E // n)
    real = np.array([len(set(np.asarray(idx).reshape(-1)[local == s])) for s in range(n)])
    G = min(U, default_group)
    groups = np.ceil(real / G).mean()
    if T * k >= E:
      print(f"{B:>5}: {T * k} pairs >= {E} experts: the exchange path, not the decode path")
      continue
    times, outs = {}, {}
    for name, group in (("skip", default_group), ("all", U)):
      moe.DECODE_GROUP = group
      f = jax.jit(lambda p, x, ids: moe.moe(p, cfg, x, ids))      # a fresh jit: DECODE_GROUP is read at trace
      with sharding.use_mesh(mesh):
        outs[name] = np.asarray(jax.block_until_ready(f(p, x, ids)))
        best = float("inf")
        for _ in range(args.repeats):
          t0 = time.perf_counter()
          jax.block_until_ready(f(p, x, ids))
          best = min(best, time.perf_counter() - t0)
      times[name] = best * 1e3
    moe.DECODE_GROUP = default_group
    err = np.abs(outs["skip"] - outs["all"]).max() / max(np.abs(outs["all"]).max(), 1e-30)
    assert err <= 1e-5, f"batch {B}: skip and all differ by {err:.1e}"
    print(f"{B:>5} {U:>7} {real.mean():>10.2f} {real.max():>4} {groups:>10.2f} {times['skip']:>8.2f} "
          f"{times['all']:>8.2f} {times['all'] / times['skip']:>7.2f}x")


if __name__ == "__main__":
  main()
