"""The grouped output projection (`attention.output_projection`: wo_a per group, then wo_b) of one decode
step at V4-Flash's width, compiled for one TPU chip without a TPU (deviceless libtpu, as launch/aot.py):

    python bench/output_projection.py [--topology=v5p:2x2x1] [--config=flash]

For batch 1 and 8 (one token each), with the rows padded to 8 per device (`linear.pad_seq_rows`, what the
model does) and without: `memory_analysis()` temporaries and `cost_analysis()` bytes accessed, beside the
weights' bytes. XLA:TPU lowers a matmul of fewer than 8 rows to a broadcast and multiply-reduce on the vector
unit; in this chain of two projections it materialised the broadcast input at the weight's shape in fp32.
"""
import argparse
import dataclasses
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dsv4_jax import attention, load_config  # noqa: E402

MB = 1e6


def compiled(cfg, batch: int, device, padded: bool):
  """output_projection for a decode step of `batch` tokens, compiled for `device`."""
  sh = jax.sharding.SingleDeviceSharding(device)
  spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
  H, K, g, r, D = cfg.n_heads, cfg.head_dim, cfg.o_groups, cfg.o_lora_rank, cfg.dim
  p = {"wo_a": spec((g * r, H * K // g), jnp.bfloat16), "wo_b": spec((D, g * r), jnp.bfloat16)}
  o = spec((batch, 1, H, K), jnp.dtype(cfg.dtype))
  angle = spec((batch, 1, cfg.rope_head_dim // 2), jnp.float32)
  saved = attention.pad_seq_rows
  if not padded:
    attention.pad_seq_rows = lambda x: (x, x.shape[1])
  try:
    c = jax.jit(lambda p, o, c, s: attention.output_projection(p, cfg, o, c, s)).trace(p, o, angle, angle)
    c = c.lower().compile()
  finally:
    attention.pad_seq_rows = saved
  cost = c.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  weights = sum(x.size * x.dtype.itemsize for x in p.values())
  return c.memory_analysis().temp_size_in_bytes, cost.get("bytes accessed", float("nan")), weights


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--topology", default="v5p:2x2x1")
  ap.add_argument("--config", default="flash")
  ap.add_argument("--in_child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if not args.in_child:
    from pallas_kernels.aot import libtpu_env
    try:
      env = dict(libtpu_env(), JAX_PLATFORMS="cpu")
    except FileNotFoundError as e:
      sys.exit(f"error: {e}")
    return subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--in_child"],
                          env=env).returncode
  from jax.experimental import topologies
  device = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices[0]
  print(f"output projection of one decode step, config {args.config} (wo_a [o_groups*o_lora_rank, heads*head_dim"
        f"/o_groups], wo_b [dim, o_groups*o_lora_rank], bf16); one chip of {args.topology} ({device.device_kind}), "
        f"deviceless libtpu compile, jax {jax.__version__}")
  print(f"{'dtype':>9} {'batch':>5} {'rows':>9} {'weights MB':>10} {'temp MB':>9} {'accessed MB':>11} {'acc/weights':>11}")
  for dtype in ("bfloat16", "float32"):
    cfg = dataclasses.replace(load_config(args.config), dtype=dtype, quant_sim=False)
    for batch in (1, 8):
      for padded in (False, True):
        temp, acc, weights = compiled(cfg, batch, device, padded)
        print(f"{dtype:>9} {batch:>5} {'padded' if padded else 'as is':>9} {weights / MB:>10.1f} {temp / MB:>9.2f} "
              f"{acc / MB:>11.1f} {acc / weights:>10.2f}x", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
