"""Parameter descriptions: every weight is a `ParamSpec` (shape, logical axes, dtype kind, init).

The model's parameters are a plain pytree (nested dicts / lists of arrays) with the same structure as
the spec tree `transformer.param_specs(cfg)`. From the specs we derive abstract shapes
(`jax.ShapeDtypeStruct`, for AOT compilation and parameter counting), shardings, and random init.
"""
from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# dtype kinds: "weight" follows the requested parameter dtype (bf16 by default); "f32" is kept in fp32
# whatever the requested dtype (mHC, norms, sinks, biases, ape: the reference holds them in fp32);
# "int" is an int32 table (tid2eid).
_KINDS = ("weight", "f32", "int")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  kind: str = "weight"
  init: tuple = ("fan_in",)

  def __post_init__(self):
    if len(self.shape) != len(self.axes):
      raise ValueError(f"ParamSpec: shape {self.shape} and axes {self.axes} differ in rank.")
    if self.kind not in _KINDS:
      raise ValueError(f"ParamSpec: kind {self.kind!r} not in {_KINDS}.")

  def dtype(self, weight_dtype) -> jnp.dtype:
    return {"weight": jnp.dtype(weight_dtype), "f32": jnp.dtype(jnp.float32), "int": jnp.dtype(jnp.int32)}[
        self.kind]

  def stacked(self, n: int) -> "ParamSpec":
    """The same parameter for `n` layers scanned together: a leading "layers" axis."""
    return dataclasses.replace(self, shape=(n,) + self.shape, axes=("layers",) + self.axes)


def is_spec(x: Any) -> bool:
  return isinstance(x, ParamSpec)


def stack_specs(tree: Any, n: int) -> Any:
  return jax.tree.map(lambda s: s.stacked(n), tree, is_leaf=is_spec)


