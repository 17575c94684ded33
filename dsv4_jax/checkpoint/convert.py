"""Convert a released safetensors checkpoint to the Orbax layout of orbax_io, streaming.

    convert(input_dir, output_dir, dtype="keep" | "bf16" | "fp32", overwrite=False)

Tensors are read one at a time (positional reads, no whole-shard map), grouped into units (top, layer N,
mtp J), and each unit is written as soon as its last tensor arrives, then dropped: host memory is about
one layer (two while a layer straddles shards) plus the embedding and head, never the model.

Everything is written under `<output>.partial-<pid>` and moved into place only after the manifest (written
last) is on disk; on any error the partial directory is removed. A killed conversion leaves only a
`.partial-*` directory without a manifest, which `load_params` refuses.
"""
from __future__ import annotations

import dataclasses
import glob
import logging
import os
import shutil
import sys
import time
from typing import Callable

import ml_dtypes
import numpy as np

from dsv4_jax.checkpoint import orbax_io, stream
from dsv4_jax.config import ModelConfig
from dsv4_jax.qarray import QArray

log = logging.getLogger(__name__)

DTYPES = {"keep": None, "bf16": ml_dtypes.bfloat16, "fp32": np.float32}
_SKIP_COPY = (".safetensors", ".safetensors.index.json")


@dataclasses.dataclass
class Summary:
  output: str
  tensors: int
  units: int
  bytes_in: int
  bytes_out: int
  seconds: float
  dtype: str

  def __str__(self):
    gb = 1e9
    return (f"converted {self.tensors} tensors in {self.units} units: {self.bytes_in / gb:.2f} GB in, "
            f"{self.bytes_out / gb:.2f} GB out ({self.dtype}), {self.seconds:.1f} s "
            f"({self.bytes_in / gb / max(self.seconds, 1e-9):.2f} GB/s) -> {self.output}")


class ProgressLine:
  """One stderr line, rewritten in place: tensors done/total, GB done/total, rate and ETA."""

  def __init__(self, stream_=None, every_s: float = 0.5):
    self.out = stream_ or sys.stderr
    self.every_s = every_s
    self.last = 0.0

  def __call__(self, p: stream.Progress, final: bool = False):
    now = time.time()
    if not final and now - self.last < self.every_s:
      return
    self.last = now
    el = max(now - p.start, 1e-9)
    rate = p.bytes_done / el
    eta = (p.bytes_total - p.bytes_done) / rate if rate > 0 else float("inf")
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "--:--:--"
    self.out.write(f"\r[convert] {p.tensors_done}/{p.tensors_total} tensors  {p.bytes_done / 1e9:.2f}/"
                   f"{p.bytes_total / 1e9:.2f} GB  {rate / 1e6:.0f} MB/s  ETA {eta_s}   ")
    if final:
      self.out.write("\n")
    self.out.flush()


def _to_dtype(tree: dict, specs: dict, dtype) -> dict:
  """--dtype=bf16/fp32: QArrays dequantised exactly, dense weights cast; fp32/int kinds untouched."""
  flat_specs = dict(stream.flatten(specs))
  out = {}
  for path, v in stream.flatten(tree):
    if flat_specs[path].kind == "weight":
      v = stream._dense_f32(v) if isinstance(v, QArray) else v
      v = v.astype(dtype)
    out[path] = v
  return stream.unflatten(out)


def _nbytes(tree: dict) -> int:
  return sum(int(v.nbytes) for _, v in stream.flatten(tree))


def _check_output(output: str, overwrite: bool) -> None:
  if os.path.exists(output) and not overwrite:
    what = "a converted checkpoint" if orbax_io.is_converted(output) else "something"
    raise FileExistsError(f"Output {output!r} already exists ({what}); pass --overwrite to replace it.")
  stale = glob.glob(glob.escape(output) + ".partial-*")
  if stale:
    log.warning("Leftovers of interrupted conversions (safe to delete): %s", stale)


def convert(input_dir: str | os.PathLike, output_dir: str | os.PathLike, dtype: str = "keep",
            overwrite: bool = False, cfg: ModelConfig | None = None, progress: Callable | bool = True) -> Summary:
  """Converts the safetensors checkpoint `input_dir` (with its config.json) to `output_dir`."""
  input_dir, output = os.fspath(input_dir), os.path.abspath(os.fspath(output_dir))
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)}.")
  config_dir = input_dir if os.path.isdir(input_dir) else os.path.dirname(input_dir)
  cfg = cfg or ModelConfig.from_hf_config(config_dir)
  _check_output(output, overwrite)
  reader = stream.CheckpointReader(input_dir, cfg)     # opens every header: bad / truncated shards fail here
  specs = stream.unit_specs(cfg)
  line = ProgressLine() if progress is True else (progress or None)
  tmp = f"{output}.partial-{os.getpid()}"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  start = time.time()
  units, bytes_out = {}, 0
  last = [None]

  def on_progress(p):
    last[0] = p
    if line:
      line(p)

  try:
    os.makedirs(os.path.join(tmp, "units"))
    for unit, tree in stream.stream_units(input_dir, cfg, on_progress, reader=reader):
      if DTYPES[dtype] is not None:
        tree = _to_dtype(tree, specs[unit], DTYPES[dtype])
      units[unit] = orbax_io.save_unit(tmp, unit, tree)
      bytes_out += _nbytes(tree)
      del tree
    for name in os.listdir(config_dir):              # config.json, tokenizer and generation files
      src = os.path.join(config_dir, name)
      if os.path.isfile(src) and not name.endswith(_SKIP_COPY):
        shutil.copy2(src, os.path.join(tmp, name))
    summary = Summary(output, reader.n_tensors, len(units), reader.total_bytes, bytes_out, time.time() - start,
                      dtype)
    orbax_io.write_manifest(tmp, {
        "format": orbax_io.FORMAT, "version": orbax_io.VERSION, "dtype": dtype, "config_name": cfg.name,
        "source": os.path.abspath(input_dir), "units": units,
        "stats": {"tensors": summary.tensors, "bytes_in": summary.bytes_in, "bytes_out": summary.bytes_out,
                  "seconds": round(summary.seconds, 3)},
    })
    if os.path.exists(output):                       # --overwrite: swap, then delete the old one
      old = f"{output}.old-{os.getpid()}"
      os.replace(output, old)
      os.replace(tmp, output)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if line and last[0] is not None:
    line(last[0], final=True)
  return summary
