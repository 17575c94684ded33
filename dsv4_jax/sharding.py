"""Logical axis names and the one table that maps them onto a device mesh.

Model code speaks only logical names ("batch", "heads", "experts", ...). `AXIS_RULES` says which
physical mesh axis each one is split over; names missing from the mesh (or mapped to None) are
replicated. With no active mesh every constraint is a no-op, so CPU tests run the same code.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

import jax
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

_state = threading.local()


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: Sequence[tuple[str, object]] = AXIS_RULES) -> Iterator[None]:
  """Activates `mesh` for `constrain` (and for `logical_sharding` without an explicit mesh)."""
  prev = getattr(_state, "ctx", None)
  _state.ctx = (mesh, tuple(rules)) if mesh is not None else None
  try:
    yield
  finally:
    _state.ctx = prev


def active_mesh() -> tuple[Mesh | None, tuple]:
  ctx = getattr(_state, "ctx", None)
  return ctx if ctx is not None else (None, AXIS_RULES)


def logical_to_spec(axes: Sequence[str | None], mesh: Mesh, rules=AXIS_RULES) -> PartitionSpec:
  """PartitionSpec for logical `axes`; each mesh axis is used at most once (first come first served)."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in axes:
    phys = table.get(name) if name is not None else None
    phys = (phys,) if isinstance(phys, str) else tuple(phys or ())
    phys = tuple(p for p in phys if p in mesh.axis_names and mesh.shape[p] > 1 and p not in used)
    used.update(phys)
    out.append(None if not phys else phys[0] if len(phys) == 1 else phys)
  return PartitionSpec(*out)


def logical_sharding(axes: Sequence[str | None], mesh: Mesh | None = None, rules=None) -> NamedSharding | None:
  if mesh is None:
    mesh, active_rules = active_mesh()
    rules = rules or active_rules
  if mesh is None:
    return None
  return NamedSharding(mesh, logical_to_spec(axes, mesh, rules or AXIS_RULES))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op without an active mesh."""
  if len(axes) != x.ndim:
    raise ValueError(f"constrain: {len(axes)} logical axes {tuple(axes)} for an array of rank {x.ndim}.")
  sharding = logical_sharding(axes)
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def make_mesh(shape: dict[str, int] | None = None, devices=None) -> Mesh:
  """A mesh over `devices` (default: all) with axes MESH_AXES; `shape` gives sizes, the rest are 1.
  Axes are Auto-sharded: placement follows the constraints, XLA inserts the collectives."""
  import numpy as np
  devices = list(devices if devices is not None else jax.devices())
  shape = dict(shape or {"data": len(devices)})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"Unknown mesh axes {sorted(unknown)}; expected some of {MESH_AXES}.")
  sizes = tuple(int(shape.get(a, 1)) for a in MESH_AXES)
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"Mesh shape {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices; "
                     f"{len(devices)} are available.")
  return Mesh(np.asarray(devices, dtype=object).reshape(sizes), MESH_AXES)
