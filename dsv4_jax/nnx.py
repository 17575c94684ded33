"""DeepSeek-V4 as a Flax NNX module over the functional core (dsv4_jax/transformer.py).

    from flax import nnx
    from dsv4_jax.nnx import DeepseekV4
    model = DeepseekV4(cfg, rngs=nnx.Rngs(0))                      # under sharding.use_mesh(mesh): sharded
    model = DeepseekV4.from_pretrained(ckpt_dir, cfg, mesh=mesh)   # safetensors, or launch.convert's Orbax
    out = model(tokens)                                             # transformer.ForwardOutput, as forward()
    res = model.generate(prompts, max_new_tokens=32)                # generation.GenerateResult

The module has no layer code. Its attributes are the functional parameter tree (embed, head, norm,
hc_head, layers {prefix, stack, suffix}, mtp: transformer.py's layout, plain dicts and lists) with every
leaf an `nnx.Param` holding the very same array and, as `out_sharding` metadata, the leaf's logical axes
(its ParamSpec). So `nnx.state(model)` has the functional tree's paths one for one ("layers/stack/0/attn/
wq_a"; a list index is an int key there), `model.params` is the functional tree (no copy), and
`DeepseekV4(cfg, params=params)` / `model.set_params(params)` go the other way. A `QArray` (fp8 / fp4
weight) is one Param, as it is one leaf for the optimizer. Under `sharding.use_mesh(mesh)`,
`nnx.get_partition_spec(nnx.state(model))` resolves those names through the same rules as the arrays'
placement (dsv4_jax/sharding.py).

Fine-tuning the Flax way runs the functional step (train.py: its gradients over the trainable leaves, the
Muon / AdamW / frozen partition, the routers' bias update):

    model = DeepseekV4(cfg, rngs=nnx.Rngs(0), dtype=tc.param_dtype)   # master weights in param_dtype
    optimizer = nnx.Optimizer(model, make_optimizer(tc, model), wrt=nnx.Param)
    metrics = train_step(model, optimizer, batch, tc)                  # nnx.jit; updates both in place
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsv4_jax import generation, params as params_lib, sharding, train, transformer, weights
from dsv4_jax.config import ModelConfig
from dsv4_jax.qarray import QArray

_FORWARD = jax.jit(transformer.forward, static_argnums=(1, 3))


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _is_qarray(x) -> bool:
  return isinstance(x, QArray)


class DeepseekV4(nnx.Module):
  """The whole model; `cfg` and `mesh` are static, the parameters are `nnx.Param`s (see the module
  docstring for their layout)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, dtype=None, mesh=None,
               params: dict | None = None):
    """Random weights `transformer.init_params(cfg, rngs.params(), dtype, mesh)` (the same jit-with-
    shardings init), or the given functional `params` tree, kept as is. `mesh` (default: the active one,
    `sharding.use_mesh`) places the random weights and is entered by `generate`."""
    self.cfg = cfg
    self.mesh = mesh if mesh is not None else sharding.active_mesh()[0]
    if params is None:
      if rngs is None:
        raise ValueError("DeepseekV4: give rngs=nnx.Rngs(seed) for random weights, or params= a parameter tree.")
      params = transformer.init_params(cfg, rngs.params(), dtype, mesh=self.mesh)
    specs = train._specs_by_path(params, cfg)              # raises naming a missing or misshapen leaf
    # eager_sharding=False: the arrays are already placed (init_params / load_params); Flax's eager
    # sharding would re-place them by a plain rename of `out_sharding`, which knows neither the mesh's
    # size-1 axes nor non-dividing dimensions (sharding.py), and fails without a mesh.
    tree = jax.tree_util.tree_map_with_path(
        lambda p, v: nnx.Param(v, out_sharding=specs[params_lib.path_str(p)].axes, eager_sharding=False),
        params, is_leaf=_is_qarray)
    self._tree_keys = tuple(tree)                           # embed, head, norm, hc_head, layers, mtp
    for name, sub in tree.items():
      setattr(self, name, sub if _is_variable(sub) else nnx.data(sub))

  @classmethod
  def from_pretrained(cls, path, cfg: ModelConfig, *, mesh=None, dtype=None, quantized: bool = True):
    """`weights.load_params(path, cfg, dtype, mesh, quantized)`: released safetensors (official or HF
    names) or a `launch.convert` checkpoint, each leaf placed on `mesh` (default: the active one)."""
    mesh = mesh if mesh is not None else sharding.active_mesh()[0]
    return cls(cfg, mesh=mesh, params=weights.load_params(path, cfg, dtype, mesh, quantized))

  def _variables(self) -> dict:
    return {name: getattr(self, name) for name in self._tree_keys}

  @property
  def params(self) -> dict:
    """The functional parameter tree: the Params' own arrays (tracers inside `nnx.jit`)."""
    return jax.tree.map(lambda v: v.get_value(), self._variables(), is_leaf=_is_variable)

  def set_params(self, params: dict) -> None:
    """Sets every Param from a functional tree of the same layout (e.g. `train.update_router_bias`'s)."""
    jax.tree.map(lambda var, v: var.set_value(v), self._variables(), params, is_leaf=_is_variable)

  def __call__(self, tokens, remat=False) -> transformer.ForwardOutput:
    """`transformer.forward(self.params, cfg, tokens, remat)`, jitted (inlined inside an outer jit)."""
    transformer.check_tokens(tokens, self.cfg)
    return _FORWARD(self.params, self.cfg, tokens, remat)

  def generate(self, prompts, max_new_tokens: int, **kwargs) -> generation.GenerateResult:
    """`generation.generate(self.params, cfg, prompts, max_new_tokens, **kwargs)`: cached prefill and
    decode, under the module's mesh when no other is active."""
    on_mesh = self.mesh is not None and sharding.active_mesh()[0] is None
    with sharding.use_mesh(self.mesh) if on_mesh else contextlib.nullcontext():
      return generation.generate(self.params, self.cfg, prompts, max_new_tokens, **kwargs)


