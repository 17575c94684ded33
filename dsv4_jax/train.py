"""The fine-tuning step: losses, DeepSeek's optimizer (Muon + AdamW), aux-loss-free balancing
(docs/architecture.md §6, docs/training.md).

    from dsv4_jax.train import TrainConfig, loss_fn, make_optimizer, init_train_state, train_step
    loss, metrics = loss_fn(params, cfg, batch, train_cfg)       # {"tokens" [B,S] int, "loss_mask" [B,S]}
    tx = make_optimizer(train_cfg, params)
    state = init_train_state(params, tx, cfg, train_cfg)
    state, metrics = train_step(state, batch)                    # jitted here; the state is donated

Loss (all means over the batch, so gradient accumulation gives the full batch's gradient):
    ce      next-token cross-entropy over the targets with loss_mask: loss_mask[b, t] weights the prediction
            of tokens[b, t] from tokens[b, :t] (loss_mask[:, 0] is never used)
    mtp_ce  the MTP block's cross-entropy: position t predicts tokens[b, t+2], weighted by loss_mask[b, t+2]
    balance sum over score-routed MoE layers (main and MTP) of the sequence-wise V3 statistic
            sum_i f_i P_i (moe.MoEStats), averaged over sequences
    loss = ce + mtp_weight * mtp_ce + balance_weight * balance
The head is applied to `loss_chunk` positions at a time under `jax.checkpoint`: [B, S, V] fp32 logits
never exist, in the forward or the backward pass.

Parameters: the state keeps fp32 master weights (`param_dtype`); the loss casts the "weight"-kind leaves
to `compute_dtype` (the fp32 kinds, mHC / norms / sinks / biases / ape, stay fp32, as in inference).
`OPTIMIZER_RULES` is the one table from a parameter path to its optimizer: Muon (dsv4_jax/muon.py) for
matrices, AdamW for the rest, "frozen" for what the gradient does not move: hash tables (int) and the
routers' bias, which moves by `bias += gamma * sign(mean(load) - load)` after each step, from the expert
loads of the whole batch (summed over the mesh by XLA when the batch is sharded).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import struct

from dsv4_jax import head, muon, params as params_lib, transformer
from dsv4_jax.config import ModelConfig
from dsv4_jax.qarray import QArray, dense

F32 = jnp.float32
REMAT_POLICIES = {
    "none": False,
    "full": True,                                               # keep only each scanned period's input
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Training hyper-parameters. Defaults follow the V4 report where it gives one (architecture.md §6)."""
  learning_rate: float = 2.7e-4          # peak, after warm-up (Flash pre-training; lower it to fine-tune)
  min_lr_ratio: float = 0.1              # cosine decays to learning_rate * min_lr_ratio at total_steps
  warmup_steps: int = 100
  total_steps: int = 1000
  weight_decay: float = 0.1              # decoupled, Muon and AdamW
  grad_clip_norm: float = 1.0            # global norm; 0 disables
  grad_accum_steps: int = 1              # micro-batches per optimizer step (divides batch_size)
  batch_size: int = 8                    # sequences per optimizer step
  seq_len: int = 512
  mtp_weight: float = 0.3                # 0.1 in the report's decay phase
  balance_weight: float = 1e-4
  bias_update_gamma: float = 1e-3
  muon_momentum: float = 0.95
  muon_rms_scale: float = 0.18
  adam_b1: float = 0.9
  adam_b2: float = 0.95
  adam_eps: float = 1e-20
  loss_chunk: int = 512                  # positions per head application in the chunked cross-entropy
  remat: str = "full"                    # one of REMAT_POLICIES
  compute_dtype: str = "bfloat16"
  param_dtype: str = "float32"           # master weights and optimizer moments
  freeze: str = ""                       # comma-separated regexes: matching parameter paths are not trained
  seed: int = 0

  def __post_init__(self):
    def bad(field, expected):
      raise ValueError(f"TrainConfig: {field}={getattr(self, field)!r} is invalid; expected {expected}.")

    for f in ("warmup_steps", "total_steps", "grad_accum_steps", "batch_size", "seq_len", "loss_chunk"):
      if int(getattr(self, f)) < (0 if f == "warmup_steps" else 1):
        bad(f, ">= 0" if f == "warmup_steps" else ">= 1")
    if self.warmup_steps > self.total_steps:
      bad("warmup_steps", f"<= total_steps={self.total_steps}")
    if self.batch_size % self.grad_accum_steps:
      bad("batch_size", f"a multiple of grad_accum_steps={self.grad_accum_steps}")
    for f in ("learning_rate", "weight_decay", "grad_clip_norm", "mtp_weight", "balance_weight",
              "bias_update_gamma", "min_lr_ratio"):
      if float(getattr(self, f)) < 0:
        bad(f, ">= 0")
    if self.remat not in REMAT_POLICIES:
      bad("remat", f"one of {sorted(REMAT_POLICIES)}")
    for f in ("compute_dtype", "param_dtype"):
      if getattr(self, f) not in _DTYPES:
        bad(f, f"one of {_DTYPES}")
    for pattern in self.freeze_patterns:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"TrainConfig: freeze pattern {pattern!r} is not a regular expression ({e}).") \
            from None

  @property
  def freeze_patterns(self) -> tuple[str, ...]:
    return tuple(p.strip() for p in self.freeze.split(",") if p.strip())

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
    """From a mapping or an ml_collections ConfigDict; unknown keys are an error."""
    d = d.to_dict() if hasattr(d, "to_dict") else dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"Unknown TrainConfig field(s) {unknown}; known fields: {sorted(known)}.")
    return cls(**d)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def train_config_dict(**overrides):
  """The defaults as an ml_collections.ConfigDict (for `--train.x=...` flags); `TrainConfig.from_dict` reads
  it back."""
  import ml_collections
  return ml_collections.ConfigDict(TrainConfig(**overrides).to_dict())


