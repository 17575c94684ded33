"""Compile the TPU kernels with the real Mosaic compiler on a machine without a TPU (deviceless AOT).

    python -m pallas_kernels.aot                        # every case, on v5e, v6e, v5p and tpu7x
    python -m pallas_kernels.aot v6e:2x2 --only=decode  # cases whose name contains "decode"

Each kernel module lists `AOT_CASES`: (name, fn, argument ShapeDtypeStructs) at Flash's and Pro's real
shapes. The compile runs in a subprocess that sees libtpu (`make setup` installs it under .aot/libtpu, kept
off the normal import path, since an importable libtpu makes every CPU run try to start a TPU backend) with
compile-only devices from `jax.experimental.topologies`. It catches what interpret mode cannot: the (8, 128)
tiling rule, VMEM/SMEM capacity, unsupported ops and alignment (../shared/docs/pallas.md §1.5). It proves a
kernel compiles, not that it is correct (the interpret tests) or fast (bench/kernels.py on hardware).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBTPU = os.path.join(ROOT, ".aot", "libtpu")
TOPOLOGIES = ("v5e:2x2", "v6e:2x2", "v5p:2x2x1", "tpu7x:2x2x1")
MODULES = ("sparse_attention", "indexer", "compressor", "encode")


def cases(only: str = ""):
  """[(kernel/name, fn, args)] of every kernel module, those whose name contains `only`."""
  import importlib
  out = []
  for mod in MODULES:
    for name, fn, args in importlib.import_module(f"pallas_kernels.{mod}").AOT_CASES:
      if only in f"{mod}/{name}":
        out.append((f"{mod}/{name}", fn, args))
  return out


def compile_here(topology: str, only: str = "") -> list[str]:
  """In a process that imports libtpu: compile each case for `topology`; one "topology case OK|FAIL" line
  each, printed as it finishes."""
  import jax
  from jax.experimental import topologies
  dev = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
  sharding = jax.sharding.SingleDeviceSharding(dev)
  lines = []
  for name, fn, args in cases(only):
    t0 = time.time()
    try:
      structs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
      compiled = jax.jit(fn).trace(*structs).lower().compile()
      cost = compiled.cost_analysis()
      cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
      line = (f"{topology} {name} OK {time.time() - t0:.1f}s, {cost.get('bytes accessed', 0) / 1e6:.2f} MB accessed, "
              f"{cost.get('flops', 0) / 1e9:.3f} GFLOP")
    except Exception as e:  # noqa: BLE001  (a compile error is the result being reported)
      msg = " ".join(str(e).split())
      line = f"{topology} {name} FAIL {type(e).__name__}: {msg[:600]}"
    print(line, flush=True)
    lines.append(line)
  return lines


def libtpu_env(extra_path=(), libtpu: str = LIBTPU) -> dict:
  """This process's environment for a child that compiles for TPU with no chips: libtpu (`make setup`) first on
  PYTHONPATH, then the repo root and `extra_path`; the TPU_* variables that let libtpu start compile-only;
  JAX_PLATFORMS dropped. FileNotFoundError when libtpu is not installed. (Also launch/aot.py and
  bench/decode_memory.py.)"""
  if not os.path.isdir(os.path.join(libtpu, "libtpu")):
    raise FileNotFoundError(f"no libtpu under {libtpu}: run `make setup` (pip install --target {libtpu} "
                            f"'libtpu==0.0.42.*')")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env.update(PYTHONPATH=os.pathsep.join([libtpu, ROOT, *extra_path]), TPU_SKIP_MDS_QUERY="1",
             TPU_WORKER_HOSTNAMES="localhost", TPU_ACCELERATOR_TYPE="v6e-4",
             ALLOW_MULTIPLE_LIBTPU_LOAD="1")   # compile-only: no chips to share, so no lockfile
  return env


def check(topology: str, only: str = "", timeout: float = 900, libtpu: str = LIBTPU) -> list[str]:
  """Runs `compile_here` in a subprocess that sees libtpu; returns its lines (a FAIL line if it died)."""
  env = libtpu_env(libtpu=libtpu)
  code = "import sys; from pallas_kernels.aot import compile_here; compile_here(sys.argv[1], sys.argv[2])"
  try:
    r = subprocess.run([sys.executable, "-c", code, topology, only], env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
  except subprocess.TimeoutExpired:
    return [f"{topology} FAIL timeout after {timeout:.0f}s"]
  lines = [ln for ln in r.stdout.splitlines() if ln.startswith(topology + " ")]
  if r.returncode != 0 or not lines:
    lines.append(f"{topology} FAIL rc={r.returncode}: {r.stderr.strip()[-800:]}")
  return lines


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("topologies", nargs="*", default=list(TOPOLOGIES))
  ap.add_argument("--only", default="", help="compile the cases whose kernel/name contains this")
  args = ap.parse_args(argv)
  failed = 0
  for topo in args.topologies:
    for line in check(topo, args.only):
      print(line, flush=True)
      failed += " FAIL " in line
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
