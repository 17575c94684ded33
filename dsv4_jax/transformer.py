"""The whole model: embedding, stream expansion, the layer stack, the head and the MTP block.

Layers are grouped so that compile time does not grow with depth: the longest periodic run of layer
kinds (e.g. Flash's 20 x (HCA, CSA) after three odd layers) is stacked and run under `jax.lax.scan`;
the few other layers are unrolled. A layer's kind is (compress_ratio, hash-routed?).
With `cfg.scan_layers=False` every layer is unrolled, each with its own parameters and caches (no stacked
[reps] axis; MaxText's decode examples run with `scan_layers=false` too): no step indexes stacked weights
(XLA:CPU copies a scanned layer's weights out of the stack on every step), and compile time grows with
depth. `relayout_layers` converts a parameter (or cache) tree between the two layouts; converted
checkpoints are stored per layer and restore into either. Random parameters (`init_params`) are drawn per
leaf of the tree, so the two layouts draw different ones: relay out one tree to compare them.

Parameter tree (plain nested dicts / lists):
    embed [V,D], head [V,D], norm [D], hc_head {fn, base, scale},
    layers: {prefix: [block, ...], stack: [block with leading [reps] axis, ...] (one per period
             position), suffix: [block, ...]},
    mtp: [mtp block, ...]
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dsv4_jax import block, expert_parallel, head, mhc, moe, mtp, params as params_lib, sharding
from dsv4_jax.config import ModelConfig
from dsv4_jax.params import ParamSpec
from dsv4_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """prefix layers (unrolled), then `reps` repetitions of the layers `period` (scanned), then suffix."""
  prefix: tuple[int, ...]
  period: tuple[int, ...]
  reps: int
  suffix: tuple[int, ...]

  def stack_layer(self, position: int, rep: int) -> int:
    """Layer id of period position `position` in repetition `rep`."""
    return self.period[0] + rep * len(self.period) + position

  def locate(self, layer_id: int) -> tuple[str, int, int | None]:
    """("prefix"|"stack"|"suffix", list index, repetition or None) of a main layer."""
    if layer_id in self.prefix:
      return "prefix", self.prefix.index(layer_id), None
    if layer_id in self.suffix:
      return "suffix", self.suffix.index(layer_id), None
    off = layer_id - self.period[0]
    return "stack", off % len(self.period), off // len(self.period)


def layer_kind(cfg: ModelConfig, layer_id: int) -> tuple[int, bool]:
  return cfg.layer_ratio(layer_id), cfg.is_hash_layer(layer_id)


@functools.lru_cache(maxsize=None)
def layer_plan(cfg: ModelConfig) -> LayerPlan:
  """Chooses the split that unrolls the fewest layers (periods of 1 to 4 layers, >= 2 repetitions); every
  layer unrolled when `cfg.scan_layers` is False."""
  n = cfg.n_layers
  if not cfg.scan_layers:
    return LayerPlan(tuple(range(n)), (), 0, ())
  kinds = [layer_kind(cfg, i) for i in range(n)]
  best = LayerPlan(tuple(range(n)), (), 0, ())
  best_cost = n
  for start in range(n):
    for size in range(1, 5):
      reps_max = (n - start) // size
      reps = 0
      while reps < reps_max and all(kinds[start + reps * size + j] == kinds[start + j] for j in range(size)):
        reps += 1
      if reps < 2:
        continue
      end = start + reps * size
      cost = start + (n - end)
      if cost < best_cost:
        best_cost = cost
        best = LayerPlan(tuple(range(start)), tuple(range(start, start + size)), reps, tuple(range(end, n)))
  return best


def relayout_layers(layers: dict, src: ModelConfig, dst: ModelConfig) -> dict:
  """The "layers" tree of parameters (or of a cache, `cache["layers"]`) laid out for `src`'s layer plan,
  rearranged for `dst`'s (e.g. `scan_layers` True -> False): the same per-layer arrays, sliced out of or
  stacked into the scanned group's leading [reps] axis. The two configs must describe the same layers."""
  if (src.n_layers, src.compress_ratios, src.n_hash_layers) != (dst.n_layers, dst.compress_ratios,
                                                               dst.n_hash_layers):
    raise ValueError(f"relayout_layers: {src.name!r} and {dst.name!r} have different layers "
                     f"(n_layers, compress_ratios, n_hash_layers differ); only the layout may change.")
  sp, dp = layer_plan(src), layer_plan(dst)
  if sp == dp:
    return layers

  def one(i):
    part, n, rep = sp.locate(i)
    tree = layers[part][n]
    return tree if rep is None else jax.tree.map(lambda x: x[rep], tree)

  return {"prefix": [one(i) for i in dp.prefix],
          "stack": [jax.tree.map(lambda *xs: jnp.stack(xs), *[one(dp.stack_layer(pos, r)) for r in range(dp.reps)])
                    for pos in range(len(dp.period))],
          "suffix": [one(i) for i in dp.suffix]}