# ---- which optimizer trains which parameter -------------------------------------------------------

# (regex on the parameter path "a/b/c", optimizer); the first match wins. docs/architecture.md §6: Muon for
# all matrices except the embedding, the head, the mHC static biases and gating factors and the RMSNorm
# weights; every 1-D parameter (attention sinks) to AdamW; experts orthogonalised one by one (muon.py).
OPTIMIZER_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|/)gate/tid2eid$", "frozen"),                     # hash routing table (int)
    (r"(^|/)gate/bias$", "frozen"),                        # aux-loss-free bias: moved by update_router_bias
    (r"^(embed|head)$", "adamw"),
    (r"(^|/)(hc_head|hc_attn|hc_ffn)/(base|scale)$", "adamw"),
    (r"(^|/)(norm|attn_norm|ffn_norm|q_norm|kv_norm|enorm|hnorm)$", "adamw"),
    (r"(^|/)attn_sink$", "adamw"),
    (r"(^|/)compressor/ape$", "adamw"),                    # additive position bias [m, c], not a linear map
    (r".", "muon"),                                        # every other weight is a matrix [..., out, in]
)
_BATCH_AXES = ("layers", "experts")                        # leading axes that stack independent matrices


def _leaf_path_and_shape(params):
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QArray))[0]
  return [(params_lib.path_str(p), tuple(v.shape)) for p, v in flat]


def _n_batch_axes(path: str) -> int:
  """Leading stacked axes of a leaf: "layers" for a scanned position, "experts" for routed experts."""
  return int(path.startswith("layers/stack/")) + int("/experts/" in path)


def optimizer_label(path: str, shape: tuple[int, ...], freeze: tuple[str, ...] = ()) -> str:
  """"muon" | "adamw" | "frozen" for the parameter at `path` ("layers/stack/0/attn/wq_a") of `shape`."""
  if any(re.search(p, path) for p in freeze):
    return "frozen"
  label = next(lab for pattern, lab in OPTIMIZER_RULES if re.search(pattern, path))
  if label != "muon":
    return label
  rank = len(shape) - _n_batch_axes(path)
  if rank < 2:
    return "adamw"
  if rank > 2:
    raise ValueError(f"{path}: shape {shape} is neither a matrix nor a stack of matrices over {_BATCH_AXES}; "
                     "add a rule for it to OPTIMIZER_RULES.")
  return label


def param_labels(params, freeze: tuple[str, ...] = ()):
  """The tree of optimizer labels, shaped like `params` (a QArray counts as one leaf)."""
  labels = [optimizer_label(p, s, freeze) for p, s in _leaf_path_and_shape(params)]
  treedef = jax.tree.structure(params, is_leaf=lambda x: isinstance(x, QArray))
  return jax.tree.unflatten(treedef, labels)


def make_schedule(train_cfg: TrainConfig) -> optax.Schedule:
  """Linear warm-up from 0 to learning_rate, then cosine decay to learning_rate * min_lr_ratio."""
  tc = train_cfg
  return optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, tc.warmup_steps, tc.total_steps,
                                            tc.learning_rate * tc.min_lr_ratio)


