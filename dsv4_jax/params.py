"""Parameter descriptions: every weight is a `ParamSpec` (shape, logical axes, dtype kind, init).

The model's parameters are a plain pytree (nested dicts / lists of arrays) with the same structure as
the spec tree `transformer.param_specs(cfg)`. From the specs we derive abstract shapes
(`jax.ShapeDtypeStruct`, for AOT compilation and parameter counting), shardings, and random init.
"""
from __future__ import annotations

import dataclasses
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


def _init_one(spec: ParamSpec, rng: np.random.Generator, dtype) -> np.ndarray:
  kind, *args = spec.init
  dt = spec.dtype(dtype)

  def normal(std):
    return (std * rng.standard_normal(spec.shape, np.float32)).astype(dt)

  if kind == "fan_in":            # linear weights [..., out, in]: unit-variance outputs
    return normal(spec.shape[-1] ** -0.5)
  if kind == "normal":
    return normal(args[0])
  if kind == "normal_plus_one":   # norm weights, scales: 1 + noise
    return (1.0 + args[0] * rng.standard_normal(spec.shape, np.float32)).astype(dt)
  if kind == "zeros":
    return np.zeros(spec.shape, dt)
  if kind == "hash":              # tid2eid [..., V, k]: k distinct experts per token id
    noise = rng.random(spec.shape[:-1] + (args[0],), np.float32)
    return np.argsort(noise, axis=-1)[..., : spec.shape[-1]].astype(dt)
  raise ValueError(f"Unknown init {spec.init!r}.")


def init_from_specs(specs: Any, key: jax.Array, dtype=jnp.bfloat16) -> Any:
  """Random parameters, drawn on the host (no compilation) and placed on the default device. Each leaf's
  stream is seeded by (key, its path), so adding a weight elsewhere does not change the others."""
  seed = [int(x) for x in np.asarray(jax.random.key_data(key)).ravel()]

  def leaf(path, spec):
    rng = np.random.default_rng(seed + [zlib.crc32(path_str(path).encode())])
    return jnp.asarray(_init_one(spec, rng, dtype))
  return jax.tree_util.tree_map_with_path(leaf, specs, is_leaf=is_spec)


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