def param_specs(cfg: ModelConfig) -> dict:
  """The ParamSpec tree of the whole model (see the module docstring for its layout)."""
  plan = layer_plan(cfg)
  V, D = cfg.vocab_size, cfg.dim

  def spec(i):
    return block.block_specs(cfg, *layer_kind(cfg, i))

  return {
      "embed": ParamSpec((V, D), ("vocab", "embed"), init=("normal", 1.0)),
      "head": ParamSpec((V, D), ("vocab", "embed")),
      "norm": ParamSpec((D,), ("embed",), "f32", ("normal_plus_one", 0.1)),
      "hc_head": mhc.head_specs(cfg.hc_mult, D),
      "layers": {
          "prefix": [spec(i) for i in plan.prefix],
          "stack": [params_lib.stack_specs(spec(i), plan.reps) for i in plan.period],
          "suffix": [spec(i) for i in plan.suffix],
      },
      "mtp": [mtp.mtp_specs(cfg, cfg.n_layers + j) for j in range(cfg.n_mtp_layers)],
  }


def abstract_params(cfg: ModelConfig, dtype=None):
  """ShapeDtypeStructs of all parameters (no memory): for AOT compilation and counting."""
  return params_lib.abstract_params(param_specs(cfg), dtype or cfg.dtype)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=None, mesh: Mesh | None = None) -> dict:
  """Random parameters for experiments (weights in `dtype`, default the config's compute dtype). On
  accelerators they are drawn on the devices under one jit, each leaf born with the sharding the rules table
  gives its logical axes on `mesh` (the host never holds the model); on CPU the same values come from a
  path that compiles faster (params.init_from_specs). The values do not depend on the mesh.
  `jax.eval_shape(init_params, cfg, key)` gives the shapes without allocating."""
  specs = param_specs(cfg)
  shardings = None if mesh is None else jax.tree.map(
      lambda s: sharding.param_sharding(s.axes, s.shape, mesh), specs, is_leaf=params_lib.is_spec)
  return params_lib.init_from_specs(specs, key, dtype or cfg.dtype, shardings)


# ModelConfig is static (hashable, no arrays): as a pytree with no leaves it can be passed to jax.eval_shape
# and jit directly, e.g. jax.eval_shape(init_params, cfg, key).
jax.tree_util.register_static(ModelConfig)


class ForwardOutput(NamedTuple):
  logits: jax.Array          # [B, S, V] fp32
  mtp_logits: jax.Array      # [B, S-1, V] fp32 (first MTP block), or None without MTP
  hidden: jax.Array          # [B, S, nh, D] final residual streams, before hc_head


def check_tokens(tokens, cfg: ModelConfig) -> None:
  """Raises on ids outside [0, vocab) when the values are known (JAX would clamp them silently)."""
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be int [batch, seq]; got shape {tuple(tokens.shape)}.")
  if tokens.shape[1] == 0:
    raise ValueError("tokens is empty: the sequence length must be >= 1.")
  try:
    t = np.asarray(tokens)
  except jax.errors.TracerArrayConversionError:
    return                     # values unknown under tracing; checked by the caller's jit wrapper
  if not np.issubdtype(t.dtype, np.integer):
    raise TypeError(f"tokens must be an integer array; got dtype {t.dtype}.")
  lo, hi = int(t.min()), int(t.max())
  if lo < 0 or hi >= cfg.vocab_size:
    bad = lo if lo < 0 else hi
    raise ValueError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size}) of config {cfg.name!r}.")


