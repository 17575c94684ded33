"""Compiled temporaries of prefill against the prompt length (nothing runs: compiling needs no memory).

    python bench/prefill_memory.py [--max_len=1048576] [--min_len=8192]

The Flash-shaped attention stack of bench/decode_memory.py (toy MoE and vocabulary), one sequence of S
tokens prefilled into a cache of capacity S, fp32 compute, bf16 cache. `temp` is
`memory_analysis().temp_size_in_bytes` of the jitted step (the cache is an argument, donated: not a
temporary). Targets: growth linear in S (1M / 128K <= 10, not 64) and <= 16 GiB at 1M tokens.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.decode_memory import nbytes, stack_config  # noqa: E402
from dsv4_jax import abstract_params, init_cache  # noqa: E402
from dsv4_jax.inference import step  # noqa: E402

GiB = 2 ** 30


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--min_len", type=int, default=8192)
  ap.add_argument("--max_len", type=int, default=1048576)
  ap.add_argument("--cache_dtype", default="bfloat16")
  args = ap.parse_args()
  print(f"prefill of one sequence of S tokens, Flash-shaped attention stack (D=256, 8 heads x 512, window 128, "
        f"top-k 512, layers SWA/CSA/HCA/CSA/HCA/SWA), fp32 compute, {args.cache_dtype} cache; backend "
        f"{jax.default_backend()}, jax {jax.__version__}")
  print(f"{'S':>9} {'temp GiB':>9} {'temp/S (KiB/token)':>19} {'cache GiB':>10} {'compile s':>10}")
  S, rows = args.min_len, {}
  while S <= args.max_len:
    cfg = stack_config(S)
    params = abstract_params(cfg)
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, S, args.cache_dtype))
    tok, n = jax.ShapeDtypeStruct((1, S), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32)
    t0 = time.perf_counter()
    c = jax.jit(step, static_argnums=(1, 5), donate_argnums=4).lower(params, cfg, tok, n, cache, S).compile()
    secs = time.perf_counter() - t0
    temp = c.memory_analysis().temp_size_in_bytes
    rows[S] = temp
    print(f"{S:>9} {temp / GiB:>9.3f} {temp / S / 1024:>19.2f} {nbytes(cache) / GiB:>10.3f} {secs:>10.1f}")
    S *= 2
  if 131072 in rows and 1048576 in rows:
    print(f"temp(1M) / temp(128K) = {rows[1048576] / rows[131072]:.2f} (linear would be 8, quadratic 64)")


if __name__ == "__main__":
  main()
