"""Compile time of the forward pass against depth, on abstract parameters (no weights are allocated).

    python bench/compile_time.py [--config=flash] [--seq=512]

Lowers and compiles `forward` for the config with its first n layers (n = 3, 7, 15, all) on the CPU
and prints a table: with the repeated (HCA, CSA) pattern under `lax.scan`, compile time stays about flat
as the depth grows from a handful of layers to all of them.
"""
import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dsv4_jax import abstract_params, forward, layer_plan, load_config  # noqa: E402


def truncated(cfg, n):
  ratios = cfg.compress_ratios[:n] + cfg.compress_ratios[cfg.n_layers:]
  return dataclasses.replace(cfg, n_layers=n, n_hash_layers=min(cfg.n_hash_layers, n), compress_ratios=ratios)


def compile_seconds(cfg, batch, seq):
  params = abstract_params(cfg)
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  t0 = time.perf_counter()
  lowered = jax.jit(forward, static_argnums=1).lower(params, cfg, tokens)
  t1 = time.perf_counter()
  lowered.compile()
  return t1 - t0, time.perf_counter() - t1


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="flash")
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--batch", type=int, default=1)
  args = ap.parse_args()
  full = load_config(args.config)
  depths = sorted({n for n in (3, 7, 15) if n < full.n_layers} | {full.n_layers})
  print(f"forward compile time, config={args.config}, tokens=[{args.batch}, {args.seq}], "
        f"backend={jax.default_backend()}, jax {jax.__version__}")
  print(f"{'layers':>6} {'unrolled':>8} {'scanned':>10} {'lower s':>8} {'compile s':>9} {'vs smallest':>11}")
  base = None
  for n in depths:
    cfg = truncated(full, n)
    plan = layer_plan(cfg)
    lower, comp = compile_seconds(cfg, args.batch, args.seq)
    total = lower + comp
    base = base or total
    unrolled = len(plan.prefix) + len(plan.suffix)
    print(f"{n:>6} {unrolled:>8} {f'{plan.reps}x{len(plan.period)}':>10} {lower:>8.2f} {comp:>9.2f} "
          f"{total / base:>10.2f}x")


if __name__ == "__main__":
  main()
