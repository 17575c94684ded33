r"""Train or fine-tune DeepSeek-V4.

  python -m launch.train --config=demo --data=tests/assets/botchan.txt --steps=2000 --workdir=runs/demo
  python -m launch.train --config=flash --checkpoint=DIR --data=chats.jsonl --format=chat --workdir=runs/ft \
      --train.learning_rate=1e-5 --train.batch_size=8 --train.seq_len=4096

`--config` is a name from configs/ or a .py config file (`--config.FIELD=VALUE` overrides a model field);
`--train.FIELD=VALUE` overrides a field of dsv4_jax.train.TrainConfig, whose defaults come from the config
file's `get_train_config()` when it has one (configs/demo.py does). `--steps` sets train.total_steps.

Data (dsv4_jax/data.py): `--format=text` packs a plain-text file into rows of train.seq_len tokens, with
the config's SentencePiece model when dsv4_jax/assets/NAME/tokenizer.model exists, else DeepSeek-V4's tokenizer
(`--tokenizer` picks another); `--format=chat` reads JSONL conversations (OpenAI `messages`), rendered in
the V4 chat format with the loss on the assistant turns only (`--train_reasoning` for their reasoning).
Every round(1 / `--eval_fraction`)-th row (default: every 20th) is held out for the eval loss.

The workdir holds `checkpoints/` (Orbax CheckpointManager: async, atomic, the last `--keep`; params, optimizer
state, step, data position and seed), `metrics.jsonl` (one JSON object per logged step: step, loss, ce,
mtp_ce, balance, grad_norm, learning_rate, tokens_per_s, mfu, ...; eval lines carry eval_loss) and
TensorBoard event files in `tensorboard/`. Running the same command again resumes from the latest
checkpoint and reproduces the losses of an uninterrupted run exactly, step for step. SIGTERM (preemption) saves a
checkpoint after the current step and exits. `--export=DIR` writes the final parameters in the layout
`load_params` / `launch.decode --checkpoint=DIR` read. With JAX_COMPILATION_CACHE_DIR set, a resumed run
reuses the first run's compiled step.

Multi-host: not supported yet. In a multi-host job (a TPU slice, `srun`, `mpirun`, or --coordinator_address)
it refuses to start; train on one host's devices.

Bad input (missing or empty data, a chat line that is not valid messages, seq_len past the model's limit,
a checkpoint or workdir that does not match the config) fails with one `error: ...` line and exit code 2,
before any compute.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
import time

from absl import flags
from ml_collections import config_flags

from launch import common
from launch.common import UsageError

try:        # without --config on the command line, the default file and its --config.X overrides load here
  _CONFIG = config_flags.DEFINE_config_file("config", os.path.join(common.CONFIG_DIR, "demo.py"),
                                            "configs/ name or .py config file.", lock_config=False)
except (AttributeError, KeyError) as e:
  common.fail(f"the config has no field {str(e).strip(chr(34) + chr(39))!r} to override (--config.FIELD=VALUE sets "
              "an existing field).")
except (flags.Error, ValueError, TypeError) as e:
  common.fail(e, hint="--config.FIELD=VALUE takes the field's type")


def _train_defaults():
  from dsv4_jax.train import train_config_dict
  return train_config_dict()


try:        # a config_dict flag applies the command line's --train.X overrides here, at definition
  _TRAIN = config_flags.DEFINE_config_dict("train", _train_defaults(), "Training config (dsv4_jax.train.TrainConfig);"
                                           " --train.FIELD=VALUE overrides a field.", lock_config=True)
except (AttributeError, KeyError) as e:
  common.fail(f"TrainConfig has no field {str(e).strip(chr(34) + chr(39))!r}; --train.FIELD=VALUE sets one of "
              f"{', '.join(sorted(_train_defaults()))}.")
except (flags.Error, ValueError, TypeError) as e:
  common.fail(e, hint="--train.FIELD=VALUE takes the field's type")
_DATA = flags.DEFINE_string("data", None, "Training data: a text file (--format=text) or chat JSONL (--format=chat).")
_FORMAT = flags.DEFINE_enum("format", "text", ["text", "chat"], "Data format.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard files; an existing "
                               "workdir with checkpoints is resumed.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Initial weights (safetensors or launch.convert output; "
                                  "quantised weights are dequantised). Default: random init with train.seed.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json / .model (default: "
                                 "dsv4_jax/assets/CONFIG/tokenizer.model "
                                 "for --format=text when it exists, else DeepSeek-V4's).")
_STEPS = flags.DEFINE_integer("steps", None, "Optimizer steps in all (sets train.total_steps).")
_EVAL_FRACTION = flags.DEFINE_float("eval_fraction", 0.05, "Share of rows held out for the eval loss (0: none).")
_THINKING = flags.DEFINE_enum("thinking_mode", "chat", ["chat", "thinking"], "--format=chat: V4 chat mode.")
_TRAIN_REASONING = flags.DEFINE_bool("train_reasoning", True, "--format=chat, thinking mode: the loss covers the "
                                     "assistant's reasoning too (else only what follows </think>).")
_LOG_EVERY = flags.DEFINE_integer("log_every", 10, "Steps between metrics lines.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 100, "Steps between eval losses (0: only at the end).")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 0, "Cap on eval batches (0: all held-out rows).")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 100, "Steps between checkpoints (and one at the end).")
_KEEP = flags.DEFINE_integer("keep", 3, "Checkpoints kept in the workdir.")
_EXPORT = flags.DEFINE_string("export", None, "At the end, write the parameters (in the config's dtype) to this "
                              "directory in the load_params layout, with the tokenizer model if it is a file.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s of one device for the MFU estimate "
                                  "(default: a table by device kind).")
_MESH = flags.DEFINE_string("mesh", None, "Device mesh as AXIS:SIZE pairs over data, sequence, tensor, expert, e.g. "
                           "data:2,expert:4. Default: experts over as many devices as divide the expert count, "
                           "data over the rest; none on one device.")
flags.mark_flags_as_required(["data", "workdir"])

METRICS = "metrics.jsonl"
_RUN_FIELDS = ("data", "format", "tokenizer", "eval_fraction", "thinking_mode", "train_reasoning")


# ----------------------------------------------------------------------------- configuration


def train_config(train_flag, steps: int | None):
  """TrainConfig: TrainConfig defaults < the config file's get_train_config() < --train.X < --steps."""
  from dsv4_jax.train import TrainConfig
  d = dict(train_flag.to_dict())
  base = _config_module_train_defaults()
  overridden = set(config_flags.get_override_values(flags.FLAGS["train"]))
  d.update({k: v for k, v in base.items() if k not in overridden})
  if steps is not None:
    d["total_steps"] = steps
  if "warmup_steps" not in overridden:
    d["warmup_steps"] = min(d["warmup_steps"], d["total_steps"])
  return TrainConfig.from_dict(d)


