"""Logical axis names and the one table that maps them onto a device mesh.

Model code speaks only logical names ("batch", "heads", "experts", ...). `AXIS_RULES` says which
physical mesh axis each one is split over; names missing from the mesh (or mapped to None) are
replicated. With no active mesh every constraint is a no-op, so CPU tests run the same code.

The table is ours; applying it is Flax's partitioning (flax.linen): `use_mesh` enters jax's mesh and
Flax's `nn.logical_axis_rules` context, rule lookup is `nn.logical_to_mesh_axes`, shardings come from
`nn.logical_to_mesh_sharding` and activation constraints from `nn.with_logical_constraint`. So Flax code
run under `use_mesh` (`nn.with_logical_constraint`, `nnx.get_partition_spec` of the `nnx.Param`s in
dsv4_jax/nnx.py, whose `out_sharding` metadata are these logical names) sees the same placement.

What Flax does not do, and this file adds around it:
  * mesh awareness: Flax maps a name to its mesh axis whether or not the mesh has that axis or gives it
    more than one device; `mesh_rules` first drops such axes, so a 1-device mesh gives replicated specs;
  * divisibility: a dimension its mesh axes do not divide (a batch of 1 on data:2) is replicated instead
    of failing (`param_sharding`, `constrain`); `check_mesh` rejects meshes that do this to the model;
  * the concrete mesh while tracing: Flax's global mesh is jax's abstract mesh, but the expert-parallel
    MoE and the cache placement need the devices, so `active_mesh` reads jax's concrete mesh;
  * the mesh itself (`make_mesh`, `parse_mesh`, `check_mesh`): Flax has no mesh constructor.
Flax's lookup differs from the hand-written one it replaced in three corners, none of which the model
reaches (every weight, activation and cache leaf of tiny, flash and pro gets the same spec on every mesh
with axes of size 1 to 4): two names of one array that map to the same mesh axis are resolved by table
order rather than dimension order; a rule naming several mesh axes applies all or none of them; and a
name may appear only once per array.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import flax.linen as nn
import jax
from jax._src.mesh import get_concrete_mesh     # no public getter works while tracing (see _jax_mesh)
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Physical mesh axes: data (batch), sequence (long prompts), tensor (heads, compressed attention,
# vocab), expert (routed experts).
MESH_AXES = ("data", "sequence", "tensor", "expert")

AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", "data"),
    ("seq", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_comp", "tensor"),        # compressed entries of one sequence
    ("act_vocab", "tensor"),
    ("act_experts", "expert"),
    # KV cache (dsv4_jax/cache.py): rows of a sequence's stores stay whole on a device for now; sharding
    # them (context-parallel decode) is the pods issue's to decide
    ("cache_batch", "data"),
    ("cache_seq", None),
    ("cache_window", None),
    # weights
    ("vocab", "tensor"),
    ("embed", None),
    ("embed_out", None),           # the MTP projections' output [D, D] (named apart: one name per array)
    ("q_lora", None),
    ("heads", "tensor"),
    ("head_dim", None),
    ("kv", None),
    ("o_groups", "tensor"),
    ("o_lora", None),
    ("index_heads", "tensor"),
    ("index_dim", None),
    ("comp_dim", None),
    ("ratio", None),
    ("experts", "expert"),
    ("expert_mlp", "tensor"),
    ("mlp", None),
    ("topk", None),
    ("hc", None),
    ("hc_mix", None),
    ("layers", None),
)


def mesh_rules(mesh: Mesh, rules: Sequence[tuple[str, object]] = AXIS_RULES) -> tuple:
  """`rules` as they apply on `mesh`, in Flax's format: mesh axes that `mesh` lacks or has with size 1 are
  dropped (a name left without any maps to None), and so are axes that are manual where this runs (inside
  a `shard_map` over them, e.g. `sequence` in context-parallel attention: each shard holds its own rows).
  What `use_mesh` puts in Flax's rules context."""
  manual = jax.sharding.get_abstract_mesh().manual_axes
  out = []
  for name, phys in rules:
    phys = (phys,) if isinstance(phys, str) else tuple(phys or ())
    phys = tuple(p for p in phys if p in mesh.axis_names and mesh.shape[p] > 1 and p not in manual)
    out.append((name, phys[0] if len(phys) == 1 else phys or None))
  return tuple(out)


