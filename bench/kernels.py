"""The Pallas kernels against the XLA references at Flash's shapes, on a TPU or GPU.

    python bench/kernels.py                 # decode at batch 1 and 32, context 4K / 128K / 1M; prefill
    python bench/kernels.py --quick         # batch 1, contexts 4K and 128K

Per kernel and shape: median time, the bytes the op must move (each stored row it reads once, its inputs
and outputs once) and its FLOPs, as achieved HBM bandwidth and FLOP/s, and as fractions of this chip's
ceilings measured in the same run (a large device-to-device copy; a large bf16 matmul), beside the XLA
reference (`attn_impl="xla"`) on the same inputs. The "prefill q1" rows run the per-query (decode) kernel
at the prefill shapes, beside the default blocked prefill kernel, to show what blocking queries buys.
Targets (docs/performance.md, issue 9): decode kernels >= 70% of HBM bandwidth, prefill attention >= 40% of
bf16 peak. On a CPU there is no accelerator to
measure: it says so and exits 0 (the kernels' CPU proof is the interpret-mode tests and the deviceless
compiles).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax import kv_format, ops
from dsv4_jax.kv_format import Layout
from pallas_kernels import indexer as ix
from pallas_kernels import sparse_attention as sa

H, K, R, WINDOW, TOPK = 64, 512, 64, 128, 512          # Flash attention
NI, CI = 64, 128                                       # indexer
MAIN, KEYS = Layout("fp8", K, R), Layout("fp4", CI)    # the paper's cache rows


def timed(f, *args, reps: int = 20) -> float:
  """Median seconds of f(*args) after a warm-up (compile excluded)."""
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def ceilings() -> tuple[float, float]:
  """(bytes/s of a 1 GiB device copy, read + write; bf16 FLOP/s of an 8192^3 matmul)."""
  x = jnp.ones((1 << 28,), jnp.float32)
  copy = jax.jit(lambda a: a + 1.0)
  bw = 2 * x.nbytes / timed(copy, x)
  a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
  mm = jax.jit(lambda p, q: p @ q)
  return bw, 2 * 8192 ** 3 / timed(mm, a, a)


def attention_case(B: int, S: int, L: int, source: str):
  """Inputs of one layer's sparse attention over a context of L tokens: S queries per sequence."""
  ks = jax.random.split(jax.random.key(B * 7 + S + L), 6)
  N = L // (4 if source == "csa" else 128)
  q = jax.random.normal(ks[0], (B, S, H, K), jnp.bfloat16)
  sink = jax.random.normal(ks[1], (H,))
  win = jax.random.normal(ks[2], (B, WINDOW + S, K), jnp.bfloat16)
  widx = jnp.broadcast_to(jnp.arange(WINDOW, dtype=jnp.int32) + jnp.arange(S, dtype=jnp.int32)[:, None] + 1,
                          (B, S, WINDOW))
  words = MAIN.encode(jax.random.normal(ks[3], (1, B, N, K)))
  if source == "csa":
    sel = jax.random.randint(ks[4], (B, S, TOPK), 0, N)
    rows = WINDOW + TOPK
  else:
    sel = jnp.full((B, S), N, jnp.int32)
    rows = WINDOW + N
  win_rows = WINDOW + S - 1 if S > 1 else WINDOW                          # consecutive windows overlap
  nbytes = B * (S * 2 * H * K * 2 + win_rows * K * 2 + S * WINDOW * 4)    # q, o, window rows (bf16), ids
  if source == "csa":
    nbytes += B * S * TOPK * (MAIN.nbytes + 4)                            # each query's own top-k rows
  else:
    nbytes += B * N * MAIN.nbytes                                         # rows shared by the S queries
  flops = B * S * 4 * H * K * rows
  return (q, sink, win, widx, words, sel), nbytes, flops


def attention_fn(impl, source, q_block=None):
  """q_block: None = the kernel's default (decode kernel for S = 1, the blocked prefill kernel otherwise);
  1 = the per-query kernel (to show what the prefill blocking buys)."""
  def f(q, sink, win, widx, words, sel):
    comp = ops.Rows(words, MAIN, jnp.int32(0))
    kw = dict(comp_idx=sel) if source == "csa" else dict(comp_visible=sel)
    if impl == "xla":
      return ops.sparse_attention_ref(q, sink, K ** -0.5, ops.Rows(win), widx, comp, **kw)
    return sa.sparse_attention(q, sink, K ** -0.5, ops.Rows(win), widx, comp, q_block=q_block, **kw)
  return jax.jit(f)