def _config_module_train_defaults() -> dict:
  import importlib.util
  path = config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]
  spec = importlib.util.spec_from_file_location("_train_config_of_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return dict(module.get_train_config()) if hasattr(module, "get_train_config") else {}


def tokenizer_path(cfg_name: str, fmt: str, given: str | None) -> str | None:
  from dsv4_jax.data import default_tokenizer_path
  if given:
    return given
  return default_tokenizer_path(cfg_name) if fmt == "text" else None


_ARCH_RUNTIME = {"name", "dtype", "quant_sim", "attn_impl", "query_chunk", "max_seq_len", "expert_dtype"}


def config_diff(a: dict, b: dict, ignore=()) -> list[str]:
  return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b))
          if k not in ignore and _norm(a.get(k)) != _norm(b.get(k))]


def _norm(v):
  return list(v) if isinstance(v, tuple) else v


# ----------------------------------------------------------------------------- the workdir


class Workdir:
  """checkpoints/ (Orbax), metrics.jsonl and tensorboard/ of one run."""

  def __init__(self, path: str, keep: int):
    import orbax.checkpoint as ocp
    self.path = os.path.abspath(path)
    if os.path.exists(self.path) and not os.path.isdir(self.path):
      raise NotADirectoryError(f"--workdir={path!r} exists and is not a directory.")
    os.makedirs(self.path, exist_ok=True)
    self.ckpt_dir = os.path.join(self.path, "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1, create=True,
                                           enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.ckpt_dir, options=options, item_names=("state", "meta"))
    self.metrics_path = os.path.join(self.path, METRICS)
    self._tb = None

  def latest(self) -> tuple[int | None, dict | None]:
    """(step, meta) of the latest finished checkpoint, or (None, None)."""
    import orbax.checkpoint as ocp
    step = self.manager.latest_step()
    if step is None:
      return None, None
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return step, meta

  def restore_state(self, step: int, abstract):
    import orbax.checkpoint as ocp
    return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]

  def save(self, step: int, tree, meta: dict) -> None:
    import orbax.checkpoint as ocp
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
                      force=True)

  def truncate_metrics(self, step: int) -> None:
    """Drops metric lines past `step` (written after the checkpoint a resumed run starts from)."""
    if not os.path.exists(self.metrics_path):
      return
    keep = []
    with open(self.metrics_path) as f:
      for line in f:
        try:
          if json.loads(line)["step"] <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError):
          pass                                     # a line cut by the kill
    tmp = self.metrics_path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, self.metrics_path)

  def log(self, record: dict, prefix: str = "train") -> None:
    with open(self.metrics_path, "a") as f:
      f.write(json.dumps(record) + "\n")
    tb = self._writer()
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)):
        tb.add_scalar(f"{prefix}/{k}", v, record["step"])
    tb.flush()

  def _writer(self):
    if self._tb is None:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(self.path, "tensorboard"))
    return self._tb

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
    if self._tb is not None:
      self._tb.close()