def to_params(state: nnx.State) -> dict:
  """The functional tree of a `DeepseekV4`'s `nnx.state` (or its pure dict): int-keyed levels back to the
  lists they were (layers' prefix / stack / suffix, mtp); arrays as they are."""
  pure = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else dict(state)
  as_list = lambda d: [d[i] for i in sorted(d)]
  layers = pure.get("layers", {})
  return {**pure, "layers": {part: as_list(layers.get(part, {})) for part in ("prefix", "stack", "suffix")},
          "mtp": as_list(pure.get("mtp", {}))}


# ---- fine-tuning ----------------------------------------------------------------------------------

def make_optimizer(train_cfg: train.TrainConfig, model: DeepseekV4) -> optax.GradientTransformation:
  """`train.make_optimizer` (clipping, Muon / AdamW / frozen by `train.OPTIMIZER_RULES`) with its labels laid
  out like `nnx.state(model, nnx.Param)`, the tree `nnx.Optimizer` hands to optax. Raises unless the module
  holds master weights as `train.init_train_state` makes them (dense, "weight" leaves in param_dtype)."""
  dt = jnp.dtype(train_cfg.param_dtype)
  want = jax.eval_shape(lambda p: train._cast_params(p, model.cfg, dt), model.params)
  have = jax.tree_util.tree_flatten_with_path(model.params, is_leaf=_is_qarray)[0]
  for (path, v), w in zip(have, jax.tree.leaves(want)):
    if _is_qarray(v) or v.dtype != w.dtype:
      raise ValueError(f"{params_lib.path_str(path)} is {'quantised' if _is_qarray(v) else v.dtype}, but training "
                       f"keeps dense master weights in param_dtype={train_cfg.param_dtype}: build the module with "
                       f"dtype={train_cfg.param_dtype!r} (from_pretrained(..., dtype={train_cfg.param_dtype!r}, "
                       "quantized=False)).")
  return train.make_optimizer(train_cfg, nnx.as_pure(nnx.state(model, nnx.Param)))


def _param_state(model: DeepseekV4, tree: dict) -> nnx.State:
  """A functional-layout tree (gradients) as `nnx.state(model, nnx.Param)`: new Params, matched by path."""
  by_path = {params_lib.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_qarray)[0]}
  return jax.tree_util.tree_map_with_path(lambda p, var: var.replace(by_path[params_lib.path_str(p)]),
                                          nnx.state(model, nnx.Param), is_leaf=_is_variable)


@nnx.jit(static_argnames="train_cfg")
def train_step(model: DeepseekV4, optimizer: nnx.Optimizer, batch: dict, train_cfg: train.TrainConfig) -> dict:
  """One optimizer step on `batch` {"tokens" [B,S], "loss_mask" [B,S]}, in place on `model` and `optimizer`
  (built with `make_optimizer(train_cfg, model)`, wrt=nnx.Param) -> metrics. The functional
  `train.train_step`'s step: `train.compute_grads` (grad_accum_steps micro-batches, zeros for frozen leaves),
  `optimizer.update`, then `train.update_router_bias` from the batch's expert loads."""
  tc, cfg = train_cfg, model.cfg
  train.check_batch(batch, cfg, tc)
  step = optimizer.step.get_value().astype(jnp.int32)                       # nnx counts in uint32
  state = train.TrainState(step, model.params, None, cfg, tc, optimizer.tx)    # what compute_grads reads
  grads, metrics, loads = train.compute_grads(state, batch)
  optimizer.update(model, _param_state(model, grads))
  model.set_params(train.update_router_bias(model.params, loads, tc.bias_update_gamma))
  return dict(metrics, grad_norm=optax.tree.norm(grads), learning_rate=train.make_schedule(tc)(step),
              moe_max_violation=train._max_violation(loads))
