"""launch.aot: deviceless TPU compile of the tiny model's decode step on a v5p:2x2x1 slice with an expert mesh
(the EP MoE must compile to the real ragged-all-to-all) and the memory report; a mesh that does not match the
slice fails with one error line before libtpu loads; with attn_impl=pallas_tpu the Pallas kernels compile (4
chips, each kernel in a shard_map). Needs libtpu under .aot/ (`make setup`). The GPU target (h200:8, gpu:N) needs nothing: both steps compile
on 8 XLA:CPU devices standing in for the GPUs, and the weights per GPU must be the tiny model's per-device share."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBTPU = os.path.join(ROOT, ".aot", "libtpu")


def _run(*args, timeout=240):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"                 # the parent stays on CPU; launch.aot's child loads libtpu
  return subprocess.run([sys.executable, "-m", "launch.aot", "--config=tiny", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _plan(tmp_path, *args) -> tuple[str, dict]:
  """Runs launch.aot with --json; asserts it succeeded; (its report, the JSON plan)."""
  out_json = tmp_path / "plan.json"
  r = _run(*args, f"--json={out_json}")
  print(r.stdout)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return r.stdout, json.loads(out_json.read_text())


def test_bad_mesh_is_one_error_line():
  r = _run("--topology=v5p-8", "--mesh=data:2,expert:4", "--batch=4", "--max_seq_len=2048")
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2, r.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: mesh data:2,expert:4 has 8 devices"), r.stderr
  assert "4 chips" in lines[0] and "TensorCores" in lines[0], lines[0]
  r = _run("--topology=v5p:2x2x1", "--mesh=tensor:4", "--batch=4")               # 4 does not divide o_groups=2
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: mesh axis 'tensor' has size 4"), \
      r.stderr[-2000:]
  assert "compiling" not in r.stdout                                           # refused before any compile


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
def test_aot_compiles_the_pallas_kernels_on_a_multi_chip_mesh():
  """--config.attn_impl=pallas_tpu on 4 chips (data:2,expert:2): the Mosaic kernels compile inside the prefill
  step (each in a shard_map over the batch: XLA cannot partition a custom call) next to the expert exchange's
  real ragged all-to-all."""
  r = _run("--topology=v5p:2x2x1", "--mesh=data:2,expert:2", "--batch=2", "--max_seq_len=1024",
           "--steps=prefill", "--max_batch=off", "--config.attn_impl=pallas_tpu")
  print(r.stdout)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  line = re.search(r"prefill collectives: ragged-all-to-all (\d+).*Pallas kernels (\d+)\)", r.stdout)
  assert int(line.group(1)) > 0 and int(line.group(2)) > 0, r.stdout


def _expected_weights_per_device(layers: int, expert: int) -> int:
  """Bytes one device holds of the tiny model's first `layers` layers, dense in its compute dtype, on a mesh
  whose only weight-sharding axis is `expert` (data replicates weights): from the param shapes alone."""
  import numpy as np
  from dsv4_jax.config import from_config_dict
  from dsv4_jax.params import is_spec
  from dsv4_jax.transformer import param_specs
  from configs import tiny
  import jax
  cfg = from_config_dict(tiny.get_config())
  cfg = dataclasses.replace(cfg, n_layers=layers, compress_ratios=cfg.compress_ratios[:layers]
                            + cfg.compress_ratios[cfg.n_layers:])
  total = 0
  for spec in jax.tree.leaves(param_specs(cfg), is_leaf=is_spec):
    n = math.prod(spec.shape) * np.dtype(spec.dtype(cfg.dtype)).itemsize
    if "experts" in spec.axes:
      assert spec.shape[spec.axes.index("experts")] % expert == 0
      n //= expert
    total += n
  return total


def test_gpu_plan_on_cpu_devices(tmp_path):
  """--topology=h200:8: prefill and decode compile on 8 CPU devices (mesh data:2,expert:4) and the report's
  table has both rows against the H200's usable memory; weights per GPU are the expected share."""
  out, plan = _plan(tmp_path, "--topology=h200:8", "--mesh=data:2,expert:4", "--batch=4", "--max_seq_len=1024",
                    "--layers=4", "--weights=bf16", "--max_batch=off")
  assert "8 x NVIDIA H200 (141 GB = 131.3 GiB each, usable 95% = 124.8 GiB)" in out, out[:600]
  assert "XLA:CPU stand-in" in out and "mesh: data:2,expert:4 over 8 cpu devices" in out
  header = next(line for line in out.splitlines() if line.split()[:2] == ["step", "weights"])
  assert "temporaries<=" in header and "fits" in header, header
  for step in ("prefill", "decode"):
    assert re.search(rf"{step}: compiled in [\d.]+ s", out)
    row = next(line for line in out.splitlines() if line.strip().startswith(step + " ") and "GiB" in line)
    assert row.count("GiB") == 5 and "yes" in row and "of usable" in row, row
  assert "prefill collectives:" in out and "ragged-all-to-all 0" in out        # emulated on XLA:CPU
  assert "verdict: tiny FITS on h200:8" in out
  want = _expected_weights_per_device(layers=4, expert=4)
  assert plan["xla_cpu_stand_in"] and plan["devices"] == 8 and plan["usable_bytes"] == 0.95 * 141e9
  for step in ("prefill", "decode"):
    got = plan["steps"][step]
    assert got["weights"] == want, (step, got["weights"], want)
    assert got["temp"] > 0 and got["total"] == got["weights"] + got["cache"] + got["temp"] + got["other"]