def make_optimizer(train_cfg: TrainConfig, params) -> optax.GradientTransformation:
  """Global-norm clipping, then Muon / AdamW / nothing per `param_labels(params)`, one shared schedule.

  `params` gives the tree structure and the paths (quantised leaves count as one leaf, as after
  `init_train_state` dequantises them). Gradient accumulation is in `train_step` (grad_accum_steps)."""
  tc = train_cfg
  labels = param_labels(params, tc.freeze_patterns)
  schedule = make_schedule(tc)
  trainable = jax.tree.map(lambda lab: lab != "frozen", labels)
  clip = optax.clip_by_global_norm(tc.grad_clip_norm) if tc.grad_clip_norm else optax.identity()
  return optax.chain(
      optax.masked(clip, trainable),
      optax.multi_transform({
          "muon": muon.muon(schedule, tc.muon_momentum, tc.weight_decay, tc.muon_rms_scale),
          "adamw": optax.adamw(schedule, b1=tc.adam_b1, b2=tc.adam_b2, eps=tc.adam_eps,
                               weight_decay=tc.weight_decay),
          "frozen": optax.set_to_zero(),
      }, labels))


# ---- state ----------------------------------------------------------------------------------------

@struct.dataclass
class TrainState:
  """step: int32 [] optimizer steps taken; params: the model's tree in fp32 (`param_dtype`), tid2eid int32,
  the routers' bias at their usual paths (.../ffn/gate/bias); opt_state: tx's state (moments shaped, and
  sharded, like their parameters). cfg, train_cfg and tx are static."""
  step: jax.Array
  params: Any
  opt_state: Any
  cfg: ModelConfig = struct.field(pytree_node=False)
  train_cfg: TrainConfig = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)


def _specs_by_path(params, cfg: ModelConfig) -> dict:
  """path -> ParamSpec for every leaf of `params`; raises naming what does not match the config."""
  specs = transformer.param_specs(cfg)
  if isinstance(params, dict) and "mtp" in params:
    specs["mtp"] = specs["mtp"][:len(params["mtp"])]       # a checkpoint may come without its MTP block
  flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=params_lib.is_spec)[0]
  by_path = {params_lib.path_str(p): s for p, s in flat}
  have = dict(_leaf_path_and_shape(params))
  for name in sorted(set(by_path) - set(have))[:1]:
    raise ValueError(f"params: missing parameter {name} that config {cfg.name!r} needs.")
  for name in sorted(set(have) - set(by_path))[:1]:
    raise ValueError(f"params: unexpected parameter {name} for config {cfg.name!r}.")
  for name, spec in by_path.items():
    if have[name] != spec.shape:
      raise ValueError(f"params: {name} has shape {have[name]}, config {cfg.name!r} expects {spec.shape}.")
  return by_path


def _cast_params(params, cfg: ModelConfig, dtype):
  """"weight"-kind leaves (QArrays dequantised) to `dtype`, "f32" kinds to fp32, int tables unchanged."""
  specs = _specs_by_path(params, cfg)

  def cast(path, v):
    kind = specs[params_lib.path_str(path)].kind
    return v if kind == "int" else dense(v, dtype if kind == "weight" else F32)

  return jax.tree_util.tree_map_with_path(cast, params, is_leaf=lambda x: isinstance(x, QArray))


def init_train_state(params, tx: optax.GradientTransformation, cfg: ModelConfig,
                     train_cfg: TrainConfig) -> TrainState:
  """Master weights in `param_dtype` (quantised checkpoints dequantised) and the optimizer state."""
  if train_cfg.mtp_weight > 0 and cfg.n_mtp_layers and not params.get("mtp"):
    raise ValueError(f"mtp_weight={train_cfg.mtp_weight} but the parameters have no MTP block (a checkpoint "
                     "without mtp.* weights?); set mtp_weight=0.")
  params = _cast_params(params, cfg, jnp.dtype(train_cfg.param_dtype))
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), cfg, train_cfg, tx)


# ---- loss -----------------------------------------------------------------------------------------

def check_batch(batch, cfg: ModelConfig, train_cfg: TrainConfig | None = None) -> None:
  """Raises on a batch the loss cannot use (shapes are static, so this also runs under jit)."""
  if not isinstance(batch, Mapping) or not {"tokens", "loss_mask"} <= set(batch):
    have = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
    raise ValueError(f"batch must be a dict with 'tokens' and 'loss_mask' [batch, seq]; got {have}.")
  tokens, mask = batch["tokens"], batch["loss_mask"]
  if len(tokens.shape) != 2 or tuple(mask.shape) != tuple(tokens.shape):
    raise ValueError(f"batch: tokens {tuple(tokens.shape)} and loss_mask {tuple(mask.shape)} must both be "
                     "[batch, seq] of the same shape.")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise TypeError(f"batch: tokens must be integer ids; got dtype {tokens.dtype}.")
  S = tokens.shape[1]
  if S < 2:
    raise ValueError(f"batch: sequence length {S}; next-token training needs at least 2 tokens.")
  if S > cfg.max_seq_len:
    raise ValueError(f"batch: sequence length {S} is past config {cfg.name!r}'s "
                     f"max_seq_len={cfg.max_seq_len}.")
  if train_cfg is not None and tokens.shape[0] % train_cfg.grad_accum_steps:
    raise ValueError(f"batch: {tokens.shape[0]} sequences do not split into grad_accum_steps="
                     f"{train_cfg.grad_accum_steps} equal micro-batches.")


