"""launch.aot: deviceless TPU compile of the tiny model's decode step on a v5p:2x2x1 slice with an expert mesh
(the EP MoE must compile to the real ragged-all-to-all) and the memory report; a mesh that does not match the
slice fails with one error line before libtpu loads; with attn_impl=pallas_tpu the Pallas kernels compile (one
chip). Needs libtpu under .aot/ (`make setup`)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBTPU = os.path.join(ROOT, ".aot", "libtpu")


def _run(*args, timeout=240):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"                 # the parent stays on CPU; launch.aot's child loads libtpu
  return subprocess.run([sys.executable, "-m", "launch.aot", "--config=tiny", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_bad_mesh_is_one_error_line():
  t0 = time.time()
  r = _run("--topology=v5p-8", "--mesh=data:2,expert:4", "--batch=4", "--max_seq_len=2048")
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2, r.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: mesh data:2,expert:4 has 8 devices"), r.stderr
  assert "4 chips" in lines[0] and "TensorCores" in lines[0], lines[0]
  r = _run("--topology=v5p:2x2x1", "--mesh=tensor:4", "--batch=4")               # 4 does not divide o_groups=2
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: mesh axis 'tensor' has size 4"), \
      r.stderr[-2000:]
  assert time.time() - t0 < 60                                                 # no compile, no libtpu


@pytest.mark.skipif(not os.path.isdir(os.path.join(LIBTPU, "libtpu")), reason="no libtpu under .aot/ (make setup)")
def test_aot_report_compiles_the_real_ragged_all_to_all(tmp_path):
  r = _run("--topology=v5p:2x2x1", "--mesh=expert:4", "--batch=4", "--max_seq_len=2048", "--steps=decode",
           "--max_batch=off", f"--hlo_dir={tmp_path}")
  out = r.stdout
  print(out)
  assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
  assert "compiling decode for v5p:2x2x1" in out and re.search(r"decode: compiled in [\d.]+ s", out)
  header = next(line for line in out.splitlines() if line.split()[:2] == ["step", "weights"])
  assert all(w in header for w in ("cache", "total", "fits")), header
  row = next(line for line in out.splitlines() if line.strip().startswith("decode ") and "GiB" in line)
  assert row.count("GiB") == 5 and "yes" in row, row
  assert "fp4 routed experts" in out and "4 chips" in out and "95 GiB" in out
  n = int(re.search(r"decode collectives: ragged-all-to-all (\d+)", out).group(1))
  assert n > 0, out
  hlo = (tmp_path / "decode.hlo.txt").read_text()
  assert "ragged-all-to-all" in hlo
  assert "verdict: tiny FITS" in out


@pytest.mark.skipif(not os.path.isdir(os.path.join(LIBTPU, "libtpu")), reason="no libtpu under .aot/ (make setup)")
def test_aot_compiles_the_pallas_kernels_on_one_chip():
  """--config.attn_impl=pallas_tpu: the Mosaic kernels compile inside the decode step. On one chip: the kernels
  are not inside a shard_map yet, so launch.aot refuses them on a multi-chip mesh with a clear error."""
  r = _run("--topology=v5e:1x1", "--mesh=data:1", "--batch=2", "--max_seq_len=1024", "--steps=decode",
           "--max_batch=off", "--config.attn_impl=pallas_tpu")
  print(r.stdout)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  n = int(re.search(r"decode collectives: .*Pallas kernels (\d+)\)", r.stdout).group(1))
  assert n > 0, r.stdout
