"""Loading parameters from released checkpoints (safetensors, official or HF tensor names).

`load_params(path, cfg)` reads every tensor once, dequantises fp8 / fp4 weights exactly, places it in the
parameter tree (stacked layers and routed experts included) and checks the result against the model's
parameter specs: a missing, unexpected or misshapen tensor raises an error that names it.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax import params as params_lib
from dsv4_jax import transformer
from dsv4_jax.checkpoint import formats, names, safetensors_io
from dsv4_jax.config import ModelConfig

log = logging.getLogger(__name__)


def _get(tree: Any, path: tuple):
  for k in path:
    tree = tree[int(k)] if isinstance(tree, list) else tree[k]
  return tree


class _Placer:
  """Maps official names to (spec, host buffer, index) of the parameter tree."""

  def __init__(self, cfg: ModelConfig):
    self.cfg = cfg
    self.plan = transformer.layer_plan(cfg)
    self.specs = transformer.param_specs(cfg)
    self.buffers: dict[int, np.ndarray] = {}
    self.filled: dict[int, np.ndarray] = {}           # per buffer: bool mask over its leading index space

  def locate(self, official: str):
    """-> (spec, leaf path, index tuple into the leaf) or raises KeyError."""
    scope, path, expert = names.official_path(official)
    if scope == "top":
      leaf_path, index = path, ()
    elif scope.startswith("layers."):
      layer = int(scope.split(".")[1])
      if layer >= self.cfg.n_layers:
        raise KeyError(official)
      where, pos, rep = self.plan.locate(layer)
      leaf_path = ("layers", where, pos) + path
      index = () if rep is None else (rep,)
    else:
      j = int(scope.split(".")[1])
      if j >= self.cfg.n_mtp_layers:
        raise KeyError(official)
      leaf_path, index = ("mtp", j) + path, ()
    if expert is not None:
      if expert >= self.cfg.n_routed_experts:
        raise KeyError(official)
      index = index + (expert,)
    try:
      spec = _get(self.specs, leaf_path)
    except (KeyError, IndexError, TypeError):
      raise KeyError(official) from None
    if not isinstance(spec, params_lib.ParamSpec):
      raise KeyError(official)
    return spec, leaf_path, index

  def put(self, official: str, value: np.ndarray, source: str):
    spec, leaf_path, index = self.locate(official)
    want = spec.shape[len(index):]
    if tuple(value.shape) != want:
      raise ValueError(f"{source}: tensor {official!r} has shape {tuple(value.shape)}, expected {want} for "
                       f"config {self.cfg.name!r}.")
    if spec.kind == "int" and not np.issubdtype(value.dtype, np.integer):
      raise ValueError(f"{source}: tensor {official!r} has dtype {value.dtype}, expected an integer table.")
    if spec.kind != "int" and np.issubdtype(value.dtype, np.integer):
      raise ValueError(f"{source}: tensor {official!r} has integer dtype {value.dtype} and no scale tensor; "
                       "expected a float (or fp8/fp4 + scale) weight.")
    key = id(spec)
    if key not in self.buffers:
      self.buffers[key] = np.zeros(spec.shape, np.int32 if spec.kind == "int" else np.float32)
      self.filled[key] = np.zeros(spec.shape[: len(spec.shape) - len(want)] or (1,), bool)
    mask_index = index or (0,)
    if self.filled[key][mask_index]:
      raise ValueError(f"{source}: tensor {official!r} is given twice.")
    self.buffers[key][index] = value
    self.filled[key][mask_index] = True

  def missing(self) -> list[str]:
    out = []
    def visit(path, spec):
      key = id(spec)
      if key not in self.buffers or not self.filled[key].all():
        out.append(params_lib.path_str(path))
    jax.tree_util.tree_map_with_path(visit, self.specs, is_leaf=params_lib.is_spec)
    return out

  def tree(self, dtype) -> Any:
    def leaf(spec):
      return jnp.asarray(self.buffers[id(spec)], spec.dtype(dtype))
    return jax.tree.map(leaf, self.specs, is_leaf=params_lib.is_spec)


def _hf_stacked_experts(name: str, value: np.ndarray, cfg: ModelConfig):
  """HF's stacked routed experts -> official per-expert names."""
  m = names.HF_STACKED_EXPERTS.match(name)
  layer, kind = m.group(1), m.group(2)
  F = cfg.moe_inter_dim
  for e in range(value.shape[0]):
    if kind == "gate_up_proj":
      yield f"layers.{layer}.ffn.experts.{e}.w1.weight", value[e, :F]
      yield f"layers.{layer}.ffn.experts.{e}.w3.weight", value[e, F:]
    else:
      yield f"layers.{layer}.ffn.experts.{e}.w2.weight", value[e]


def read_checkpoint(path: str, cfg: ModelConfig) -> dict:
  """Reads a safetensors checkpoint into host fp32 arrays in the parameter-tree layout."""
  files = safetensors_io.checkpoint_files(path)
  placer = _Placer(cfg)
  by_name: dict[str, safetensors_io.SafetensorsFile] = dict(safetensors_io.iter_tensors(files))
  scale_of = {}                                   # weight name -> its block-scale tensor's name
  for n in by_name:
    for suffix in (".scale", ".weight_scale_inv"):
      if n.endswith(suffix) and n[: -len(suffix)] + ".weight" in by_name:
        scale_of[n[: -len(suffix)] + ".weight"] = n
  scale_names = set(scale_of.values())
  saw_mtp = False
  for name, st in by_name.items():
    if name in scale_names:
      continue                                   # consumed with its weight
    official = names.to_official(name)
    source = os.path.basename(st.path)
    if names.HF_STACKED_EXPERTS.match(name):
      pieces = list(_hf_stacked_experts(name, st.get(name).astype(np.float32), cfg))
    else:
      scale_name = scale_of.get(name)
      scale = by_name[scale_name].get(scale_name) if scale_name else None
      try:
        value = formats.dequantize(st.get(name), scale)
      except ValueError as e:
        raise ValueError(f"{source}: tensor {name!r}: {e}") from None
      pieces = [(official, value)]
    for off, value in pieces:
      if off.startswith("mtp.") and cfg.n_mtp_layers == 0:
        continue
      saw_mtp |= off.startswith("mtp.")
      try:
        placer.put(off, value, source)
      except KeyError:
        raise ValueError(f"{source}: unexpected tensor {name!r} (read as {off!r}) for config {cfg.name!r}: the "
                         "model has no such parameter. Check that the config matches the checkpoint.") from None
  missing = placer.missing()
  if missing and not saw_mtp and all(m.startswith("mtp/") for m in missing):
    log.warning("%s has no mtp.* tensors: loading without the MTP block (mtp_logits will be None).", path)
    placer.specs = dict(placer.specs, mtp=[])
    missing = []
  if missing:
    raise ValueError(f"{path}: checkpoint lacks {len(missing)} parameter(s) the config {cfg.name!r} needs, e.g. "
                     f"{missing[:5]}.")
  return placer


def load_params(path: str | os.PathLike, cfg: ModelConfig, dtype=None) -> dict:
  """Parameters from a checkpoint directory (or one .safetensors file).

  Tensor names may be official (`layers.3.attn.wq_a.weight`) or HF (`model.layers.3.self_attn.q_a_proj.weight`);
  fp8 / fp4 weights with their scales are dequantised exactly. Weights are cast to `dtype` (default
  `cfg.dtype`); mHC, norm, sink, bias and ape tensors stay fp32, `tid2eid` int32.
  """
  placer = read_checkpoint(os.fspath(path), cfg)
  return placer.tree(dtype or cfg.dtype)
