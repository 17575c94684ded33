"""A small, memory-mapped safetensors reader that understands every dtype the released checkpoints use
(F8_E4M3 weights, F8_E8M0 scales, I8-packed FP4), reading one tensor at a time, or one slice of a tensor
(`read_slice`: only the bytes of the slice, so a multi-host load reads only its devices' shards).

Format: 8-byte little-endian header size N, N bytes of JSON {name: {dtype, shape, data_offsets}}, data.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "F8_E8M0": ml_dtypes.float8_e8m0fnu,
}


class SafetensorsFile:
  """Lazily reads tensors of one .safetensors file; raises naming the file on any corruption."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise ValueError(f"{path}: not a safetensors file (only {size} bytes).")
      (n,) = struct.unpack("<Q", head)
      if n > size - 8:
        raise ValueError(f"{path}: header claims {n} bytes but the file has {size}; truncated or not safetensors.")
      try:
        header = json.loads(f.read(n))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: unreadable safetensors header ({e}).") from None
    self.metadata = header.pop("__metadata__", {}) or {}
    self._data_start = 8 + n
    self._entries = header
    self._mm = None
    data_size = size - self._data_start
    for name, e in header.items():
      if e.get("dtype") not in DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}.")
      begin, end = e["data_offsets"]
      expected = int(np.prod(e["shape"], dtype=np.int64)) * np.dtype(DTYPES[e["dtype"]]).itemsize
      if end - begin != expected:
        raise ValueError(f"{path}: tensor {name!r} holds {end - begin} bytes, expected {expected} for "
                         f"{e['dtype']}{e['shape']}.")
      if end > data_size:
        raise ValueError(f"{path}: tensor {name!r} ends at byte {end} of the data but the file's data has only "
                         f"{data_size} bytes: the shard is truncated.")

  def keys(self) -> list[str]:
    return list(self._entries)

  def info(self, name: str) -> tuple[str, tuple[int, ...]]:
    e = self._entries[name]
    return e["dtype"], tuple(e["shape"])

  def nbytes(self, name: str) -> int:
    b, e = self._entries[name]["data_offsets"]
    return e - b

  def get(self, name: str) -> np.ndarray:
    """The tensor as a read-only numpy view of the memory map (no copy)."""
    if self._mm is None:
      self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
    e = self._entries[name]
    b, end = e["data_offsets"]
    raw = self._mm[self._data_start + b: self._data_start + end]
    return raw.view(DTYPES[e["dtype"]]).reshape(e["shape"])

  def read(self, name: str) -> np.ndarray:
    """The tensor copied into a fresh array (positional read, no memory map): memory stays one tensor,
    not the touched part of the shard."""
    e = self._entries[name]
    b, end = e["data_offsets"]
    buf = np.empty(end - b, np.uint8)
    with open(self.path, "rb", buffering=0) as f:
      n = self._pread(f, self._data_start + b, memoryview(buf))
    if n != end - b:
      raise ValueError(f"{self.path}: tensor {name!r} needs {end - b} bytes but only {n} could be read: the "
                       "shard is truncated.")
    return buf.view(DTYPES[e["dtype"]]).reshape(e["shape"])

  def read_slice(self, name: str, index: tuple) -> np.ndarray:
    """`tensor[index]` copied into a fresh array, reading only its bytes: `index` is one slice (step 1, ends
    may be None) per dimension, as `jax.sharding.Sharding.devices_indices_map` gives them. One positional read
    per contiguous run: the dimensions after the last one the slice cuts are whole, so e.g. a block of rows is
    one read and a block of columns one read per row. An index that cuts nothing is `read`."""
    e = self._entries[name]
    shape, dtype = tuple(e["shape"]), np.dtype(DTYPES[e["dtype"]])
    if len(index) != len(shape):
      raise ValueError(f"{self.path}: tensor {name!r} has {len(shape)} dimensions, the slice {index} "
                       f"{len(index)}.")
    bounds = []
    for s, n in zip(index, shape):
      start, stop, step = s.indices(n)
      if step != 1:
        raise ValueError(f"{self.path}: tensor {name!r}: only slices of step 1 are read, not {s}.")
      bounds.append((start, max(start, stop)))
    out_shape = tuple(b - a for a, b in bounds)
    cut = [d for d, (a, b) in enumerate(bounds) if (a, b) != (0, shape[d])]
    if not cut:
      return self.read(name)
    buf = np.empty(math.prod(out_shape) * dtype.itemsize, np.uint8)
    if buf.size:
      k = cut[-1]
      strides = [math.prod(shape[d + 1:]) * dtype.itemsize for d in range(len(shape))]
      run = out_shape[k] * strides[k]
      first = self._data_start + e["data_offsets"][0] + bounds[k][0] * strides[k]
      view, pos = memoryview(buf), 0
      with open(self.path, "rb", buffering=0) as f:
        for outer in itertools.product(*(range(a, b) for a, b in bounds[:k])):
          offset = first + sum(i * st for i, st in zip(outer, strides))
          n = self._pread(f, offset, view[pos: pos + run])
          if n != run:
            raise ValueError(f"{self.path}: tensor {name!r} needs {run} bytes at offset {offset} but only "
                             f"{n} could be read: the shard is truncated.")
          pos += run
    return buf.view(dtype).reshape(out_shape)

  def _pread(self, f, offset: int, view: memoryview) -> int:
    """Reads into `view` from byte `offset` of the open file `f`; the bytes read (fewer at the end of the
    file). Every read of tensor data goes through here (tests count the byte ranges)."""
    f.seek(offset)
    done = 0
    while done < len(view):
      n = f.readinto(view[done:])
      if not n:
        break
      done += n
    return done

  def close(self):
    self._mm = None


def checkpoint_files(directory: str) -> list[str]:
  """The safetensors shards of a checkpoint directory, checked against its index file if present."""
  if os.path.isfile(directory) and directory.endswith(".safetensors"):
    return [directory]
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"Checkpoint directory {directory!r} does not exist.")
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map", {})
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
    if missing:
      raise FileNotFoundError(f"{index} lists shard(s) {missing[:3]} that are not in {directory!r}.")
    return [os.path.join(directory, f) for f in files]
  files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"No *.safetensors files in {directory!r}.")
  return [os.path.join(directory, f) for f in files]
