"""The converted checkpoint on disk: one Orbax PyTree checkpoint per unit plus a manifest.

    <dir>/config.json              the released config (read by ModelConfig.from_hf_config)
    <dir>/dsv4_manifest.json       format, mode, per-unit leaves (format, logical shape, stored dtype),
                                   source and conversion statistics; written last, so its presence
                                   means the checkpoint is complete
    <dir>/units/top/               Orbax checkpoint {embed, head, norm, hc_head/...}
    <dir>/units/layer.N/           Orbax checkpoint of block N, unstacked (stacking for lax.scan happens
                                   on restore, on the target devices)
    <dir>/units/mtp.J/

A QArray leaf is stored as the subtree {"values", "scales"}; the manifest records its format and block.
Units are separate checkpoints so the converter can write each one as soon as it is read (Orbax writes
whole arrays, and a stacked leaf is only complete after the last layer of the model).
"""
from __future__ import annotations

import ctypes
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from dsv4_jax.checkpoint import stream
from dsv4_jax.qarray import QArray

MANIFEST = "dsv4_manifest.json"
FORMAT = "dsv4-orbax"
VERSION = 1


def is_converted(path: str | os.PathLike) -> bool:
  return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


def unit_dir(root: str, unit: str) -> str:
  return os.path.join(os.path.abspath(root), "units", unit)        # Orbax wants absolute paths


def leaf_record(value) -> dict:
  if isinstance(value, QArray):
    return {"fmt": value.fmt, "block": list(value.block), "shape": list(value.shape),
            "dtype": str(value.values.dtype), "scale_shape": list(value.scales.shape)}
  return {"fmt": None, "shape": list(value.shape), "dtype": str(value.dtype)}


def _to_storage(tree: dict) -> dict:
  return jax.tree.map(lambda v: {"values": v.values, "scales": v.scales} if isinstance(v, QArray) else v, tree,
                      is_leaf=lambda v: isinstance(v, QArray))


def _checkpointer() -> ocp.Checkpointer:
  # No zstd: fp8 / fp4 codes hardly compress, and the compressed copy would add a unit of host memory.
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))


def save_unit(root: str, unit: str, tree: dict) -> dict:
  """Writes one unit (host arrays / QArrays); returns its manifest entry {leaf path: record}."""
  _checkpointer().save(unit_dir(root, unit), _to_storage(tree))
  _release_freed_memory()
  return {"/".join(p): leaf_record(v) for p, v in stream.flatten(tree)}


def restore_unit(root: str, unit: str, leaves: dict[str, dict], shardings: dict[str, Any] | None = None) -> dict:
  """Restores one unit onto devices. `leaves`: its manifest entry; `shardings`: leaf path -> a
  Sharding for the dense leaf, or a {"values", "scales"} pair of Shardings for a QArray (None: this
  process's first device). Returns the unit tree with QArray leaves rebuilt. With shardings over several
  processes' devices each process reads and holds only the shards of its own devices."""
  shardings = shardings or {}
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  flat_args = {}
  for name, rec in leaves.items():
    sh = shardings.get(name)
    path = tuple(name.split("/"))
    if rec["fmt"]:
      sh = sh or {"values": None, "scales": None}
      for part in ("values", "scales"):
        flat_args[path + (part,)] = ocp.ArrayRestoreArgs(sharding=sh[part] or default)
    else:
      flat_args[path] = ocp.ArrayRestoreArgs(sharding=sh or default)
  restored = _checkpointer().restore(
      unit_dir(root, unit), args=ocp.args.PyTreeRestore(restore_args=stream.unflatten(flat_args)))
  out = {}
  for name, rec in leaves.items():
    node = restored
    for k in name.split("/"):
      node = node[k]
    if rec["fmt"]:
      node = QArray(node["values"], node["scales"], tuple(rec["block"]), rec["fmt"])
    out[tuple(name.split("/"))] = node
  return stream.unflatten(out)


def _release_freed_memory() -> None:
  """Return freed heap pages to the OS (glibc keeps them in per-thread arenas of the writer threads)."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def write_manifest(root: str, manifest: dict) -> None:
  tmp = os.path.join(root, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(root, MANIFEST))


def read_manifest(root: str | os.PathLike) -> dict:
  root = os.fspath(root)
  path = os.path.join(root, MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{root!r} is not a finished converted checkpoint: it has no {MANIFEST}.")
  with open(path) as f:
    m = json.load(f)
  if m.get("format") != FORMAT or m.get("version") != VERSION:
    raise ValueError(f"{path}: format {m.get('format')!r} version {m.get('version')!r}; expected {FORMAT!r} "
                     f"version {VERSION}.")
  for unit in m["units"]:
    if not os.path.isdir(unit_dir(root, unit)):
      raise ValueError(f"{root}: unit {unit!r} listed in {MANIFEST} is missing on disk.")
  return m
