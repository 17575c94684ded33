"""Loading parameters: released safetensors (official or HF names) or a checkpoint made by `launch.convert`.

`load_params(path, cfg, dtype=None, mesh=None)` is the one entry point. Both sources arrive as a stream
of units (checkpoint/stream.py: "top", "layer.N", "mtp.J"); each unit goes straight to the target devices
with the sharding its logical axes get from the rules table, and scanned layers are written into their
stacked arrays in place, so host memory stays about one unit and device memory the model.

Multi-host (a mesh over the devices of several processes, after `distributed.initialize`): every process
calls `load_params` alike and ends up with global arrays of which it holds only the shards of its own devices.
A converted (Orbax) checkpoint is restored with those target shardings, so each process reads from storage
only the byte ranges of its shards (per-host restore). From safetensors, each process reads of every tensor
only the slices its devices hold under the target sharding (`stream_units(by_slice=True)` yields them unread;
`_from_slices` reads each distinct slice once per process, so a replicated tensor once, not once per device,
and puts it on the devices that hold it). The routed experts (~95% of the released weights' bytes) too: of
the experts its devices hold (`experts_to_read`), only their slices, e.g. half of each expert's rows when the
`tensor` axis splits them; the experts of other processes are never read. A QArray's values
and scales are two arrays with their own shardings, each read by its own slices; a weight the loader
dequantises (`wo_a`, non-power-of-two float scales) reads the scale blocks covering its slice and trims.

Quantised weights (fp8 e4m3 with 128x128 e8m0 scales, fp4 e2m1 experts with 1x32 scales) stay `QArray`s
unless `quantized=False`; the model dequantises them blockwise inside its matmuls (qarray.dense), with
the same result bit for bit. Dense weights are cast to `dtype` (default `cfg.dtype`); mHC, norm, sink,
bias and ape tensors stay fp32, `tid2eid` int32.
"""
from __future__ import annotations

import functools
import logging
import os
import warnings
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dsv4_jax import transformer
from dsv4_jax.checkpoint import orbax_io, stream
from dsv4_jax.config import ModelConfig
from dsv4_jax.params import ParamSpec
from dsv4_jax.qarray import QArray
from dsv4_jax.sharding import param_sharding

log = logging.getLogger(__name__)


def _sharding(axes: tuple, shape: tuple, mesh: Mesh | None):
  """NamedSharding of a leaf from its logical axes (`sharding.param_sharding`: a dimension the mesh axes do
  not divide is replicated); without a mesh this process's first device."""
  if mesh is None:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return param_sharding(axes, shape, mesh)


def leaf_sharding(spec: ParamSpec, value, mesh: Mesh | None):
  """The sharding of a dense leaf, or {"values", "scales"} for a QArray (same axes, own shapes)."""
  if isinstance(value, QArray):
    return {"values": _sharding(spec.axes, tuple(value.values.shape), mesh),
            "scales": _sharding(spec.axes, tuple(value.scales.shape), mesh)}
  return _sharding(spec.axes, tuple(value.shape), mesh)


def process_of(device) -> int:
  """A device's process (tests pretend that one process's devices belong to several by replacing this)."""
  return device.process_index


def _spans_processes(devices) -> bool:
  """Whether `devices` include one of another process than this one (a mesh's: then each process reads by
  slice; a sharding's: then each process puts only its own devices' shards)."""
  me = jax.process_index()
  return any(process_of(d) != me for d in devices)


def _from_slices(x: stream.Slices, sharding) -> jax.Array:
  """The global array `x` laid out by `sharding`, reading only the slices of this process's devices, each
  distinct slice once (a replicated tensor is read once per process, not once per device). A device of another
  process (only when tests pretend, `process_of`) gets zeros: nothing is read for it."""
  me = jax.process_index()
  index_of = sharding.devices_indices_map(x.shape)
  read: dict[tuple, np.ndarray] = {}
  arrays = []
  for d in sharding.addressable_devices:
    index = index_of[d]
    key = tuple(s.indices(n)[:2] for s, n in zip(index, x.shape))
    if process_of(d) != me:
      host = np.zeros(tuple(b - a for a, b in key), x.dtype)
    else:
      if key not in read:
        read[key] = x.read(index)
      host = read[key]
    arrays.append(jax.device_put(host, d))
  return jax.make_array_from_single_device_arrays(x.shape, sharding, arrays)


