"""What a kernel costs, declared to XLA (`pl.CostEstimate`).

XLA cannot look inside a Pallas kernel. Without an estimate XLA:TPU's cost model counts a kernel as free:
a lone `pallas_call` compiled deviceless for v5p has an empty `cost_analysis()`, and with an estimate it
reports the estimate unchanged. The latency-hiding scheduler then has nothing to overlap against the kernel,
and a step's `cost_analysis()` leaves the kernel's traffic out (bench/decode_memory.py --attn_impl=pallas_tpu).

Each kernel states its bytes from its own grid and DMA plan, as moved between HBM and on-chip memory:
- blocked operands and results: every block moved once (`nbytes` of the arrays: the grids here fetch a
  block once, except the indexer's keys, fetched again for every block of queries, and the Triton
  programs, each of which loads its own blocks: those are counted per fetch);
- rows a kernel DMAs or loads itself: at the most its loops fetch (`ragged` loops stop at a live count
  known only at run time; a decode step's pools are sized to the live bucket, so the bound is the bucket).
Flops count the matmuls (2 per multiply-add); transcendentals the exponentials.
"""
from __future__ import annotations

import jax
from jax.experimental import pallas as pl


def nbytes(*arrays) -> int:
  """Bytes of arrays (or ShapeDtypeStructs): what moving each once costs."""
  return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(arrays))


def estimate(*, flops: float, read: float, written: float, transcendentals: float = 0) -> pl.CostEstimate:
  """The CostEstimate of a kernel that reads `read` and writes `written` bytes of HBM."""
  return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals), bytes_accessed=int(read + written))