# ----------------------------------------------------------------------------- throughput


_PEAK_TFLOPS_BF16 = {"v4": 275, "v5 lite": 197, "v5e": 197, "v5p": 459, "v5": 459, "v6 lite": 918, "v6e": 918,
                     "h100": 989, "h200": 989, "b200": 2250, "a100": 312, "l4": 121}
_CPU_TFLOPS_PER_CORE = 0.05        # fp32 FMA on a recent x86 core, roughly: an estimate, not a measurement


def peak_flops(device, given_tflops: float | None) -> float:
  if given_tflops:
    return given_tflops * 1e12
  kind = getattr(device, "device_kind", "").lower()
  if device.platform == "cpu":
    return (os.cpu_count() or 1) * _CPU_TFLOPS_PER_CORE * 1e12
  for key, tf in _PEAK_TFLOPS_BF16.items():
    if key in kind:
      return tf * 1e12
  return 0.0


def flops_per_token(cfg, tc) -> float:
  """6 x the parameters a token's matmuls touch (main model, + the MTP block when trained): the usual
  MFU convention; attention scores and the optimizer are not counted."""
  from dsv4_jax import params as params_lib, transformer
  n = transformer.parameter_counts(cfg)["active"]                 # the head included, the embedding not
  if tc.mtp_weight and cfg.n_mtp_layers:
    mtp = transformer.param_specs(cfg)["mtp"][0]
    routed = params_lib.count(mtp, lambda p: "experts/" in p and "shared" not in p)
    n += params_lib.count(mtp) - routed * (cfg.n_routed_experts - cfg.n_activated_experts) // cfg.n_routed_experts
    n += cfg.vocab_size * cfg.dim                                 # the MTP block's pass through the shared head
  return 6.0 * n


class Progress:
  """A progress line on a terminal's stderr (rewritten in place); nothing when stderr is not a terminal."""

  def __init__(self, total: int):
    self.total, self.tty = total, sys.stderr.isatty()
    self.last = 0.0

  def __call__(self, step: int, loss: float, tok_s: float, mfu: float, eta_s: float, final: bool = False):
    if not self.tty or (not final and time.time() - self.last < 0.2):
      return
    self.last = time.time()
    width = 24
    done = int(width * step / max(self.total, 1))
    eta = time.strftime("%H:%M:%S", time.gmtime(max(eta_s, 0)))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{self.total} loss {loss:.4f} "
                     f"{tok_s:,.0f} tok/s MFU {100 * mfu:.2f}% ETA {eta}  ")
    if final:
      sys.stderr.write("\n")
    sys.stderr.flush()


# ----------------------------------------------------------------------------- export


def check_export_dir(path: str) -> None:
  """--export may replace an earlier export, never anything else."""
  from dsv4_jax.checkpoint import orbax_io
  if os.path.exists(path) and not orbax_io.is_converted(path):
    raise FileExistsError(f"--export={path!r} exists and is not a checkpoint written by an earlier export; "
                          "pick a new directory.")