def chunked_cross_entropy(x: jnp.ndarray, head_w: jnp.ndarray, cfg: ModelConfig, targets: jnp.ndarray,
                          mask: jnp.ndarray, chunk: int) -> jnp.ndarray:
  """sum over positions of mask * CE(head(x), targets). x: [B,T,D] head inputs, targets [B,T] int, mask
  [B,T] fp32 -> fp32 []. The head runs on `chunk` positions at a time, recomputed in the backward pass, so
  at most [B, chunk, V] fp32 logits are live."""
  B, T, D = x.shape
  if T == 0:
    return jnp.zeros((), F32)
  c = min(chunk, T)
  n = -(-T // c)
  pad = n * c - T
  x, targets, mask = (jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in (x, targets, mask))
  split = lambda a: jnp.swapaxes(a.reshape(B, n, c, *a.shape[2:]), 0, 1)        # [n, B, c, ...]

  @jax.checkpoint
  def chunk_ce(xc, yc, mc):
    logits = head.project(xc, head_w, cfg)                                      # [B,c,V] fp32
    tgt = jnp.take_along_axis(logits, yc[..., None], axis=-1)[..., 0]
    return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - tgt) * mc)

  total, _ = jax.lax.scan(lambda acc, xs: (acc + chunk_ce(*xs), None), jnp.zeros((), F32),
                          (split(x), split(targets), split(mask)))
  return total


def _score_layer_stats(params, stats) -> dict:
  """{layer path ("layers/stack/0", "mtp/0"): MoEStats} of the score-routed MoE layers (hash layers have
  no bias and are not balanced)."""
  out = {}
  for part in ("prefix", "stack", "suffix"):
    for n, (p, st) in enumerate(zip(params["layers"][part], stats["layers"][part])):
      if "bias" in p["ffn"]["gate"]:
        out[f"layers/{part}/{n}"] = st
  for j, st in enumerate(stats["mtp"]):
    out[f"mtp/{j}"] = st
  return out


def _denominators(batch) -> dict:
  """What the batch means are over: masked targets of the main and the MTP loss, and sequences."""
  mask = jnp.asarray(batch["loss_mask"], F32)
  return {"ce": jnp.maximum(jnp.sum(mask[:, 1:]), 1.0), "mtp": jnp.maximum(jnp.sum(mask[:, 2:]), 1.0),
          "seq": jnp.asarray(mask.shape[0], F32)}


def _loss(params, cfg: ModelConfig, batch, tc: TrainConfig, denom: dict):
  """The loss of (a micro-batch of) the batch with the full batch's denominators ->
  (loss, (metrics, {layer path: expert load [.., E]}))."""
  ccfg = dataclasses.replace(cfg, dtype=tc.compute_dtype)
  p = _cast_params(params, ccfg, jnp.dtype(tc.compute_dtype))
  tokens = jnp.asarray(batch["tokens"], jnp.int32)
  mask = jnp.asarray(batch["loss_mask"], F32)
  out = transformer.forward_hidden(p, ccfg, tokens, remat=REMAT_POLICIES[tc.remat])
  ce = chunked_cross_entropy(out.hidden[:, :-1], p["head"], ccfg, tokens[:, 1:], mask[:, 1:], tc.loss_chunk)
  metrics = {"ce": ce / denom["ce"], "tokens": jnp.sum(mask[:, 1:])}
  loss = metrics["ce"]
  if tc.mtp_weight:
    if out.mtp_hidden is None:
      raise ValueError(f"mtp_weight={tc.mtp_weight} but there is no MTP block to train (no mtp parameters, "
                       "or config n_mtp_layers=0); set mtp_weight=0.")
    mtp = chunked_cross_entropy(out.mtp_hidden[:, :-1], p["head"], ccfg, tokens[:, 2:], mask[:, 2:],
                                tc.loss_chunk)
    metrics["mtp_ce"] = mtp / denom["mtp"]
    loss = loss + tc.mtp_weight * metrics["mtp_ce"]
  layers = _score_layer_stats(params, out.moe_stats)
  metrics["balance"] = sum((jnp.sum(st.balance) for st in layers.values()), jnp.zeros((), F32)) / denom["seq"]
  if tc.balance_weight:
    loss = loss + tc.balance_weight * metrics["balance"]
  metrics["loss"] = loss
  return loss, (metrics, {k: st.load for k, st in layers.items()})