def indexer_case(B: int, S: int, L: int):
  ks = jax.random.split(jax.random.key(B + S + L), 3)
  N = L // 4
  qI = jax.random.normal(ks[0], (B, S, NI, CI), jnp.bfloat16)
  w = jax.random.normal(ks[1], (B, S, NI), jnp.bfloat16)
  words = kv_format.from_rows(KEYS.encode(jax.random.normal(ks[2], (1, B, N, CI))), KEYS,
                              kv_format.key_tiles(KEYS)).words           # as the cache stores them: tiles
  nbytes = B * (N * KEYS.nbytes + S * (NI * CI * 2 + NI * 2 + N * 2))
  return (qI, w, words), nbytes, B * S * 2 * NI * CI * N


def indexer_fn(impl, N: int):
  def f(qI, w, words):
    keys = ops.Rows(words, KEYS, jnp.int32(0), N, planes=kv_format.key_tiles(KEYS))
    return (ops.index_scores_ref if impl == "xla" else ix.index_scores)(qI, w, keys)
  return jax.jit(f)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args(argv)
  platform = jax.default_backend()
  if platform not in ("gpu", "tpu", "cuda", "rocm"):
    print(f"bench/kernels.py: no accelerator here (jax backend {platform!r}); nothing to measure. The kernels' "
          "checks on a CPU are tests/test_pallas.py (interpret mode) and tests/test_pallas_aot.py (Mosaic).")
    return 0
  dev = jax.devices()[0]
  bw, peak = ceilings()
  print(f"device: {dev.device_kind} ({platform}); measured ceilings: copy {bw / 1e12:.2f} TB/s, "
        f"bf16 matmul {peak / 1e12:.0f} TFLOP/s")
  batches, contexts = ((1,), (4096, 131072)) if args.quick else ((1, 32), (4096, 131072, 1 << 20))
  cases = []
  for B in batches:
    for L in contexts:
      cases += [("attention csa decode", B, 1, L), ("attention hca decode", B, 1, L), ("indexer decode", B, 1, L)]
  cases += [("attention csa prefill", 1, 512, 8192), ("attention hca prefill", 1, 512, 131072),
            ("attention csa prefill q1", 1, 512, 8192), ("attention hca prefill q1", 1, 512, 131072),
            ("indexer prefill", 1, 512, 131072)]
  header = (f"{'kernel':24s} {'B':>3s} {'S':>4s} {'context':>8s} | {'pallas ms':>9s} {'GB/s':>7s} {'%bw':>5s} "
            f"{'%flop':>6s} | {'xla ms':>8s} {'%bw':>5s} | {'xla/pallas':>10s}")
  print(header)
  print("-" * len(header))
  for name, B, S, L in cases:
    try:
      if name.startswith("attention"):
        source = name.split()[1]
        inputs, nbytes, flops = attention_case(B, S, L, source)
        fk = attention_fn("pallas", source, 1 if name.endswith(" q1") else None)   # q1: one query per program
        fx = attention_fn("xla", source)
      else:
        inputs, nbytes, flops = indexer_case(B, S, L)
        fk, fx = indexer_fn("pallas", L // 4), indexer_fn("xla", L // 4)
      out_k, out_x = fk(*inputs), fx(*inputs)
      err = float(jnp.max(jnp.abs(out_k.astype(jnp.float32) - out_x.astype(jnp.float32))) /
                  jnp.maximum(jnp.max(jnp.abs(out_x.astype(jnp.float32))), 1e-30))
      tk, tx = timed(fk, *inputs), timed(fx, *inputs)
      print(f"{name:24s} {B:3d} {S:4d} {L:8d} | {tk * 1e3:9.3f} {nbytes / tk / 1e9:7.1f} {100 * nbytes / tk / bw:5.1f} "
            f"{100 * flops / tk / peak:6.2f} | {tx * 1e3:8.3f} {100 * nbytes / tx / bw:5.1f} | {tx / tk:10.2f}"
            f"  (max rel diff {err:.1e})", flush=True)
    except Exception as e:  # noqa: BLE001  (one failing shape must not hide the others' numbers)
      print(f"{name:24s} {B:3d} {S:4d} {L:8d} | FAILED {type(e).__name__}: {' '.join(str(e).split())[:300]}",
            flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