def _put(x, sharding) -> jax.Array:
  """A leaf on the devices of `sharding`: `stream.Slices` by `_from_slices`; a numpy array by `device_put`,
  or, where `sharding` has devices of other processes, by `_from_slices` too: each process puts
  only its own devices' shards (a host buffer of routed experts differs between processes, its unread
  experts zero, which `device_put` rejects: it checks with a collective that every process passes the same
  value)."""
  if isinstance(x, stream.Slices):
    return _from_slices(x, sharding)
  if isinstance(x, np.ndarray) and _spans_processes(sharding.device_set):
    return _from_slices(stream.Slices.of_array(x), sharding)
  return jax.device_put(x, sharding)          # a jax.Array (restored from Orbax) already lies there


@functools.lru_cache(maxsize=None)
def _zeros(shape: tuple, dtype, sharding):
  """A jitted allocator of zeros laid out by `sharding` (never whole on one device)."""
  return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked, piece, rep):
  return jax.tree.map(lambda s, p: jax.lax.dynamic_update_index_in_dim(s, p.astype(s.dtype), rep, 0), stacked,
                      piece)


class _TreeBuilder:
  """Places units onto devices and assembles the model's parameter tree (stacked layers included)."""

  def __init__(self, cfg: ModelConfig, dtype, mesh: Mesh | None, quantized: bool):
    self.cfg, self.dtype, self.mesh, self.quantized = cfg, jnp.dtype(dtype), mesh, quantized
    self.plan = transformer.layer_plan(cfg)
    self.specs = transformer.param_specs(cfg)
    self.unit_specs = stream.unit_specs(cfg)
    self.top: dict = {}
    self.layers = {"prefix": [None] * len(self.plan.prefix), "stack": [None] * len(self.plan.period),
                   "suffix": [None] * len(self.plan.suffix)}
    self.stack_filled = [np.zeros(self.plan.reps, bool) for _ in self.plan.period]
    self.stack_source: list[dict] = [{} for _ in self.plan.period]       # leaf -> (unit, form) of rep 0
    self.mtp = [None] * cfg.n_mtp_layers

  def _cast(self, spec: ParamSpec, v):
    """On device: QArray kept (or dequantised), dense weights to dtype, f32 kinds fp32, tables int32."""
    if isinstance(v, QArray):
      return v if self.quantized else v.dequantize(self.dtype)
    return v.astype(spec.dtype(self.dtype))

  def _place(self, unit: str, tree: dict) -> dict:
    specs = dict(stream.flatten(self.unit_specs[unit]))
    flat = dict(stream.flatten(tree))
    out = {}
    for path, spec in specs.items():
      v = flat[path]
      if not isinstance(v, QArray) and tuple(v.shape) != spec.shape:
        raise ValueError(f"{unit}: {'/'.join(path)} has shape {tuple(v.shape)}, expected {spec.shape}.")
      sh = leaf_sharding(spec, v, self.mesh)
      v = (QArray(_put(v.values, sh["values"]), _put(v.scales, sh["scales"]), v.block, v.fmt)
           if isinstance(v, QArray) else _put(v, sh))
      out[path] = self._cast(spec, v)
    return out

  def add(self, unit: str, tree: dict) -> None:
    kind, n = stream.parse_unit(unit)
    flat = self._place(unit, tree)
    if kind == stream.TOP:
      self.top = stream.unflatten(flat)
    elif kind == "mtp":
      self.mtp[n] = stream.unflatten(flat)
    else:
      where, pos, rep = self.plan.locate(n)
      if rep is None:
        self.layers[where][pos] = stream.unflatten(flat)
      else:
        self._add_rep(unit, pos, rep, flat)

  def _add_rep(self, unit: str, pos: int, rep: int, flat: dict) -> None:
    form = lambda v: (v.fmt, v.block) if isinstance(v, QArray) else "dense"
    if self.layers["stack"][pos] is None:
      stacked_specs = dict(stream.flatten(self.unit_specs[unit]))
      alloc = {}
      for path, v in flat.items():
        self.stack_source[pos][path] = (unit, form(v))
        st_spec = stacked_specs[path].stacked(self.plan.reps)
        alloc[path] = jax.tree.map(lambda x, sh: _zeros((self.plan.reps,) + tuple(x.shape), x.dtype, sh)(),
                                   v, _stacked_sharding(st_spec, v, self.mesh, self.plan.reps))
      self.layers["stack"][pos] = alloc
    stack = self.layers["stack"][pos]
    for path, v in flat.items():
      first_unit, first_form = self.stack_source[pos][path]
      if form(v) != first_form:
        raise ValueError(f"{unit}: {'/'.join(path)} is stored as {form(v)} but {first_unit} (stacked with it for "
                         f"lax.scan) as {first_form}; convert with --dtype=bf16 to make them dense.")
      with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        stack[path] = _set_layer(stack[path], v, rep)
    self.stack_filled[pos][rep] = True

  def result(self, units_seen: Iterable[str]) -> dict:
    missing = [u for u in self.unit_specs if u not in set(units_seen) and not u.startswith("mtp.")]
    if missing:
      raise ValueError(f"checkpoint lacks unit(s) {missing[:5]} that config {self.cfg.name!r} needs.")
    mtp = [m for m in self.mtp if m is not None]
    if mtp and len(mtp) != len(self.mtp):
      raise ValueError(f"checkpoint has {len(mtp)} of the {len(self.mtp)} MTP blocks config {self.cfg.name!r} needs.")
    return {**self.top,
            "layers": {"prefix": self.layers["prefix"], "suffix": self.layers["suffix"],
                       "stack": [stream.unflatten(s) if s is not None else None for s in self.layers["stack"]]},
            "mtp": mtp}