def loss_fn(params, cfg: ModelConfig, batch, train_cfg: TrainConfig):
  """(loss [] fp32, metrics {"loss", "ce", "mtp_ce" (with mtp_weight), "balance", "tokens"}) of one batch.
  Pure and jit-able with cfg and train_cfg static; see the module docstring for the terms."""
  check_batch(batch, cfg)
  loss, (metrics, _) = _loss(params, cfg, batch, train_cfg, _denominators(batch))
  return loss, metrics


# ---- the step -------------------------------------------------------------------------------------

def update_router_bias(params, loads: dict, gamma: float):
  """bias += gamma * sign(mean(load) - load) for every layer in `loads` ({layer path: [.., E] counts});
  a scanned position's [reps, E] loads move its [reps, E] biases row by row."""
  def leaf(path, v):
    key = params_lib.path_str(path)
    if not key.endswith("/ffn/gate/bias"):
      return v
    load = loads.get(key[:-len("/ffn/gate/bias")])
    if load is None:
      return v
    step = gamma * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
    return (v + step).astype(v.dtype)
  return jax.tree_util.tree_map_with_path(leaf, params)


def _max_violation(loads: dict) -> jnp.ndarray:
  """MaxVio: (max load - mean load) / mean load, averaged over the score-routed layers."""
  v = [jnp.mean(jnp.max(l, -1) / jnp.maximum(jnp.mean(l, -1), 1e-9) - 1.0) for l in loads.values()]
  return jnp.mean(jnp.stack(v)) if v else jnp.zeros((), F32)


def compute_grads(state: TrainState, batch):
  """The batch loss's gradient w.r.t. the trainable leaves (zeros for the frozen ones), summed over
  grad_accum_steps micro-batches -> (grads like state.params, loss_fn's metrics, {layer path: expert load}).
  Pure; `train_step` applies it."""
  tc, cfg, params = state.train_cfg, state.cfg, state.params
  leaves, treedef = jax.tree.flatten(params)
  labels = jax.tree.leaves(param_labels(params, tc.freeze_patterns))
  live = [i for i, lab in enumerate(labels) if lab != "frozen"]
  denom = _denominators(batch)

  def micro_loss(train_leaves, mb):
    full = list(leaves)
    for i, v in zip(live, train_leaves):
      full[i] = v
    return _loss(jax.tree.unflatten(treedef, full), cfg, mb, tc, denom)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
  train_leaves = [leaves[i] for i in live]
  A = tc.grad_accum_steps
  if A == 1:
    (_, (metrics, loads)), g = grad_fn(train_leaves, batch)
  else:
    micro = {k: jnp.reshape(batch[k], (A, -1) + tuple(batch[k].shape[1:])) for k in ("tokens", "loss_mask")}

    def body(acc, mb):
      (_, aux), g = grad_fn(train_leaves, mb)
      return jax.tree.map(jnp.add, acc, (g, aux)), None

    (_, aux), g = jax.eval_shape(grad_fn, train_leaves, jax.tree.map(lambda a: a[0], micro))
    zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (g, aux))
    (g, (metrics, loads)), _ = jax.lax.scan(body, zero, micro)
  full = [jnp.zeros_like(v) for v in leaves]
  for i, v in zip(live, g):
    full[i] = v
  return jax.tree.unflatten(treedef, full), metrics, loads


def _train_step(state: TrainState, batch):
  tc = state.train_cfg
  check_batch(batch, state.cfg, tc)
  grads, metrics, loads = compute_grads(state, batch)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  params = update_router_bias(params, loads, tc.bias_update_gamma)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads), learning_rate=make_schedule(tc)(state.step),
                 moe_max_violation=_max_violation(loads))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


train_step = jax.jit(_train_step, donate_argnums=0)
train_step.__doc__ = """(state, batch {"tokens" [B,S], "loss_mask" [B,S]}) -> (state, metrics): one optimizer
step on a batch of train_cfg.batch_size sequences (split into grad_accum_steps micro-batches whose gradients
add up to the full batch's), then the routers' bias update. Jitted, donating `state`; `_train_step` is the
pure function, for a caller that jits with its own shardings."""
