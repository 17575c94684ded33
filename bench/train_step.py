"""The fine-tuning step on this machine: step time, tokens/s, compile time against depth, and memory.

    python bench/train_step.py              # the demo config, then a Flash-shaped toy at 7 / 15 / 43 layers

Table 1 times `dsv4_jax.train.train_step` (Muon + AdamW, bias balancing, remat per the train config) on
random tokens after a warm-up: median step seconds, tokens/s. Table 2 compiles the step for a Flash-shaped
toy (Flash's layer recipe and attention shape, toy width) at increasing depth: with the repeated layer
pattern under `lax.scan`, compile time stays about flat; `memory_analysis()` gives the step's temporaries
and argument bytes (the state). Numbers are for the CPU they ran on; ratios within one run are what to read.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dsv4_jax import abstract_params, init_params, load_config  # noqa: E402
from dsv4_jax.train import TrainConfig, _train_step, init_train_state, make_optimizer, train_step  # noqa: E402


def toy_flash(n_layers: int):
  """Flash's layer recipe (2 sliding, then HCA/CSA alternating, 3 hash layers, MTP) and attention shape
  ratios at toy width."""
  flash = load_config("flash")
  ratios = flash.compress_ratios[:n_layers] + flash.compress_ratios[flash.n_layers:]
  return dataclasses.replace(
      load_config("tiny"), name=f"flash_toy_{n_layers}", n_layers=n_layers, compress_ratios=ratios,
      n_hash_layers=min(3, n_layers), window_size=128, index_topk=16, dtype="float32")


def batch_of(cfg, B, S, seed=0):
  toks = jax.random.randint(jax.random.key(seed), (B, S), 2, cfg.vocab_size)
  return {"tokens": toks.astype(jnp.int32), "loss_mask": jnp.ones((B, S), jnp.float32)}


def time_steps(cfg, tc, steps: int):
  params = init_params(cfg, jax.random.key(0))
  state = init_train_state(params, make_optimizer(tc, params), cfg, tc)
  batch = batch_of(cfg, tc.batch_size, tc.seq_len)
  t0 = time.perf_counter()
  state, m = train_step(state, batch)
  jax.block_until_ready(m["loss"])
  first = time.perf_counter() - t0
  ts = []
  for i in range(steps):
    t0 = time.perf_counter()
    state, m = train_step(state, batch_of(cfg, tc.batch_size, tc.seq_len, i + 1))
    jax.block_until_ready(m["loss"])
    ts.append(time.perf_counter() - t0)
  return first, float(np.median(ts)), float(m["loss"])


def compile_and_memory(cfg, tc):
  params = abstract_params(cfg)
  tx = make_optimizer(tc, params)
  state = jax.eval_shape(lambda p: init_train_state(p, tx, cfg, tc), params)
  batch = jax.eval_shape(lambda: batch_of(cfg, tc.batch_size, tc.seq_len))
  t0 = time.perf_counter()
  compiled = jax.jit(_train_step, donate_argnums=0).lower(state, batch).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  return seconds, mem.temp_size_in_bytes, mem.argument_size_in_bytes


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=128)
  args = ap.parse_args()
  print(f"train_step on {jax.devices()[0].device_kind}, jax {jax.__version__}, batch {args.batch} x {args.seq} tokens")
  print(f"{'config':>14} {'params':>9} {'compile+1st s':>13} {'step s':>8} {'tokens/s':>9} {'loss':>7}")
  from configs.demo import get_train_config
  for cfg, tc in ((load_config("demo"), TrainConfig.from_dict(dict(get_train_config(), batch_size=args.batch,
                                                                  seq_len=args.seq))),
                  (toy_flash(7), TrainConfig(batch_size=args.batch, seq_len=args.seq, compute_dtype="float32"))):
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(cfg)))
    first, step, loss = time_steps(cfg, tc, args.steps)
    print(f"{cfg.name:>14} {n / 1e6:8.2f}M {first:13.1f} {step:8.3f} {args.batch * args.seq / step:9.0f} {loss:7.3f}",
          flush=True)
  print()
  print("compile time and memory of one step against depth (Flash-shaped toy, abstract state)")
  print(f"{'layers':>6} {'compile s':>9} {'vs 7':>6} {'temp MiB':>9} {'state MiB':>9}")
  base = None
  tc = TrainConfig(batch_size=args.batch, seq_len=args.seq, compute_dtype="float32")
  for n in (7, 15, 43):                 # 7: the 3 hash layers unrolled + 2 scanned periods; 43: Flash's depth
    sec, temp, args_bytes = compile_and_memory(toy_flash(n), tc)
    base = base or sec
    print(f"{n:6d} {sec:9.1f} {sec / base:6.2f} {temp / 2**20:9.1f} {args_bytes / 2**20:9.1f}", flush=True)


if __name__ == "__main__":
  main()