def embed_streams(params: dict, cfg: ModelConfig, tokens: jnp.ndarray) -> jnp.ndarray:
  """tokens [B,S] -> [B,S,nh,D]: the embedding repeated into nh identical residual streams."""
  h = params["embed"][tokens].astype(cfg.dtype)
  h = constrain(h, ("batch", "seq", "act_embed"))
  return jnp.repeat(h[:, :, None, :], cfg.hc_mult, axis=2)


def run_layers(layers: dict, cfg: ModelConfig, X: jnp.ndarray, tokens: jnp.ndarray, remat=False,
               positions: jnp.ndarray | None = None, lengths: jnp.ndarray | None = None, caches: dict | None = None,
               live: int = 0, stats: bool = False, fresh: bool = False):
  """The main stack. X: [B,S,nh,D] -> (X [B,S,nh,D], caches).

  Without caches: the whole sequence from position 0. With `caches` (the cache's "layers" tree): row b
  appends lengths[b] tokens at `positions[b]`; the caches ride the layer loop's carry and each layer
  writes only its new rows (a scanned group's caches are indexed by repetition, never sliced out and
  stacked back). `live`: static bound on the tokens any row holds after the call (see cache.live_bucket).
  `remat`: False, True (recompute each scanned period, and each unrolled layer, in the backward pass) or a
  `jax.checkpoint_policies` policy. `fresh` (static, with caches): every row's cache is empty and positions start at 0 (a prompt
  that runs context-parallel over the mesh's `sequence` axis). `stats` (training): also return the layers' `moe.MoEStats` as a third element, a tree laid out
  like `layers` (a scanned position's stats carry the leading [reps] axis, as its parameters).
  """
  from dsv4_jax.cache import LayerCache          # cache.py builds on this module's layer plan
  plan = layer_plan(cfg)

  def apply(p, i, X, c, rep=None):
    view = None if c is None else LayerCache(c, rep, live, cfg, fresh)
    X, view, *st = block.block(p, cfg, cfg.layer_ratio(i), X, tokens, positions, lengths, view, stats=stats)
    return X, None if view is None else view.tree, st[0] if stats else None

  def unrolled(p, i, X, c):
    if not remat or c is not None:
      return apply(p, i, X, c)
    return jax.checkpoint(lambda p, X: apply(p, i, X, None), policy=None if remat is True else remat)(p, X)

  new = None if caches is None else {"prefix": [], "stack": [], "suffix": []}
  moe_stats = {"prefix": [], "stack": [], "suffix": []}
  for n, (p, i) in enumerate(zip(layers["prefix"], plan.prefix)):
    X, c, st = unrolled(p, i, X, None if caches is None else caches["prefix"][n])
    moe_stats["prefix"].append(st)
    if new is not None:
      new["prefix"].append(c)
  if plan.reps:
    # Inference under expert parallelism: each position's routed experts stay out of the scanned slices and
    # enter the MoE as the whole stack plus the repetition (moe.Stacked), indexed inside the
    # shard_map, so no step copies a layer's experts out of the stack at its boundary.
    stacked = [None] * len(plan.period)
    scanned = list(layers["stack"])
    if caches is not None and expert_parallel.active(sharding.active_mesh()[0]):
      for n, p in enumerate(scanned):
        if "experts" in p.get("ffn", {}):
          stacked[n] = p["ffn"]["experts"]
          scanned[n] = {**p, "ffn": {k: v for k, v in p["ffn"].items() if k != "experts"}}

    def body(carry, xs):
      X, cs = carry
      ps, rep = xs
      out, sts = [], []
      for n, (p, i) in enumerate(zip(ps, plan.period)):
        if stacked[n] is not None:
          p = {**p, "ffn": {**p["ffn"], "experts": moe.Stacked(stacked[n], rep)}}
        X, c, st = apply(p, i, X, None if cs is None else cs[n], rep)
        out.append(c)
        sts.append(st)
      return (X, None if cs is None else out), (sts if stats else None)
    if remat:
      body = jax.checkpoint(body, policy=None if remat is True else remat)
    stack = None if caches is None else list(caches["stack"])
    (X, stack), moe_stats["stack"] = jax.lax.scan(body, (X, stack), (scanned, jnp.arange(plan.reps)))
    if new is not None:
      new["stack"] = stack
  for n, (p, i) in enumerate(zip(layers["suffix"], plan.suffix)):
    X, c, st = unrolled(p, i, X, None if caches is None else caches["suffix"][n])
    moe_stats["suffix"].append(st)
    if new is not None:
      new["suffix"].append(c)
  return (X, new, moe_stats) if stats else (X, new)


