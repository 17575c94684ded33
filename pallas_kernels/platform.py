"""Which Pallas backend a kernel runs on, the one error type for what a kernel does not support, and
keeping a TPU kernel's stores in HBM (`in_hbm`).

`backend_for(None)` follows the default device: TPU -> Mosaic TPU kernels, GPU -> Triton kernels, CPU -> the
TPU kernels in interpret mode (how CPU tests run them). "tpu" / "gpu" force one, so a CPU host can lower and
compile either program (deviceless AOT).
"""
from __future__ import annotations

import jax

BACKENDS = ("tpu", "gpu")


class KernelUnsupported(ValueError):
  """A shape, format or platform outside a kernel's limits (never silently replaced by another path)."""


def check(ok: bool, what: str) -> None:
  if not ok:
    raise KernelUnsupported(what)


def backend_for(backend: str | None) -> str:
  if backend is None:
    platform = jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else "tpu"
  if backend not in BACKENDS:
    raise KernelUnsupported(f"unknown Pallas backend {backend!r}; expected one of {BACKENDS} or None")
  return backend


def interpret_mode(backend: str, interpret: bool | None) -> bool:
  """Interpret unless the default device is the backend's own hardware (or the caller says otherwise)."""
  if interpret is not None:
    return interpret
  platform = jax.default_backend()
  native = {"tpu": ("tpu",), "gpu": ("gpu", "cuda", "rocm")}[backend]
  return platform not in native


def in_hbm(x, interpret: bool):
  """An operand a TPU kernel reads part of (rows it DMAs, or blocks of a store), kept in HBM: unconstrained,
  XLA:TPU may stage one that fits on chip (a small store, a few MB) into VMEM before the call, copying all of
  it for the rows the kernel reads (seen in the v5p decode step at toy width: 4 MB RoPE planes copied whole
  every step). Compiled calls only: interpret mode runs eagerly, where the constraint cannot."""
  if interpret:
    return x
  from jax.experimental.pallas import tpu as pltpu
  return pltpu.with_memory_space_constraint(x, pltpu.HBM)


def next_pow2(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())