def _jax_mesh() -> Mesh | None:
  """jax's concrete mesh (`jax.set_mesh`), also while tracing, where `jax.sharding.get_mesh` refuses: the
  expert-parallel MoE and cache placement need devices, not the abstract mesh Flax reads."""
  mesh = get_concrete_mesh()
  return None if mesh is None or mesh.empty else mesh


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: Sequence[tuple[str, object]] = AXIS_RULES) -> Iterator[None]:
  """Activates `mesh` for `constrain` (and for `logical_sharding` without an explicit mesh): jax's mesh
  (`jax.set_mesh`) and Flax's rules (`nn.logical_axis_rules(mesh_rules(mesh, rules))`). jax's mesh is part
  of jit's cache key: a function traced without a mesh is retraced under one (the MoE's expert-parallel
  branch and every constraint depend on it). `use_mesh(None)` deactivates both."""
  outer = mesh is None and _jax_mesh() is None
  with contextlib.nullcontext() if outer else jax.set_mesh(mesh):
    with nn.logical_axis_rules(mesh_rules(mesh, rules) if mesh is not None else ()):
      yield


def active_mesh() -> tuple[Mesh | None, tuple]:
  """(jax's current mesh or None, the rules in Flax's context, else AXIS_RULES)."""
  mesh = _jax_mesh()
  return (mesh, tuple(nn.get_logical_axis_rules()) or AXIS_RULES) if mesh is not None else (None, AXIS_RULES)


def axis_shards(name: str) -> int:
  """How many shards the active mesh splits logical axis `name` into (1 without a mesh, or where the axes it
  maps to are manual, e.g. inside a `shard_map` over them)."""
  mesh, rules = active_mesh()
  if mesh is None:
    return 1
  phys = dict(mesh_rules(mesh, rules)).get(name)
  phys = (phys,) if isinstance(phys, str) else tuple(phys or ())
  return math.prod(int(mesh.shape[p]) for p in phys)


def logical_to_spec(axes: Sequence[str | None], mesh: Mesh, rules=AXIS_RULES) -> PartitionSpec:
  """PartitionSpec for logical `axes` on `mesh` (Flax's `nn.logical_to_mesh_axes` over `mesh_rules`); each
  mesh axis is used at most once."""
  return nn.logical_to_mesh_axes(tuple(axes), mesh_rules(mesh, rules))


def logical_sharding(axes: Sequence[str | None], mesh: Mesh | None = None, rules=None) -> NamedSharding | None:
  """NamedSharding for logical `axes` on `mesh` (default: the active one; None without one)."""
  if mesh is None:
    mesh, active_rules = active_mesh()
    rules = rules or active_rules
  if mesh is None:
    return None
  return nn.logical_to_mesh_sharding(PartitionSpec(*axes), mesh, mesh_rules(mesh, rules or AXIS_RULES))


def _fit(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules) -> tuple:
  """`axes` with the names whose mesh axes do not divide their dimension replaced by None (Flax would
  emit the sharding and fail): replicated there. Repeats while a freed mesh axis lands on another such
  dimension."""
  axes, rules = list(axes), mesh_rules(mesh, rules)
  while True:
    spec = nn.logical_to_mesh_axes(tuple(axes), rules)
    bad = [d for d, phys in enumerate(spec) if phys is not None and
           shape[d] % math.prod(mesh.shape[n] for n in ((phys,) if isinstance(phys, str) else phys))]
    if not bad:
      return tuple(axes)
    for d in bad:
      axes[d] = None


def param_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=AXIS_RULES) -> NamedSharding:
  """A weight's NamedSharding from its logical axes; a dimension its mesh axes do not divide is replicated
  (check_mesh rejects such meshes for the model's own dimensions)."""
  return logical_sharding(_fit(axes, shape, mesh, rules), mesh, rules)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """`nn.with_logical_constraint` by logical names on the active mesh; a no-op without one. A dimension its
  mesh axes do not divide (a batch of 1 on data:2) stays replicated."""
  if len(axes) != x.ndim:
    raise ValueError(f"constrain: {len(axes)} logical axes {tuple(axes)} for an array of rank {x.ndim}.")
  mesh, rules = active_mesh()
  if mesh is None:
    return x
  return nn.with_logical_constraint(x, _fit(axes, x.shape, mesh, rules), rules=mesh_rules(mesh, rules), mesh=mesh)


def parse_mesh(spec: str) -> dict[str, int]:
  """"data:2,expert:4" -> {"data": 2, "expert": 4}; raises ValueError naming the bad part."""
  shape: dict[str, int] = {}
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    name, sep, size = part.partition(":")
    name = name.strip()
    if not sep or not size.strip().isdigit() or int(size) < 1:
      raise ValueError(f"mesh {spec!r}: {part!r} is not AXIS:SIZE with SIZE a positive integer "
                       f"(e.g. 'data:2,expert:4'; axes {', '.join(MESH_AXES)}).")
    if name not in MESH_AXES:
      raise ValueError(f"mesh {spec!r}: unknown axis {name!r}; the axes are {', '.join(MESH_AXES)}.")
    if name in shape:
      raise ValueError(f"mesh {spec!r}: axis {name!r} is given twice.")
    shape[name] = int(size)
  if not shape:
    raise ValueError(f"mesh {spec!r}: empty; give AXIS:SIZE pairs such as 'data:2,expert:4'.")
  return shape