def forward(params: dict, cfg: ModelConfig, tokens: jnp.ndarray, remat: bool = False) -> ForwardOutput:
  """Teacher-forced forward of a sequence starting at position 0.

  tokens: int [B, S]. Returns ForwardOutput(logits [B,S,V] fp32, mtp_logits [B,S-1,V] fp32, hidden).
  Pure and jit-able with `cfg` static: `jax.jit(forward, static_argnums=1)`.
  """
  check_tokens(tokens, cfg)
  tokens = jnp.asarray(tokens, jnp.int32)
  X, _ = run_layers(params["layers"], cfg, embed_streams(params, cfg, tokens), tokens, remat)
  logits = head.logits(X, params["hc_head"], params["norm"], params["head"], cfg)
  mtp_logits = None
  if cfg.n_mtp_layers and params["mtp"] and tokens.shape[1] < 2:
    mtp_logits = jnp.zeros((tokens.shape[0], 0, cfg.vocab_size), jnp.float32)
  elif cfg.n_mtp_layers and params["mtp"]:
    mtp_logits = mtp.mtp_forward(params["mtp"][0], cfg, cfg.n_layers, params["embed"], params["head"], X, tokens)
  return ForwardOutput(logits, mtp_logits, X)


class HiddenOutput(NamedTuple):
  """The training forward's result: the heads' inputs, not their [.., V] logits."""
  hidden: jax.Array          # [B, S, D] norm(hc_head(X)), the output head's input
  mtp_hidden: jax.Array      # [B, S-1, D] the first MTP block's head input (position i predicts token i+2),
                             # or None without MTP parameters or for S < 2
  moe_stats: dict            # {"layers": run_layers' stats tree, "mtp": [moe.MoEStats, ...]}


def forward_hidden(params: dict, cfg: ModelConfig, tokens: jnp.ndarray, remat=False) -> HiddenOutput:
  """`forward` up to the heads' inputs, with every MoE layer's routing statistics: for a loss that
  applies the head in chunks of the sequence (dsv4_jax/train.py) instead of materialising [B,S,V].
  `remat` as in `run_layers`."""
  check_tokens(tokens, cfg)
  tokens = jnp.asarray(tokens, jnp.int32)
  X, _, layer_stats = run_layers(params["layers"], cfg, embed_streams(params, cfg, tokens), tokens, remat,
                                 stats=True)
  hidden = head.final_hidden(X, params["hc_head"], params["norm"], cfg)
  mtp_hidden, mtp_stats = None, []
  if cfg.n_mtp_layers and params["mtp"] and tokens.shape[1] >= 2:
    p = params["mtp"][0]
    Xm, st = mtp.mtp_streams(p, cfg, cfg.n_layers, params["embed"], X, tokens, stats=True)
    mtp_hidden, mtp_stats = head.final_hidden(Xm, p["hc_head"], p["norm"], cfg), [st]
  return HiddenOutput(hidden, mtp_hidden, {"layers": layer_stats, "mtp": mtp_stats})


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
  """Parameter counts from the specs (no memory).

  total: main model without MTP; total_with_mtp; active: parameters a token passes through in the main
  model's matmuls (all but the unchosen routed experts, excluding the embedding lookup table and MTP),
  the convention of the DeepSeek-V4 report (Flash 284B / 13B, Pro 1.6T / 49B).
  """
  specs = param_specs(cfg)
  main = {k: v for k, v in specs.items() if k != "mtp"}

  count = params_lib.count
  total, routed = count(main), count(main, lambda path: "/experts/" in path)
  idle = routed * (cfg.n_routed_experts - cfg.n_activated_experts) // cfg.n_routed_experts
  return {
      "total": total,
      "total_with_mtp": count(specs),
      "active": total - idle - count(main["embed"]) - count(main, lambda path: "tid2eid" in path),
  }
