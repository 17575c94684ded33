"""Runs a notebook top to bottom, as CI does (`make notebook`): exit status 1 on the first cell that fails.

    .venv/bin/python notebooks/execute.py notebooks/quickstart.ipynb [--output=build/notebooks/quickstart.ipynb]

The kernel is the Python running this script (a kernel spec written to a temporary directory points at
sys.executable, so a `python3` kernel registered elsewhere on the machine is never picked up). The kernel's
working directory is a fresh temporary directory, so nothing the notebook writes lands in the repository.
The executed copy (with outputs) goes to --output (default build/notebooks/, which git ignores); the
notebook itself is not modified. Prints each cell's wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = "dsv4-notebook-python"


def kernel_spec_dir() -> str:
  """A JUPYTER_PATH entry holding one kernel spec that runs ipykernel under this interpreter."""
  root = tempfile.mkdtemp(prefix="dsv4_kernels_")
  spec = os.path.join(root, "kernels", KERNEL)
  os.makedirs(spec)
  with open(os.path.join(spec, "kernel.json"), "w") as f:
    json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
               "display_name": f"Python ({sys.executable})", "language": "python"}, f)
  return root


def _seconds(cell) -> float | None:
  ex = cell.get("metadata", {}).get("execution", {})
  try:
    start, end = ex["iopub.execute_input"], ex["shell.execute_reply"]
  except KeyError:
    return None
  parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))
  return (parse(end) - parse(start)).total_seconds()


def _title(nb, index: int) -> str:
  """The nearest markdown heading above a cell (its section)."""
  for cell in reversed(nb.cells[:index]):
    if cell.cell_type == "markdown":
      for line in cell.source.splitlines():
        if line.startswith("#"):
          return line.lstrip("#").strip()
  return "(top)"


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("notebook")
  ap.add_argument("--output", default=None, help="executed copy (default build/notebooks/<name>)")
  ap.add_argument("--timeout", type=int, default=600, help="seconds per cell")
  args = ap.parse_args()
  output = args.output or os.path.join(ROOT, "build", "notebooks", os.path.basename(args.notebook))

  os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [kernel_spec_dir(), os.environ.get("JUPYTER_PATH")]))
  nb = nbformat.read(args.notebook, as_version=4)
  workdir = tempfile.mkdtemp(prefix="dsv4_notebook_run_")
  client = NotebookClient(nb, kernel_name=KERNEL, timeout=args.timeout, record_timing=True,
                          resources={"metadata": {"path": workdir}})
  t0 = time.perf_counter()
  failed = None
  try:
    client.execute()
  except CellExecutionError as e:
    failed = e
  total = time.perf_counter() - t0

  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  nbformat.write(nb, output)
  sections: dict[str, float] = {}
  for i, cell in enumerate(nb.cells):
    if cell.cell_type != "code":
      continue
    s = _seconds(cell)
    if s is not None:
      sections[_title(nb, i)] = sections.get(_title(nb, i), 0.0) + s
      print(f"cell {i:>2} {s:7.1f} s  {cell.source.splitlines()[0][:70] if cell.source else ''}")
  for title, s in sections.items():
    print(f"{s:7.1f} s  {title}")
  print(f"{args.notebook}: {total:.0f} s in all (kernel start included); executed copy: {output}")
  if failed is not None:
    print(f"FAILED: {failed}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