def _stacked_sharding(spec: ParamSpec, v, mesh, reps: int):
  if isinstance(v, QArray):
    return QArray(_sharding(spec.axes, (reps,) + tuple(v.values.shape), mesh),
                  _sharding(spec.axes, (reps,) + tuple(v.scales.shape), mesh), v.block, v.fmt)
  return _sharding(spec.axes, (reps,) + tuple(v.shape), mesh)


def _check_manifest(manifest: dict, cfg: ModelConfig, root: str) -> None:
  """Every unit and leaf of the converted checkpoint against the config's specs."""
  specs = stream.unit_specs(cfg)
  extra = [u for u in manifest["units"] if u not in specs]
  if extra:
    raise ValueError(f"{root}: converted checkpoint has unit(s) {extra[:5]} that config {cfg.name!r} (n_layers="
                     f"{cfg.n_layers}, n_mtp_layers={cfg.n_mtp_layers}) does not have.")
  for unit, leaves in manifest["units"].items():
    want = {"/".join(p): s for p, s in stream.flatten(specs[unit])}
    for name in sorted(set(want) - set(leaves)):
      raise ValueError(f"{root}: {unit} lacks {name} ({stream.official_name(unit, tuple(name.split('/')))}), which "
                       f"config {cfg.name!r} needs.")
    for name in sorted(set(leaves) - set(want)):
      raise ValueError(f"{root}: {unit} has {name}, which config {cfg.name!r} does not have.")
    for name, rec in leaves.items():
      if tuple(rec["shape"]) != want[name].shape:
        raise ValueError(f"{root}: {unit}/{name} ({stream.official_name(unit, tuple(name.split('/')))}) has shape "
                         f"{tuple(rec['shape'])}, expected {want[name].shape} for config {cfg.name!r}.")


