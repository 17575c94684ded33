"""A safetensors checkpoint read as a stream of complete *units*, tensor by tensor, shard by shard.

A unit is the part of the parameter tree that one group of tensor names fills: "top" (embed, head,
norm, hc_head), "layer.N" (one block, unstacked) and "mtp.J". Released shards are ordered by layer, so
a unit completes soon after its first tensor is read and memory stays about one layer (plus the
embedding and head, which complete last), never the model. `stream_units` validates every tensor
against the config's parameter specs and raises naming the tensor, what was expected and what was found.

Weights stored with a block scale stay quantised as host `QArray`s (numpy values + e8m0 bytes,
docs/architecture.md §5.2) except `wo_a`, which the reference runs dequantised (§2.0); `tid2eid`
becomes int32; norms, mHC, sinks, biases and ape become fp32; other weights keep their stored dtype.

`stream_units(..., by_slice=True)` (a multi-host load, weights.py) reads nothing: every tensor comes as
`Slices`, its shape and dtype and a reader of any slice of it (only that slice's bytes; a QArray's values and
scales each), so each process reads only the slices its devices hold. A routed-expert leaf is the stack of its
experts' `Slices` (`stack_slices`): a slice of it reads that slice of each expert in its range.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Callable, Container, Iterator

import ml_dtypes
import numpy as np

from dsv4_jax import block, qarray, transformer
from dsv4_jax.checkpoint import formats, names, safetensors_io
from dsv4_jax.config import ModelConfig
from dsv4_jax.params import ParamSpec
from dsv4_jax.qarray import QArray

log = logging.getLogger(__name__)

TOP = "top"


def layer_unit(n: int) -> str:
  return f"layer.{n}"


def mtp_unit(j: int) -> str:
  return f"mtp.{j}"


def parse_unit(unit: str) -> tuple[str, int | None]:
  """"top" -> ("top", None); "layer.7" -> ("layer", 7); "mtp.0" -> ("mtp", 0)."""
  if unit == TOP:
    return TOP, None
  kind, n = unit.split(".")
  return kind, int(n)


def unit_specs(cfg: ModelConfig) -> dict[str, dict]:
  """unit name -> its (unstacked) ParamSpec tree, in checkpoint order."""
  specs = transformer.param_specs(cfg)
  out = {TOP: {k: v for k, v in specs.items() if k not in ("layers", "mtp")}}
  for n in range(cfg.n_layers):
    out[layer_unit(n)] = block.block_specs(cfg, *transformer.layer_kind(cfg, n))
  for j, s in enumerate(specs["mtp"]):
    out[mtp_unit(j)] = s
  return out


def flatten(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
  """Nested dicts -> (key path, leaf); QArrays and ParamSpecs are leaves."""
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def unflatten(flat: dict[tuple, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    d = out
    for k in path[:-1]:
      d = d.setdefault(k, {})
    d[path[-1]] = v
  return out


def is_expert_leaf(path: tuple) -> bool:
  """Routed-expert weights [E, ...]: one tensor per expert in the checkpoint."""
  return len(path) >= 2 and path[-2] == "experts"


def official_name(unit: str, path: tuple, expert: int | None = None) -> str:
  """Inverse of names.official_path: the official tensor name of a leaf (expert `expert` for [E, ...])."""
  kind, n = parse_unit(unit)
  prefix = "" if kind == TOP else f"layers.{n}." if kind == "layer" else f"mtp.{n}."
  if path[0] in ("hc_attn", "hc_ffn", "hc_head"):
    return f"{prefix}{path[0]}_{path[1]}"
  if is_expert_leaf(path):
    e = "E" if expert is None else expert
    return f"{prefix}{'.'.join(path[:-1])}.{e}.{path[-1]}.weight"
  if path[-1] in ("attn_sink", "ape", "bias", "tid2eid") or path[-2:] == ("gate", "weight"):
    return prefix + ".".join(path)
  return prefix + ".".join(path) + ".weight"


class Slices:
  """A tensor not read yet: `shape`, `dtype` and `read(index)`, the numpy array `tensor[index]` for one
  slice (step 1) per dimension, reading only what that slice needs. What `CheckpointReader.tensors(
  by_slice=True)` gives for a dense tensor; `astype` / `view` map each slice as they would the whole tensor
  (elementwise: a slice of the result is the result of the slice, bit for bit)."""

  def __init__(self, shape: tuple, dtype, read: Callable[[tuple], np.ndarray]):
    self.shape, self.dtype, self._read = tuple(int(n) for n in shape), np.dtype(dtype), read

  @classmethod
  def of_file(cls, st: safetensors_io.SafetensorsFile, name: str) -> "Slices":
    dtype, shape = st.info(name)
    return cls(shape, safetensors_io.DTYPES[dtype], lambda index: st.read_slice(name, index))

  @classmethod
  def of_array(cls, a: np.ndarray) -> "Slices":
    """Slices of an array already in memory (a float scale tensor, read whole to check it)."""
    return cls(a.shape, a.dtype, lambda index: np.array(a[tuple(index)]))

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize

  def read(self, index: tuple | None = None) -> np.ndarray:
    """`tensor[index]` (None: the whole tensor)."""
    return self._read(tuple(slice(None) for _ in self.shape) if index is None else tuple(index))

  def map(self, fn: Callable[[np.ndarray], np.ndarray], dtype) -> "Slices":
    """Slices of `fn(tensor)` for an elementwise `fn` giving `dtype`."""
    return Slices(self.shape, dtype, lambda index: fn(self._read(index)))

  def astype(self, dtype) -> "Slices":
    return self if np.dtype(dtype) == self.dtype else self.map(lambda a: a.astype(dtype), dtype)

  def view(self, dtype) -> "Slices":
    """Same-size reinterpretation (e8m0 scales as uint8 bytes, int8-packed fp4 as uint8)."""
    assert np.dtype(dtype).itemsize == self.dtype.itemsize, (dtype, self.dtype)
    return self.map(lambda a: a.view(dtype), dtype)

  def part(self, index: tuple) -> "Slices":
    """Slices of `tensor[index]` (integers, which drop their dimension, and step-1 slices), not read: one
    expert's rows of HF's stacked expert tensors."""
    index = tuple(index) + (slice(None),) * (self.ndim - len(index))
    kept = [(i, s.indices(n)[:2]) for i, (s, n) in enumerate(zip(index, self.shape)) if isinstance(s, slice)]

    def read(sub):
      full = [slice(i, i + 1) if isinstance(i, int) else i for i in index]
      for (i, (a, b)), s in zip(kept, sub):
        s0, s1 = s.indices(b - a)[:2]
        full[i] = slice(a + s0, a + s1)
      out = self._read(tuple(full))
      return out.reshape([d for i, d in enumerate(out.shape) if not isinstance(index[i], int)])

    return Slices(tuple(b - a for _, (a, b) in kept), self.dtype, read)


def stack_slices(parts: dict[int, Slices], n: int) -> Slices:
  """[n, *shape] whose row e is `parts[e]` (all of one shape and dtype), not read: a slice reads that slice of
  each expert in its range, and gives zeros for an expert not in `parts` (one this process does not read)."""
  first = next(iter(parts.values()))
  shape, dtype = first.shape, first.dtype

  def read(index):
    (e0, e1), rest = index[0].indices(n)[:2], tuple(index[1:])
    out = np.zeros((e1 - e0,) + tuple(b - a for a, b in _bounds(rest, shape)), dtype)
    for e in range(e0, e1):
      if e in parts:
        out[e - e0] = parts[e].read(rest)
    return out

  return Slices((n,) + shape, dtype, read)


def _bounds(index: tuple, shape: tuple) -> list[tuple[int, int]]:
  return [s.indices(n)[:2] for s, n in zip(index, shape)]


def _dequantized_slices(w: Slices, scale: Slices, fmt: str, block: tuple[int, int], logical: tuple) -> Slices:
  """The exact fp32 dequantisation of a quantised weight (values `w` as stored, `scale` as e8m0 bytes or
  float scales), by slice: a slice of the logical weight reads the values and the scale blocks that cover it
  (a slice boundary inside a quant block, or between the two fp4 values of a byte, reads the covering block
  or byte) and trims to the slice. Bit for bit `_dense_f32` / `formats.dequantize` of the whole tensor,
  sliced (each element is its value times its block's scale)."""
  pack = 2 if fmt == "fp4" else 1
  b0, b1 = block

  def read(index):
    *lead, (r0, r1), (c0, c1) = _bounds(index, logical)
    lead = tuple(slice(a, b) for a, b in lead)
    p0 = c0 // pack
    v = w.read(lead + (slice(r0, r1), slice(p0, -(-c1 // pack))))
    v = formats.unpack_fp4(v) if fmt == "fp4" else v.astype(np.float32)
    v = v[..., c0 - pack * p0: c0 - pack * p0 + (c1 - c0)]
    s = scale.read(lead + (slice(r0 // b0, -(-r1 // b0)), slice(c0 // b1, -(-c1 // b1))))
    s = np.repeat(np.repeat(formats.scale_to_f32(s), b0, -2), b1, -1)
    dr, dc = r0 % b0, c0 % b1                  # where the slice starts inside its first block
    return v * s[..., dr: dr + (r1 - r0), dc: dc + (c1 - c0)]

  return Slices(logical, np.float32, read)


# ---- one tensor: decode, validate ------------------------------------------------------------------

_DEQUANTISED = ("attn.wo_a.weight",)      # quantised in the hub files, run dense by the reference


def _dense_f32(q: QArray) -> np.ndarray:
  """Host QArray [..., O, I] -> fp32, exact (leading stacked / expert axes allowed)."""
  v = formats.unpack_fp4(q.values) if q.fmt == "fp4" else q.values.astype(np.float32)
  s = np.repeat(np.repeat(formats.scale_to_f32(q.scales), q.block[0], -2), q.block[1], -1)
  return v * s[..., : v.shape[-2], : v.shape[-1]]


def dequantize_host(q: QArray) -> np.ndarray:
  """Exact host dequantisation: bf16 when the values fit (always, for e8m0-scaled e4m3 / e2m1), else fp32."""
  f = _dense_f32(q)
  b = f.astype(ml_dtypes.bfloat16)
  return b if np.array_equal(b.astype(np.float32), f) else f


def _quant_form(name: str, w, scale, source: str) -> tuple[str, tuple[int, int], tuple[int, ...]]:
  """(fmt, block, logical shape) of a weight with a block-scale tensor (arrays or `Slices`: only shapes and
  dtypes are looked at); raises naming the tensor when the pair is not a released format."""
  if w.dtype == ml_dtypes.float8_e4m3fn:
    fmt, block, logical = "fp8", qarray.FP8_BLOCK, tuple(w.shape)
  elif w.dtype in (np.int8, np.uint8):
    fmt, block, logical = "fp4", qarray.FP4_BLOCK, tuple(w.shape[:-1]) + (2 * w.shape[-1],)
  else:
    raise ValueError(f"{source}: tensor {name!r} has dtype {w.dtype} and a scale tensor; expected float8_e4m3fn "
                     "(fp8, 128x128 scales) or int8 (packed fp4, 1x32 scales).")
  want = qarray.scale_shape(logical, block)
  if tuple(scale.shape) != want:
    raise ValueError(f"{source}: the scale of {fmt} tensor {name!r} (logical shape {logical}) has shape "
                     f"{tuple(scale.shape)}, expected {want}.")
  if scale.dtype not in (ml_dtypes.float8_e8m0fnu, np.uint8, np.float32, ml_dtypes.bfloat16, np.float16):
    raise ValueError(f"{source}: the scale of tensor {name!r} has dtype {scale.dtype}, expected float8_e8m0fnu.")
  return fmt, block, logical


def _quantised(name: str, w: np.ndarray, scale: np.ndarray, source: str) -> QArray | np.ndarray:
  """A weight with a block-scale tensor -> QArray (or exact dense array for non-power-of-two scales)."""
  fmt, block, _ = _quant_form(name, w, scale, source)
  sbytes = qarray.np_e8m0_bytes(scale)
  if sbytes is None:                           # float scales that are not powers of two: keep exact, dense
    return formats.dequantize(w, scale)
  return QArray(w.view(np.uint8) if fmt == "fp4" else w, np.ascontiguousarray(sbytes), block, fmt)


def _quantised_slices(name: str, w: Slices, scale: Slices, source: str, dequantize: bool) -> QArray | Slices:
  """`_quantised` (and `dequantize_host` when `dequantize`) by slice: a QArray of the values' and the scales'
  `Slices` (each array of a QArray has its own sharding, so each is read by its own slices), or the exact fp32
  dequantisation by slice. e8m0 / uint8 scales are read by slice too; float scales (HF's weight_scale_inv,
  1/16384 of an fp8 weight's bytes) are read whole, since whether all of them are powers of two decides the
  form of the whole tensor."""
  fmt, block, logical = _quant_form(name, w, scale, source)
  if scale.dtype in (ml_dtypes.float8_e8m0fnu, np.uint8):
    sbytes = scale.view(np.uint8)
  else:
    whole = scale.read()
    sbytes = qarray.np_e8m0_bytes(whole)
    if sbytes is None:                         # not powers of two: exact, dense, with the float scales
      return _dequantized_slices(w, Slices.of_array(whole), fmt, block, logical)
    sbytes = Slices.of_array(sbytes)
  if dequantize:
    return _dequantized_slices(w, sbytes, fmt, block, logical)
  return QArray(w.view(np.uint8) if fmt == "fp4" else w, sbytes, block, fmt)


def _check(official: str, value, spec: ParamSpec, index: tuple, source: str, cfg: ModelConfig):
  want = spec.shape[len(index):]
  if tuple(value.shape) != want:
    raise ValueError(f"{source}: tensor {official!r} has shape {tuple(value.shape)}, expected {want} for config "
                     f"{cfg.name!r}.")
  if isinstance(value, QArray):
    if spec.kind != "weight":
      raise ValueError(f"{source}: tensor {official!r} is {value.fmt}-quantised, expected a dense "
                       f"{'int32 table' if spec.kind == 'int' else 'float'}.")
    return
  dt = value.dtype
  if dt in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2):
    raise ValueError(f"{source}: tensor {official!r} has dtype {dt} but no scale tensor beside it; expected "
                     f"its '.scale' (e8m0) or a dense float tensor.")
  if spec.kind == "int":
    if not np.issubdtype(dt, np.integer):
      raise ValueError(f"{source}: tensor {official!r} has dtype {dt}, expected an integer table (int64).")
  elif not (np.issubdtype(dt, np.floating) or dt == ml_dtypes.bfloat16):
    raise ValueError(f"{source}: tensor {official!r} has dtype {dt}, expected a float tensor "
                     f"({'fp32' if spec.kind == 'f32' else 'bf16, or fp8/fp4 with a scale tensor'}).")


def _store_dtype(value, spec: ParamSpec):
  """Host value in its stored form: int tables int32, fp32 kinds fp32, weights as stored."""
  if isinstance(value, QArray):
    return value
  if spec.kind == "int":
    return value.astype(np.int32)
  if spec.kind == "f32":
    return value.astype(np.float32)
  return value if value.dtype in (ml_dtypes.bfloat16, np.float32) else value.astype(np.float32)


# ---- a unit being filled ---------------------------------------------------------------------------

class _UnitBuffer:
  """Host buffers of one unit; routed-expert leaves are filled one expert at a time."""

  def __init__(self, unit: str, specs: dict, n_experts: int):
    self.unit = unit
    self.specs = dict(flatten(specs))
    self.need = {p: (n_experts if is_expert_leaf(p) else 1) for p in self.specs}
    self.done: dict[tuple, np.ndarray] = {p: np.zeros(n, bool) for p, n in self.need.items()}
    self.values: dict[tuple, Any] = {}
    self.expert_slices: dict[tuple, dict[int, Any]] = {}  # by_slice: leaf -> {expert: Slices or QArray of them}
    self.nbytes = 0

  def put(self, path: tuple, expert: int | None, value, official: str, source: str):
    i = 0 if expert is None else expert
    if self.done[path][i]:
      raise ValueError(f"{source}: tensor {official!r} is given twice.")
    if expert is None:
      self.values[path] = value
    elif _unread(value):
      parts = self.expert_slices.setdefault(path, {})
      if parts:
        _check_same_form(self.unit, path, parts, value, official, source)
      parts[expert] = value
    else:
      buf = self.values.get(path)
      if buf is None:
        E = self.need[path]
        if isinstance(value, QArray):      # zeros: experts this process skips (`skip`) stay zero
          buf = QArray(np.zeros((E,) + value.values.shape, value.values.dtype),
                       np.zeros((E,) + value.scales.shape, np.uint8), value.block, value.fmt)
        else:
          buf = np.zeros((E,) + value.shape, value.dtype)
        self.values[path] = buf
      _check_same_form(self.unit, path, {int(np.argmax(self.done[path])): _row(buf)}, value, official, source)
      if isinstance(buf, QArray):
        buf.values[expert], buf.scales[expert] = value.values, value.scales
      else:
        buf[expert] = value
    self.done[path][i] = True
    self.nbytes += value.nbytes

  def skip(self, path: tuple, expert: int, official: str, source: str):
    """An expert this process does not read (its devices hold none of its shards): left zero."""
    if self.done[path][expert]:
      raise ValueError(f"{source}: tensor {official!r} is given twice.")
    self.done[path][expert] = True

  def complete(self) -> bool:
    return all(d.all() for d in self.done.values())

  def missing(self) -> list[str]:
    out = []
    for p, d in self.done.items():
      if is_expert_leaf(p):
        out += [official_name(self.unit, p, e) for e in np.flatnonzero(~d)]
      elif not d[0]:
        out.append(official_name(self.unit, p))
    return out

  def tree(self) -> dict:
    for p, parts in self.expert_slices.items():
      n = self.need[p]
      q = next(iter(parts.values()))
      self.values[p] = (QArray(stack_slices({e: v.values for e, v in parts.items()}, n),
                               stack_slices({e: v.scales for e, v in parts.items()}, n), q.block, q.fmt)
                        if isinstance(q, QArray) else stack_slices(parts, n))
    unread = [official_name(self.unit, p, 0) for p in self.specs if p not in self.values]
    if unread:
      raise ValueError(f"{self.unit}: no expert of {unread[0]!r} (and its kind) was read: this process was "
                       "given no routed expert to read.")
    return unflatten({p: self.values[p] for p in self.specs})


def _unread(value) -> bool:
  return isinstance(value.values if isinstance(value, QArray) else value, Slices)


def _row(buf):
  """Expert 0's row of a stacked host buffer (only its form is looked at)."""
  return QArray(buf.values[0], buf.scales[0], buf.block, buf.fmt) if isinstance(buf, QArray) else buf[0]


def _check_same_form(unit: str, path: tuple, parts: dict, value, official: str, source: str):
  """Every routed expert of a leaf stored alike (one format, one shape): else a ValueError naming both."""
  e, first = next(iter(parts.items()))
  form = lambda v: ((v.fmt, tuple(v.values.shape)) if isinstance(v, QArray) else (str(v.dtype), tuple(v.shape)))
  if form(first) != form(value):
    raise ValueError(f"{source}: routed expert tensor {official!r} is stored as {form(value)[0]}, but "
                     f"{official_name(unit, path, e)!r} as {form(first)[0]}; all experts of a layer must share "
                     "one format.")


# ---- the stream ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Progress:
  tensors_done: int = 0
  tensors_total: int = 0
  bytes_done: int = 0
  bytes_total: int = 0
  start: float = dataclasses.field(default_factory=time.time)


class CheckpointReader:
  """The tensors of a safetensors checkpoint (directory with or without index, or one file)."""

  def __init__(self, path: str | os.PathLike, cfg: ModelConfig):
    self.path = os.fspath(path)
    self.cfg = cfg
    self.files = [safetensors_io.SafetensorsFile(f) for f in safetensors_io.checkpoint_files(self.path)]
    self.where: dict[str, safetensors_io.SafetensorsFile] = {}
    for st in self.files:
      for n in st.keys():
        if n in self.where:
          raise ValueError(f"Tensor {n!r} appears in both {self.where[n].path} and {st.path}.")
        self.where[n] = st
    self.scale_of = {}                          # weight name -> its block-scale tensor's name
    for n in self.where:
      for suffix in (".scale", ".weight_scale_inv"):
        if n.endswith(suffix) and n[: -len(suffix)] + ".weight" in self.where:
          self.scale_of[n[: -len(suffix)] + ".weight"] = n
    self.total_bytes = sum(st.nbytes(n) for n, st in self.where.items())
    self.n_tensors = len(self.where)

  def tensors(self, progress: Callable[[Progress], None] | None = None, experts: Container[int] | None = None,
              by_slice: bool = False):
    """(official name, host value, source file, name as stored) in file order; scales ride with their
    weight. Values are numpy arrays or host QArrays. `experts`: the routed experts to read (None: all); a
    routed-expert tensor of any other expert is not read and comes with the value None (of HF's stacked
    expert tensors only the rows of those experts are read, through the memory map). `by_slice`: every tensor
    comes unread, as `Slices` (a QArray of two `Slices` if it stays quantised; one expert of HF's stacked
    tensors, its part of them); the progress then counts the bytes of those tensors as done though the
    caller reads only its slices."""
    scale_names = set(self.scale_of.values())
    prog = Progress(tensors_total=self.n_tensors, bytes_total=self.total_bytes)
    skip = lambda e: experts is not None and e is not None and e not in experts
    for st in self.files:
      source = os.path.basename(st.path)
      for name in st.keys():
        if name in scale_names:
          continue
        nbytes = st.nbytes(name)
        scale_name = self.scale_of.get(name)
        if names.HF_STACKED_EXPERTS.match(name):
          if by_slice:
            whole = Slices.of_file(st, name)
            pieces = [(off, None if skip(e) else whole.part(i))
                      for e, off, i in _hf_stacked_experts(name, whole.shape[0], self.cfg)]
          elif experts is None:
            whole = st.read(name)
            pieces = [(off, np.asarray(whole[i])) for _, off, i in _hf_stacked_experts(name, len(whole), self.cfg)]
          else:                             # views of the memory map: only the rows copied are read
            whole = st.get(name)
            pieces = [(off, None if skip(e) else np.array(whole[i]))
                      for e, off, i in _hf_stacked_experts(name, len(whole), self.cfg)]
        elif skip(_expert_of(official := names.to_official(name))):
          pieces = [(official, None)]
        elif by_slice:
          value = Slices.of_file(st, name)
          if scale_name is not None:
            value = _quantised_slices(name, value, Slices.of_file(self.where[scale_name], scale_name), source,
                                      dequantize=official.endswith(_DEQUANTISED))
            nbytes += self.where[scale_name].nbytes(scale_name)
          pieces = [(official, value)]
        else:
          raw = st.read(name)
          if scale_name is not None:
            sst = self.where[scale_name]
            value = _quantised(name, raw, sst.read(scale_name), source)
            nbytes += sst.nbytes(scale_name)
          else:
            value = raw
          if isinstance(value, QArray) and official.endswith(_DEQUANTISED):
            value = dequantize_host(value)
          pieces = [(official, value)]
        for official, value in pieces:
          yield official, value, source, name
        prog.tensors_done += 1 + (scale_name is not None)
        prog.bytes_done += nbytes
        if progress:
          progress(prog)


def _expert_of(official: str) -> int | None:
  """The routed expert an official tensor name belongs to (None: not a routed-expert tensor)."""
  try:
    return names.official_path(official)[2]
  except (KeyError, ValueError):
    return None


def _hf_stacked_experts(name: str, n_experts: int, cfg: ModelConfig):
  """HF's stacked routed experts gate_up_proj [E, 2F, D] / down_proj [E, D, F] -> (expert, official
  per-expert name, its index into the stacked tensor)."""
  m = names.HF_STACKED_EXPERTS.match(name)
  layer, kind = m.group(1), m.group(2)
  F = cfg.moe_inter_dim
  for e in range(n_experts):
    if kind == "gate_up_proj":
      yield e, f"layers.{layer}.ffn.experts.{e}.w1.weight", (e, slice(0, F))
      yield e, f"layers.{layer}.ffn.experts.{e}.w3.weight", (e, slice(F, 2 * F))
    else:
      yield e, f"layers.{layer}.ffn.experts.{e}.w2.weight", (e,)


def _locate(official: str, specs: dict[str, dict], cfg: ModelConfig):
  """official name -> (unit, path inside the unit, expert index or None, spec); KeyError if none."""
  scope, path, expert = names.official_path(official)
  if scope == "top":
    unit = TOP
  else:
    kind, n = scope.split(".")
    unit = layer_unit(int(n)) if kind == "layers" else mtp_unit(int(n))
  if unit not in specs:
    raise KeyError(official)
  node = specs[unit]
  for k in path:
    if not isinstance(node, dict) or k not in node:
      raise KeyError(official)
    node = node[k]
  if not isinstance(node, ParamSpec) or (expert is not None) != is_expert_leaf(path):
    raise KeyError(official)
  if expert is not None and expert >= cfg.n_routed_experts:
    raise KeyError(official)
  return unit, path, expert, node


def stream_units(path: str | os.PathLike, cfg: ModelConfig, progress: Callable[[Progress], None] | None = None,
                 reader: CheckpointReader | None = None, experts: Container[int] | None = None,
                 by_slice: bool = False) -> Iterator[tuple[str, dict]]:
  """Yields (unit name, host tree) for every unit as soon as all its tensors are read.

  Raises ValueError naming the tensor on an unexpected or duplicated tensor, a wrong shape or dtype
  for `cfg`, a truncated shard, or (at the end) tensors the config needs that the checkpoint lacks.
  A checkpoint without any mtp.* tensor (HF-saved) yields no mtp units; a warning says so.
  `experts`: the routed experts to read (a multi-host job passes those whose shards this process's devices
  hold; weights.py); the others are not read and stay zero in the yielded arrays (never checked). None: all.
  `by_slice`: every leaf is yielded unread, as `Slices` (or a QArray of them; a routed-expert leaf the stack of
  its experts', `stack_slices`), checked by its shape and dtype; the caller reads the slices it needs
  (weights.py: those of its process's devices).
  """
  reader = reader or CheckpointReader(path, cfg)
  specs = unit_specs(cfg)
  open_units: dict[str, _UnitBuffer] = {}
  emitted: set[str] = set()
  saw_mtp = False
  for official, value, source, stored in reader.tensors(progress, experts, by_slice):
    if official.startswith("mtp.") and cfg.n_mtp_layers == 0:
      continue
    try:
      unit, leaf, expert, spec = _locate(official, specs, cfg)
    except KeyError:
      shown = official if official == stored else f"{stored!r} (read as {official!r})"
      raise ValueError(f"{source}: unexpected tensor {shown} for config {cfg.name!r}: the model has no such "
                       "parameter. Check that the config matches the checkpoint.") from None
    saw_mtp |= unit.startswith("mtp.")
    if unit in emitted:
      raise ValueError(f"{source}: tensor {official!r} is given twice.")
    buf = open_units.get(unit)
    if buf is None:
      buf = open_units[unit] = _UnitBuffer(unit, specs[unit], cfg.n_routed_experts)
    if value is None:
      buf.skip(leaf, expert, official, source)
    else:
      _check(official, value, spec, () if expert is None else (expert,), source, cfg)
      buf.put(leaf, expert, _store_dtype(value, spec), official, source)
    if buf.complete():
      emitted.add(unit)
      del open_units[unit]
      yield unit, buf.tree()
  missing_units = [u for u in specs if u not in emitted]
  if missing_units and not saw_mtp and all(u.startswith("mtp.") for u in missing_units):
    log.warning("%s has no mtp.* tensors: the MTP block is left out (mtp_logits will be None).", reader.path)
    return
  if missing_units:
    lacking = []
    for u in missing_units:
      lacking += open_units[u].missing() if u in open_units else [official_name(u, p) for p, _ in
                                                                   flatten(specs[u])]
    raise ValueError(f"{reader.path}: checkpoint lacks {len(lacking)} tensor(s) the config {cfg.name!r} needs, "
                     f"e.g. {lacking[:5]}.")