def abstract_params(specs: Any, dtype=jnp.bfloat16) -> Any:
  """jax.ShapeDtypeStruct for every parameter (no memory is allocated)."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype(dtype)), specs, is_leaf=is_spec)


def logical_axes(specs: Any) -> Any:
  return jax.tree.map(lambda s: s.axes, specs, is_leaf=is_spec)


def count(specs: Any, where=lambda path: True) -> int:
  """Number of parameters in the spec tree, of the leaves whose "a/b/c" path satisfies `where`."""
  flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]
  return int(sum(np.prod(s.shape, dtype=np.int64) for p, s in flat if where(path_str(p))))


def path_str(path) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
  return "/".join(parts)


def _draw_kind(spec: ParamSpec) -> tuple[str, float, float]:
  """(distribution, std, shift) of a leaf's init: values are shift + std * normal(...), or a hash table
  from uniform(...), or zeros."""
  kind, *args = spec.init
  if kind == "fan_in":            # linear weights [..., out, in]: unit-variance outputs
    return "normal", spec.shape[-1] ** -0.5, 0.0
  if kind == "normal":
    return "normal", args[0], 0.0
  if kind == "normal_plus_one":   # norm weights, scales: 1 + noise
    return "normal", args[0], 1.0
  if kind in ("zeros", "hash"):
    return kind, 0.0, 0.0
  raise ValueError(f"Unknown init {spec.init!r}.")


def _from_draw(spec: ParamSpec, draw, dtype, xp):
  """A leaf from its standard draw (normal or uniform, the leaf's shape), in numpy or jax.numpy (`xp`):
  the same f32 arithmetic either way, so host and device give the same values."""
  dist, std, shift = _draw_kind(spec)
  dt = spec.dtype(dtype)
  if dist == "zeros":
    return xp.zeros(spec.shape, dt)
  if dist == "hash":              # tid2eid [..., V, k]: k distinct experts per token id (stable argsort)
    order = xp.argsort(draw, axis=-1, **({"kind": "stable"} if xp is np else {}))
    return order[..., : spec.shape[-1]].astype(dt)
  if xp is np:                    # one rounding, as XLA:CPU's fused multiply-add (exact in f64 otherwise)
    return (draw.astype(np.float64) * np.float32(std) + shift).astype(np.float32).astype(dt)
  return (draw * np.float32(std) + np.float32(shift)).astype(dt)


def _draw_shape(spec: ParamSpec) -> tuple[int, ...]:
  return spec.shape[:-1] + (spec.init[1],) if spec.init[0] == "hash" else spec.shape


def _init_one(spec: ParamSpec, key: jax.Array, dtype) -> jax.Array:
  """One leaf drawn with jax.random (traceable: runs on the devices inside a jit)."""
  dist = _draw_kind(spec)[0]
  draw = None
  if dist == "normal":
    draw = jax.random.normal(key, _draw_shape(spec), jnp.float32)
  elif dist == "hash":
    draw = jax.random.uniform(key, _draw_shape(spec), jnp.float32)
  if draw is not None:            # no algebraic rewrites across it: the host path's rounding, bit for bit
    draw = jax.lax.optimization_barrier(draw)
  return _from_draw(spec, draw, dtype, jnp)


@functools.lru_cache(maxsize=32)
def _device_init_fn(specs: tuple, salts: tuple, dtype, shardings: tuple | None):
  """One jit for the whole tree, each leaf drawn with its target sharding (XLA partitions the counter-based
  threefry draws), so no device, and not the host, ever holds more than its shards."""
  def init(key):
    return [_init_one(s, jax.random.fold_in(key, np.uint32(salt)), dtype) for s, salt in zip(specs, salts)]
  return jax.jit(init, out_shardings=list(shardings) if shardings is not None else None)


@functools.lru_cache(maxsize=32)
def _bucket_draw_fn(buckets: tuple):
  """One jit drawing, per (distribution, size) bucket, `size` values for each of several leaf keys."""
  def draw(key, salts):
    out = []
    for (dist, size), sl in zip(buckets, salts):
      fn = jax.random.normal if dist == "normal" else jax.random.uniform
      out.append(jax.vmap(lambda s: fn(jax.random.fold_in(key, s), (size,), jnp.float32))(sl))
    return out
  return jax.jit(draw)


def _host_init(specs: list, salts: list, key: jax.Array, dtype) -> list[np.ndarray]:
  """The same values as `_device_init_fn` for CPU backends, compiled in about a second: counter-based
  threefry makes a leaf's draw the first n values of a longer draw with its key, so leaves are drawn in
  a few padded buckets (sizes rounded up to powers of 4) by one jit, then cut, scaled and cast with
  NumPy. (A jit emitting every leaf costs XLA:CPU ~0.2 s of codegen per leaf: ~40 s for the tiny model.)"""
  groups: dict[tuple[str, int], list[int]] = {}
  for i, spec in enumerate(specs):
    dist = _draw_kind(spec)[0]
    if dist != "zeros":
      n = int(np.prod(_draw_shape(spec), dtype=np.int64))
      size = 4 ** -(-max(n - 1, 0).bit_length() // 2)           # n rounded up to a power of 4
      groups.setdefault(("normal" if dist == "normal" else "uniform", size), []).append(i)
  buckets = tuple(sorted(groups))
  drawn = _bucket_draw_fn(buckets)(key, [np.asarray([salts[i] for i in groups[b]], np.uint32) for b in buckets])
  rows = {}
  for b, arr in zip(buckets, drawn):
    arr = np.asarray(arr)
    rows.update({i: arr[r] for r, i in enumerate(groups[b])})
  out = []
  for i, spec in enumerate(specs):
    shape = _draw_shape(spec)
    draw = rows[i][: int(np.prod(shape, dtype=np.int64))].reshape(shape) if i in rows else None
    out.append(_from_draw(spec, draw, dtype, np))
  return out


def init_from_specs(specs: Any, key: jax.Array, dtype=jnp.bfloat16, shardings: Any = None,
                    on_device: bool | None = None) -> Any:
  """Random parameters, each leaf from `fold_in(key, crc32(its path))` with jax.random, so adding a weight
  elsewhere does not change the others, and the values do not depend on `shardings` (a tree of
  `jax.sharding.Sharding` like `specs`; None: the default device).

  `on_device` (default: unless every target device is a CPU): draw under one jit with the target shardings,
  for accelerators and pods. Otherwise the same values are drawn in padded buckets and cut on the host
  (`_host_init`), which XLA:CPU compiles ~40x faster. Under tracing (`jax.eval_shape`) always on device."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)
  salts = tuple(zlib.crc32(path_str(p).encode()) for p, _ in flat)
  leaves = tuple(s for _, s in flat)
  sh = None if shardings is None else tuple(treedef.flatten_up_to(shardings))
  dtype = jnp.dtype(dtype)
  if on_device is None:
    devices = {d for x in (sh or ()) for d in x.device_set} or {jax.devices()[0]}
    on_device = isinstance(key, jax.core.Tracer) or any(d.platform != "cpu" for d in devices)
  if on_device:
    values = _device_init_fn(leaves, salts, dtype, sh)(key)
  else:
    host = _host_init(list(leaves), list(salts), key, dtype)
    values = [jnp.asarray(v) if sh is None else jax.device_put(v, t) for v, t in zip(host, sh or [None] * len(host))]
  return jax.tree_util.tree_unflatten(treedef, values)


def check_tree(params: Any, specs: Any, where: str = "params") -> None:
  """Raises naming the first parameter whose presence or shape does not match the specs."""
  flat_p = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  flat_s = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]}
  missing = sorted(set(flat_s) - set(flat_p))
  extra = sorted(set(flat_p) - set(flat_s))
  if missing:
    raise ValueError(f"{where}: missing parameter(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}.")
  if extra:
    raise ValueError(f"{where}: unexpected parameter(s) {extra[:5]}{' ...' if len(extra) > 5 else ''}.")
  for name, spec in flat_s.items():
    if tuple(flat_p[name].shape) != spec.shape:
      raise ValueError(f"{where}: {name} has shape {tuple(flat_p[name].shape)}, expected {spec.shape}.")