def experts_to_read(cfg: ModelConfig, mesh: Mesh | None, owner=None) -> set[int] | None:
  """The routed experts whose shards this process's devices hold under `mesh` (the expert axis of a routed
  expert weight, by the rules table); None when this process holds them all (no mesh, or one process).
  `owner`: a device's process (default: the module's `process_of`; tests pretend several processes)."""
  owner = owner or process_of
  if mesh is None or not cfg.n_routed_experts:
    return None
  unit = stream.layer_unit(0)
  spec = next(s for p, s in stream.flatten(stream.unit_specs(cfg)[unit]) if stream.is_expert_leaf(p))
  shape = tuple(spec.shape)                                             # [E, ...]
  sh = param_sharding(spec.axes, shape, mesh)
  me = jax.process_index()
  experts = set()
  for device, index in sh.devices_indices_map(shape).items():
    if owner(device) == me:
      experts.update(range(cfg.n_routed_experts)[index[0]])
  return None if len(experts) == cfg.n_routed_experts else experts


def _restore_units(root: str, cfg: ModelConfig, mesh):
  manifest = orbax_io.read_manifest(root)
  _check_manifest(manifest, cfg, root)
  specs = stream.unit_specs(cfg)
  for unit, leaves in manifest["units"].items():
    flat_specs = {"/".join(p): s for p, s in stream.flatten(specs[unit])}
    shardings = {}
    for name, rec in leaves.items():
      axes = flat_specs[name].axes
      if rec["fmt"]:
        values_shape = rec["shape"][:-1] + [rec["shape"][-1] // 2] if rec["fmt"] == "fp4" else rec["shape"]
        shardings[name] = {"values": _sharding(axes, tuple(values_shape), mesh),
                           "scales": _sharding(axes, tuple(rec["scale_shape"]), mesh)}
      else:
        shardings[name] = _sharding(axes, tuple(rec["shape"]), mesh)
    yield unit, orbax_io.restore_unit(root, unit, leaves, shardings)


def load_params(path: str | os.PathLike, cfg: ModelConfig, dtype=None, mesh: Mesh | None = None,
                quantized: bool = True) -> dict:
  """Parameters from a checkpoint directory (safetensors, or converted by `launch.convert`) or one
  .safetensors file, placed on `mesh` by the logical axis rules (None: the default device).

  With a mesh spanning several processes each process holds only its devices' shards; it restores only those
  from a converted checkpoint, and from safetensors reads only its own routed experts and only its devices'
  slices of every other tensor (module docstring).

  Tensor names may be official (`layers.3.attn.wq_a.weight`) or HF (`model.layers.3.self_attn.q_a_proj.weight`).
  fp8 / fp4 weights stay QArrays (`quantized=False`: dequantised exactly to `dtype`). Dense weights are cast
  to `dtype` (default `cfg.dtype`); mHC, norm, sink, bias and ape tensors stay fp32, `tid2eid` int32.
  """
  path = os.fspath(path)
  builder = _TreeBuilder(cfg, dtype or cfg.dtype, mesh, quantized)
  if orbax_io.is_converted(path):
    units = _restore_units(path, cfg, mesh)
  elif os.path.isdir(os.path.join(path, "units")) and not any(f.endswith(".safetensors") for f in os.listdir(path)):
    raise ValueError(f"{path!r} is an unfinished conversion (no {orbax_io.MANIFEST}); convert it again.")
  else:
    units = stream.stream_units(path, cfg, experts=experts_to_read(cfg, mesh),
                                by_slice=mesh is not None and _spans_processes(mesh.devices.flat))
  seen = []
  for unit, tree in units:
    builder.add(unit, tree)
    seen.append(unit)
  return builder.result(seen)