def export_params(params, cfg, out_dir: str, tokenizer: str | None = None) -> str:
  """Writes `params` (cast to cfg.dtype; fp32 kinds stay fp32) as a checkpoint `load_params` reads: the
  launch.convert layout (units/top, units/layer.N, units/mtp.J, config.json, manifest written last), built
  under a temporary name and moved into place."""
  import jax
  import numpy as np

  from dsv4_jax import transformer
  from dsv4_jax.checkpoint import orbax_io, stream

  out = os.path.abspath(out_dir)
  tmp = f"{out}.partial-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(os.path.join(tmp, "units"))
  plan = transformer.layer_plan(cfg)
  specs = stream.unit_specs(cfg)
  host = jax.device_get(params)
  trees = {stream.TOP: {k: v for k, v in host.items() if k not in ("layers", "mtp")}}
  for n in range(cfg.n_layers):
    where, pos, rep = plan.locate(n)
    p = host["layers"][where][pos]
    trees[stream.layer_unit(n)] = p if rep is None else jax.tree.map(lambda a: a[rep], p)
  for j, p in enumerate(host["mtp"]):
    trees[stream.mtp_unit(j)] = p
  units = {}
  for unit, tree in trees.items():
    flat_specs = dict(stream.flatten(specs[unit]))
    cast = {path: np.asarray(v).astype(flat_specs[path].dtype(cfg.dtype)) for path, v in stream.flatten(tree)}
    units[unit] = orbax_io.save_unit(tmp, unit, stream.unflatten(cast))
  config = dataclasses.asdict(cfg)
  config["compress_ratios"] = list(cfg.compress_ratios)
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(config, f, indent=1)
  if tokenizer and os.path.isfile(tokenizer):
    name = "tokenizer.model" if tokenizer.endswith(".model") else os.path.basename(tokenizer)
    shutil.copy2(tokenizer, os.path.join(tmp, name))
  orbax_io.write_manifest(tmp, {"format": orbax_io.FORMAT, "version": orbax_io.VERSION, "dtype": cfg.dtype,
                                "config_name": cfg.name, "source": "launch.train", "units": units, "stats": {}})
  check_export_dir(out)
  if os.path.exists(out):
    shutil.rmtree(out)
  os.replace(tmp, out)
  return out


# ----------------------------------------------------------------------------- the run


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments: {argv[1:]}")
  from dsv4_jax.config import describe, from_config_dict

  for name, flag in (("log_every", _LOG_EVERY), ("save_every", _SAVE_EVERY), ("keep", _KEEP)):
    if flag.value < 1:
      raise UsageError(f"--{name}={flag.value}: expected >= 1.")
  if _STEPS.value is not None and _STEPS.value < 1:
    raise UsageError(f"--steps={_STEPS.value}: expected >= 1.")
  cfg = from_config_dict(_CONFIG.value)
  tc = train_config(_TRAIN.value, _STEPS.value)
  run_args = {"data": os.path.abspath(_DATA.value), "format": _FORMAT.value,
              "tokenizer": tokenizer_path(cfg.name, _FORMAT.value, _TOKENIZER.value),
              "eval_fraction": _EVAL_FRACTION.value, "thinking_mode": _THINKING.value,
              "train_reasoning": _TRAIN_REASONING.value}
  print(describe(cfg), file=sys.stderr)
  from dsv4_jax import runtime
  from dsv4_jax.sharding import use_mesh
  mesh = runtime.launch_mesh(_MESH.value, cfg)            # a mesh that does not fit fails here, before loading
  if mesh is not None:
    print(runtime.describe_mesh(mesh), file=sys.stderr)
  with use_mesh(mesh):
    train(cfg, tc, run_args, _WORKDIR.value, checkpoint=_CHECKPOINT.value, mesh=mesh)


