r"""Generate with DeepSeek-V4.

  python -m launch.decode --config=tiny --prompt_ids=5,17,300 --max_new_tokens=32
  python -m launch.decode --config=flash --checkpoint=DIR --prompt="Hello" --temperature=0.7 --top_p=0.9
  python -m launch.decode --config=flash --checkpoint=DIR --chat=messages.json --thinking_mode=thinking
  python -m launch.decode --config=flash --checkpoint=DIR --chat=-        # interactive multi-turn chat
  python -m launch.decode --config=flash --checkpoint=DIR --prompt="Hello" --mesh=data:2,expert:4   # 8 chips
  python -m launch.decode --config=flash --checkpoint=DIR --prompt="Hello" --mesh=expert:16 \
      --coordinator_address=HOST0:8476 --num_processes=4 --process_id=I        # on each of 4 hosts, I = 0..3

`--config` is a name from configs/ (flash, pro, flash_base, pro_base, tiny) or a .py config file;
override fields with `--config.FIELD=VALUE` (e.g. `--config.dtype=float32`). Without `--config`, a
`--checkpoint` holding a config.json supplies the config (`--dtype` picks the compute dtype). Without
`--checkpoint` the model runs on random weights (the output says so). Without a prompt flag the prompt is BOS
alone (the output says so); an empty `--prompt_ids` is an error. `--output_json` writes prompt ids, generated
ids, stop reasons and timings for scripts.

Multi-host (a TPU slice, several GPU hosts): run the same command on every host (launch/common.py starts
jax's distributed runtime; on a TPU slice, under SLURM `srun` or `mpirun` no extra flag is needed). The mesh
spans every process's devices, each process loads only its shards, all take part in generation, and only
process 0 prints (and writes --output_json). The interactive chat (--chat=-) needs a single process.

Bad input fails with one `error: ...` line on stderr and exit code 2; the log stays at WARNING unless
`--verbosity` / `-v` asks for more (see launch/common.py).
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from launch import common
from launch.common import UsageError

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(common.CONFIG_DIR, "tiny.py"),
                                          "configs/ name or .py config file.", lock_config=False)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint dir: safetensors (official or HF names) or "
                                  "an Orbax checkpoint written by launch.convert.")
_PROMPT_IDS = flags.DEFINE_string("prompt_ids", None, "Comma-separated token ids; ';' separates sequences. "
                                  "Without --prompt_ids, --prompt or --chat the prompt is the BOS token alone.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text prompt, sent as one user turn in the V4 chat format "
                              "(with --raw, tokenized as is).")
_RAW = flags.DEFINE_bool("raw", False, "With --prompt: no chat template, just BOS + the text.")
_CHAT = flags.DEFINE_string("chat", None, "A messages JSON file, or '-' for an interactive chat.")
_THINKING = flags.DEFINE_enum("thinking_mode", "chat", ["chat", "thinking"], "V4 chat mode.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json / .model (default: DeepSeek-V4's).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per sequence.")
_MAX_SEQ = flags.DEFINE_integer("max_seq_len", None, "Cache capacity (default: longest prompt + max_new_tokens).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0 = off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1.0 = off.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling and random-weight seed.")
_STOP_IDS = flags.DEFINE_string("stop_ids", "", "Extra comma-separated stop token ids (EOS always stops).")
_CACHE_DTYPE = flags.DEFINE_enum("cache_dtype", None, ["bfloat16", "float32", "paper"],
                                 "KV cache storage (default: the compute dtype); paper = fp8/fp4 + scales.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write ids and timings here.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"], "Compute dtype when the config comes from "
                           "the checkpoint's config.json (no --config).")
_MESH = flags.DEFINE_string("mesh", None, "Device mesh as AXIS:SIZE pairs over data, sequence, tensor, expert, e.g. "
                           "data:2,expert:4 (sizes multiply to the device count). Default: experts over as many "
                           "devices as divide the expert count, data over the rest; none on one device.")
_SPECULATIVE = flags.DEFINE_enum("speculative", None, ["mtp"], "Speculative decoding: 'mtp' drafts with the MTP "
                                 "block and verifies num_draft tokens per step (same output as plain decoding).")
_NUM_DRAFT = flags.DEFINE_integer("num_draft", 1, "Draft tokens per step with --speculative=mtp (1 = the MTP "
                                  "block's trained depth; more re-apply it to its own output).")
_CONFIG_GIVEN = any(a.startswith("--config") for a in sys.argv[1:])   # else a checkpoint's config.json is used


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments: {argv[1:]}")
  import jax

  from dsv4_jax import distributed, runtime
  from dsv4_jax.config import describe, from_config_dict
  from dsv4_jax.sampling import Sampling

  prompt_ids = None if _PROMPT_IDS.value is None else common.parse_ids(_PROMPT_IDS.value, "--prompt_ids")
  stop_ids = common.parse_ids(_STOP_IDS.value, "--stop_ids", sequences=False)
  if _CONFIG_GIVEN or not _CHECKPOINT.value:
    cfg = from_config_dict(_CONFIG.value)
  else:
    cfg = runtime.checkpoint_config(_CHECKPOINT.value, dtype=_DTYPE.value)
  from dsv4_jax.data import shipped_assets
  shipped_ckpt, shipped_tok = shipped_assets(cfg.name)       # dsv4_jax/assets/NAME/: the demo model + tokenizer
  checkpoint = _CHECKPOINT.value or shipped_ckpt
  if checkpoint and not _CHECKPOINT.value:
    runtime.note(f"NOTE: using the shipped {cfg.name} checkpoint {checkpoint}")
  sources = [f for f in (_PROMPT_IDS.value, _PROMPT.value, _CHAT.value) if f is not None]
  if len(sources) > 1:
    raise UsageError("give one of --prompt_ids, --prompt, --chat.")
  interactive = _CHAT.value == "-"
  if interactive and jax.distributed.is_initialized():
    raise UsageError("--chat=- (interactive) reads stdin on one process; give --prompt, --prompt_ids or a "
                     "--chat file in a multi-host run.")
  primary = distributed.is_primary()                        # the other processes compute and stay quiet
  sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  runtime.note(describe(cfg))
  mesh = runtime.launch_mesh(_MESH.value, cfg)              # a mesh that does not fit fails here, before loading
  if mesh is not None:
    runtime.note(runtime.describe_mesh(mesh))

  tok = None
  if _PROMPT.value is not None or _CHAT.value is not None:
    from dsv4_jax.tokenizer import load_tokenizer
    tok = load_tokenizer(_TOKENIZER.value or shipped_tok)
    if tok.vocab_size > cfg.vocab_size:
      raise UsageError(f"the tokenizer has {tok.vocab_size} ids but config {cfg.name!r} only {cfg.vocab_size}; "
                       "text prompts need a real-vocabulary config (e.g. --config=flash).")

  if interactive:
    prompts = []
  elif _CHAT.value is not None or _PROMPT.value is not None:
    prompts = [runtime.encode_text(tok, _PROMPT.value, _CHAT.value, _THINKING.value, _RAW.value)]
  elif prompt_ids is not None:
    prompts = prompt_ids
  else:
    runtime.note(f"NOTE: no --prompt_ids, --prompt or --chat given: the prompt is BOS alone (id "
                 f"{cfg.bos_token_id}).")
    prompts = [[cfg.bos_token_id]]
  longest = max((len(p) for p in prompts), default=0)
  spec_extra = _NUM_DRAFT.value if _SPECULATIVE.value else 0      # verification looks num_draft tokens ahead
  max_seq = _MAX_SEQ.value or (4096 if interactive else longest + _MAX_NEW.value + spec_extra)
  runtime.check_fits(cfg, batch=max(1, len(prompts)), max_seq_len=max_seq, cache_dtype=_CACHE_DTYPE.value,
                     checkpoint=checkpoint)

  params = runtime.load_or_init(cfg, checkpoint, seed=_SEED.value, mesh=mesh)
  run = runtime.Runner(params, cfg, sampling, max_new_tokens=_MAX_NEW.value, max_seq_len=_MAX_SEQ.value,
                       stop_ids=tuple(stop_ids), cache_dtype=_CACHE_DTYPE.value, rng=jax.random.key(_SEED.value),
                       mesh=mesh, speculative=_SPECULATIVE.value, num_draft=_NUM_DRAFT.value)
  if interactive:
    runtime.interactive_chat(run, tok, _THINKING.value)
    return
  result = run(prompts)
  if not primary:
    return
  runtime.report(result, tok, _THINKING.value if (tok and not _RAW.value) else None)
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump(runtime.result_json(result, cfg, random_weights=checkpoint is None), f, indent=1)


if __name__ == "__main__":
  common.run(main, config_flag="config")