def default_mesh_shape(n_devices: int, cfg=None) -> dict[str, int]:
  """Experts over as many devices as divide both the device count and the expert count; attention
  data-parallel over the rest (V4 has one KV head: tensor-parallel heads would replicate the cache).
  Without a config: all data."""
  expert = math.gcd(n_devices, cfg.n_routed_experts) if cfg is not None else 1
  return {"data": n_devices // expert, "expert": expert}


def make_mesh(spec: str | dict[str, int] | None = None, cfg=None, devices=None) -> Mesh:
  """A mesh over `devices` (default: all) with axes MESH_AXES.

  `spec` is "data:2,expert:4" (the launch scripts' --mesh), a dict {"data": 2, "expert": 4}, or None for
  `default_mesh_shape` (experts over as many devices as divide cfg.n_routed_experts, data over the rest;
  all data without `cfg`). Axes not named have size 1; the sizes must multiply to the number of devices.
  With `cfg`, `check_mesh` runs too, so a mesh that does not divide the model fails here, before any
  loading. Axes are Auto-sharded: placement follows the constraints, XLA inserts the collectives. On TPU and
  GPU the devices are laid out along the interconnect (`_device_grid`)."""
  import numpy as np
  devices = list(devices if devices is not None else jax.devices())
  if spec is None:
    shape = default_mesh_shape(len(devices), cfg)
  elif isinstance(spec, str):
    shape = parse_mesh(spec)
  else:
    shape = dict(spec)
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {', '.join(MESH_AXES)}.")
  sizes = tuple(int(shape.get(a, 1)) for a in MESH_AXES)
  if min(sizes) < 1:
    raise ValueError(f"mesh {shape}: axis sizes must be positive.")
  if int(np.prod(sizes)) != len(devices):
    given = ",".join(f"{a}:{n}" for a, n in zip(MESH_AXES, sizes) if n > 1) or "1 device"
    raise ValueError(f"mesh {given} has {int(np.prod(sizes))} devices but {len(devices)} "
                     f"{devices[0].platform} device(s) are present; the axis sizes must multiply to "
                     f"{len(devices)}.")
  mesh = Mesh(_device_grid(devices, sizes), MESH_AXES)
  if cfg is not None:
    check_mesh(mesh, cfg)
  return mesh


def _device_grid(devices: list, sizes: tuple[int, ...]):
  """The devices laid out as the mesh `sizes`. TPU and GPU: `mesh_utils.create_device_mesh`, which follows
  the physical interconnect (ICI rings on a TPU slice, each process's devices together) so that the inner
  axes (`tensor`, `expert`) talk over the fastest links; where it has no layout for the shape, and on CPU,
  the devices in order."""
  import numpy as np
  grid = np.asarray(devices, dtype=object).reshape(sizes)
  if devices[0].platform not in ("tpu", "gpu"):
    return grid
  from jax.experimental import mesh_utils
  try:
    return mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError) as e:     # no physical layout for this shape
    import logging
    logging.getLogger(__name__).warning("mesh %s: devices in enumeration order (%s)", sizes, e)
    return grid


def check_mesh(mesh: Mesh, cfg) -> None:
  """Raises ValueError when a mesh axis does not divide the model dimensions the rules table puts on it
  (e.g. 7 expert shards for 256 experts), naming the axis, its size and what it must divide."""
  need = {
      "expert": [("n_routed_experts", cfg.n_routed_experts)],
      "tensor": [("n_heads", cfg.n_heads), ("o_groups", cfg.o_groups), ("index_n_heads", cfg.index_n_heads),
                 ("moe_inter_dim", cfg.moe_inter_dim), ("vocab_size", cfg.vocab_size)],
  }
  for axis, dims in need.items():
    n = int(mesh.shape.get(axis, 1))
    bad = [f"{name}={v}" for name, v in dims if v % n]
    if n > 1 and bad:
      raise ValueError(f"mesh axis {axis!r} has size {n}, which does not divide {', '.join(bad)} of config "
                       f"{cfg.name!r}; {axis!r} must divide {', '.join(f'{k}={v}' for k, v in dims)}.")