@pytest.mark.skipif(not os.path.isdir(os.path.join(LIBTPU, "libtpu")), reason="no libtpu under .aot/ (make setup)")
def test_aot_plans_a_training_step(tmp_path):
  """--steps=train: one optimizer step of launch.train's defaults (fp32 master weights, Muon / AdamW state, full
  remat) compiles for 4 v5p chips on expert:4 with the real expert exchange. Its weights are the master weights
  plus the optimizer state: the master weights per chip exactly the fp32 parameters' share (experts split 4
  ways), the optimizer state between one and two moments of them, no cache."""
  out, plan = _plan(tmp_path, "--topology=v5p:2x2x1", "--mesh=expert:4", "--batch=4", "--max_seq_len=32",
                    "--layers=3", "--steps=train", "--max_batch=off")
  row = next(line for line in out.splitlines() if line.strip().startswith("train ") and "GiB" in line)
  assert row.count("GiB") == 5 and "yes" in row, row
  assert int(re.search(r"train collectives: ragged-all-to-all (\d+)", out).group(1)) > 0, out
  assert "train: weights = fp32 master weights" in out and "(training: fp32 master weights" in out
  got = plan["steps"]["train"]
  want = _expected_weights_per_device(layers=3, expert=4)           # tiny computes in fp32: its fp32 share
  assert got["params"] == want, (got, want)
  assert want <= got["optimizer"] <= 2 * want and got["weights"] == got["params"] + got["optimizer"], got
  assert got["cache"] == 0 and got["temp"] > 0


def test_gpu_plan_flag_errors():
  """Bad GPU flags: one error line each, before any compile."""
  cases = [(("--topology=h200:8", "--mesh=data:2,expert:2"), "error: mesh data:2,expert:2 has 4 devices but "
            "--topology=h200:8 has 8 GPUs"),
           (("--topology=gpu:8",), "error: --topology=gpu:8: give the memory per GPU with --hbm_gib"),
           (("--topology=h100:1", "--mesh=data:1", "--config.attn_impl=pallas_gpu"),
            "error: attn_impl=pallas_gpu: a GPU plan compiles on XLA:CPU"),
           (("--topology=v5p-8", "--mem_fraction=0.9"), "error: --mem_fraction is for GPU topologies"),
           (("--topology=a100:8",), "error: --topology='a100:8': expected NAME-N")]
  for args, want in cases:
    r = _run(*args, "--batch=4")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(want), (args, r.stderr[-2000:])
    assert "compiling" not in r.stdout, args