def train(cfg, tc, run_args: dict, workdir: str, checkpoint: str | None = None, mesh=None) -> dict:
  """Checks everything, then trains from scratch, from `checkpoint`, or on from the workdir's latest
  checkpoint. Returns the last metrics. `mesh`: fresh weights (init or `checkpoint`) are placed on it by the
  rules table; run under `use_mesh(mesh)`."""
  from dsv4_jax import data as data_lib
  from dsv4_jax.tokenizer import load_tokenizer

  # ---- checks, before any compute ----------------------------------------------------------------------
  tok = load_tokenizer(run_args["tokenizer"])
  if tok.vocab_size > cfg.vocab_size:
    raise ValueError(f"the tokenizer ({run_args['tokenizer'] or 'DeepSeek-V4'}) has {tok.vocab_size} ids but config "
                     f"{cfg.name!r} has vocab_size={cfg.vocab_size}; pick the config's tokenizer (--tokenizer).")
  ds = data_lib.load_dataset(run_args["data"], tok, tc.seq_len, fmt=run_args["format"],
                             eval_fraction=run_args["eval_fraction"], thinking_mode=run_args["thinking_mode"],
                             train_reasoning=run_args["train_reasoning"], vocab_size=cfg.vocab_size,
                             max_seq_len=cfg.max_seq_len)
  print(f"data: {ds.stats}; {len(ds.train)} train rows, {len(ds.eval) if ds.eval else 0} held out",
        file=sys.stderr)
  if _EXPORT.value:
    check_export_dir(os.path.abspath(_EXPORT.value))
  wd = Workdir(workdir, _KEEP.value)
  start, meta = wd.latest()
  model_dict = dataclasses.asdict(cfg)
  if meta is not None:
    diff = config_diff(model_dict, meta["model_config"], ignore=_ARCH_RUNTIME)
    if diff:
      raise ValueError(f"workdir {wd.path} holds a run of a different model than config {cfg.name!r} ("
                       f"{'; '.join(diff[:6])}); use another --workdir or the run's config.")
    changed = config_diff(run_args, meta["run"])
    if changed:
      raise ValueError(f"workdir {wd.path} was trained on other data settings ({'; '.join(changed)}); resume "
                       "with the same --data/--format/--tokenizer/--eval_fraction, or use another --workdir.")
    changed = config_diff(tc.to_dict(), meta["train_config"], ignore=("total_steps",))
    if changed:
      print(f"NOTE: the training config differs from the checkpoint's ({'; '.join(changed)}): the resumed run "
            "will not repeat the original one.", file=sys.stderr)
    if start >= tc.total_steps:
      print(f"workdir {wd.path} is at step {start}, total_steps={tc.total_steps}: nothing to do.", file=sys.stderr)
  elif checkpoint:
    from dsv4_jax import runtime
    checkpoint = os.path.abspath(checkpoint)              # Orbax restores absolute paths only
    if not os.path.exists(checkpoint):
      raise FileNotFoundError(f"--checkpoint={checkpoint!r} does not exist.")
    runtime.check_checkpoint_config(checkpoint, cfg)
  it = data_lib.BatchIterator(ds.train, tc.batch_size, seed=tc.seed,
                              position=meta["data_position"] if meta else None)
  # ---- state ---------------------------------------------------------------------------------------------
  import jax
  import jax.numpy as jnp
  import numpy as np

  from dsv4_jax import transformer
  from dsv4_jax.train import init_train_state, loss_fn, make_optimizer, train_step

  if meta is not None:
    abstract = transformer.abstract_params(cfg, jnp.dtype(tc.param_dtype))
    abstract["mtp"] = abstract["mtp"][:meta["n_mtp"]]
    tx = make_optimizer(tc, abstract)
    state = jax.eval_shape(lambda p: init_train_state(p, tx, cfg, tc), abstract)
    tree = wd.restore_state(start, _state_tree(state))
    state = state.replace(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"])
    wd.truncate_metrics(start)
    print(f"resuming {wd.path} at step {start}", file=sys.stderr)
  else:
    start = 0
    wd.truncate_metrics(0)
    if checkpoint:
      from dsv4_jax.weights import load_params
      params = load_params(checkpoint, cfg, dtype=tc.param_dtype, quantized=False, mesh=mesh)
    else:
      params = transformer.init_params(cfg, jax.random.key(tc.seed), jnp.dtype(tc.param_dtype), mesh=mesh)
    tx = make_optimizer(tc, params)
    state = init_train_state(params, tx, cfg, tc)
    del params
  n_mtp = len(state.params["mtp"])

  eval_fn = jax.jit(lambda p, b: loss_fn(p, cfg, b, tc))
  eval_set = data_lib.eval_batches(ds.eval, tc.batch_size) if ds.eval is not None else []
  if _EVAL_BATCHES.value:
    eval_set = eval_set[:_EVAL_BATCHES.value]

  def evaluate(step):
    if not eval_set:
      return None
    sums = {}
    for b in eval_set:
      _, m = eval_fn(state.params, b)
      w = {"ce": float(b["loss_mask"][:, 1:].sum()), "mtp_ce": float(b["loss_mask"][:, 2:].sum())}
      for k in ("ce", "mtp_ce"):
        if k in m:
          s = sums.setdefault(k, [0.0, 0.0])
          s[0] += float(m[k]) * w[k]
          s[1] += w[k]
    rec = {"step": step, "eval_loss": sums["ce"][0] / max(sums["ce"][1], 1)}
    if "mtp_ce" in sums:
      rec["eval_mtp_ce"] = sums["mtp_ce"][0] / max(sums["mtp_ce"][1], 1)
    wd.log(rec, prefix="eval")
    print(json.dumps(rec), flush=True)
    return rec

  def save(step):
    wd.save(step, _state_tree(state), {
        "step": step, "data_position": it.position, "rng": {"seed": tc.seed, "data_order": "numpy (seed, epoch)"},
        "model_config": model_dict, "train_config": tc.to_dict(), "run": run_args, "n_mtp": n_mtp})

  stop = []
  signal.signal(signal.SIGTERM, lambda *_: stop.append(True))     # preemption: save, then exit
  tokens_per_step = tc.batch_size * tc.seq_len
  peak = peak_flops(jax.devices()[0], _PEAK_TFLOPS.value) * jax.device_count()
  fpt = flops_per_token(cfg, tc)
  progress = Progress(tc.total_steps)
  last = {}
  t_mark, s_mark = None, start
  step = start
  while step < tc.total_steps and not stop:
    batch = next(it)
    state, metrics = train_step(state, batch)
    step += 1
    if t_mark is None:                       # the first step compiles: throughput counts from its end
      jax.block_until_ready(metrics)
      t_mark, s_mark = time.time(), step
    if step % _LOG_EVERY.value == 0 or step == tc.total_steps:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      now = time.time()
      dt = (now - t_mark) / max(step - s_mark, 1)
      tok_s = tokens_per_step / dt if step > s_mark else 0.0
      rec = {"step": step, **m, "tokens_per_s": round(tok_s, 1),
             "mfu": round(tok_s * fpt / peak, 6) if peak and tok_s else None, "epoch": it.position["epoch"]}
      wd.log(rec)
      print(json.dumps(rec), flush=True)
      progress(step, m["loss"], tok_s, rec["mfu"] or 0.0, dt * (tc.total_steps - step))
      t_mark, s_mark, last = now, step, rec
    paused = False
    if _EVAL_EVERY.value and step % _EVAL_EVERY.value == 0 and step < tc.total_steps:
      evaluate(step)
      paused = True
    if step % _SAVE_EVERY.value == 0 or step == tc.total_steps or stop:
      save(step)
      paused = True
    if paused:                               # throughput counts train steps only
      jax.block_until_ready(state.step)
      t_mark, s_mark = time.time(), step
  if last:
    progress(last["step"], last["loss"], last["tokens_per_s"], last["mfu"] or 0.0, 0.0, final=True)
  if step == tc.total_steps and (start < step or meta is None):
    evaluate(step)
  wd.close()
  if stop:
    print(f"SIGTERM: saved step {step} in {wd.path}; run the same command to resume.", file=sys.stderr)
  if _EXPORT.value and step == tc.total_steps:
    params = jax.tree.map(lambda a: np.asarray(a), state.params)
    print(f"exported {export_params(params, cfg, _EXPORT.value, run_args['tokenizer'])}", file=sys.stderr)
  return last


def _state_tree(state) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


if __name__ == "__main__":
  common.run(main, config_flag="config",   # every process would feed, save and export the whole run
             multihost="launch.train runs on the devices of one host; multi-host training (per-process data, "
                       "saves and export) is not supported yet. Train on one host (--num_processes=1).")
