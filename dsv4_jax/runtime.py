"""What the launch scripts need around the model: memory checks before allocating, loading or random
init, text prompts through the V4 chat format, and printing results. In a multi-host job every process
calls these alike (each loads its own shards, all take part in generation); `note` and the scripts print on
process 0 only."""
from __future__ import annotations

import dataclasses
import logging
import os
import sys

import jax
import numpy as np
from jax.sharding import Mesh

from dsv4_jax.config import ModelConfig
from dsv4_jax.generation import GenerateResult, generate
from dsv4_jax.sampling import Sampling
from dsv4_jax.sharding import make_mesh, use_mesh
from dsv4_jax.transformer import abstract_params, init_params

log = logging.getLogger(__name__)
GB = 1e9


def available_memory_bytes() -> tuple[int, str]:
  """Memory the model can use on the default backend, and what it is. Several processes (multi-host): this
  host's memory times the process count (hosts alike; only local devices report their memory)."""
  devices = jax.local_devices()
  hosts = jax.process_count()
  on = f" x {hosts} hosts" if hosts > 1 else ""
  if devices[0].platform == "cpu":
    try:
      with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
      return int(info["MemAvailable"].split()[0]) * 1024 * hosts, "available host RAM" + on
    except (OSError, KeyError, ValueError):
      return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * hosts, "host RAM" + on
  stats = [d.memory_stats() or {} for d in devices]
  total = sum(int(s.get("bytes_limit", 0)) for s in stats)
  return total * hosts, f"memory of {len(devices)} {devices[0].platform} device(s){on}"


def _nbytes(tree) -> int:
  """Bytes of the arrays (or ShapeDtypeStructs) of a pytree."""
  leaves = jax.tree.leaves(tree)
  return int(sum(np.prod(a.shape, dtype=np.int64) * np.dtype(a.dtype).itemsize for a in leaves))


def required_memory_bytes(cfg: ModelConfig, batch: int, max_seq_len: int, cache_dtype=None,
                          checkpoint: str | None = None) -> dict:
  """Weights (the checkpoint's size on disk, which stays quantised when loaded; else dense in cfg.dtype)
  plus the KV cache: exactly the arrays `init_cache(cfg, batch, max_seq_len, cache_dtype)` allocates
  (their shapes, from jax.eval_shape: nothing is allocated)."""
  from dsv4_jax.cache import init_cache
  if checkpoint and os.path.isdir(checkpoint):
    params = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(checkpoint) for f in fs)
  else:
    params = _nbytes(abstract_params(cfg))
  cache = _nbytes(jax.eval_shape(lambda: init_cache(cfg, batch, max_seq_len, cache_dtype)))
  return {"params": int(params), "cache": cache, "total": int(params + cache)}


def check_fits(cfg: ModelConfig, batch: int, max_seq_len: int, cache_dtype=None, checkpoint: str | None = None):
  """Raises, before anything is allocated, when weights + cache exceed the memory at hand."""
  need = required_memory_bytes(cfg, batch, max_seq_len, cache_dtype, checkpoint)
  have, what = available_memory_bytes()
  if have and need["total"] > have:
    raise MemoryError(
        f"config {cfg.name!r} in {cfg.dtype} needs {need['total'] / GB:.1f} GB ({need['params'] / GB:.1f} GB of "
        f"weights + {need['cache'] / GB:.2f} GB of KV cache for {batch} x {max_seq_len} tokens) but the "
        f"{what} is {have / GB:.1f} GB. Use a machine (or mesh) with more memory, a smaller config "
        f"(--config=tiny), or a shorter --max_seq_len.")


def checkpoint_config(path: str, dtype: str | None = None) -> ModelConfig:
  """The config.json a checkpoint directory carries (hub, save_pretrained or reference key set)."""
  cj = os.path.join(path, "config.json")
  if not os.path.isfile(cj):
    raise FileNotFoundError(f"checkpoint {path!r} has no config.json; pass --config=NAME (one of configs/) or a "
                            ".py config file.")
  cfg = ModelConfig.from_hf_config(cj)
  return dataclasses.replace(cfg, dtype=dtype) if dtype else cfg


def check_checkpoint_config(path: str, cfg: ModelConfig) -> None:
  """A checkpoint with a config.json must describe the same architecture as `cfg`."""
  cj = os.path.join(path, "config.json") if os.path.isdir(path) else None
  if not cj or not os.path.isfile(cj):
    return
  other = ModelConfig.from_hf_config(cj)
  runtime_fields = {"name", "dtype", "quant_sim", "attn_impl", "query_chunk", "max_seq_len", "expert_dtype"}
  diff = [(f.name, getattr(cfg, f.name), getattr(other, f.name)) for f in dataclasses.fields(cfg)
          if f.name not in runtime_fields and getattr(cfg, f.name) != getattr(other, f.name)]
  if diff:
    lines = "; ".join(f"{n}: config {a!r} vs checkpoint {b!r}" for n, a, b in diff[:6])
    raise ValueError(f"checkpoint {path} does not match config {cfg.name!r}: {lines}. Pick the matching "
                     f"--config (or load_config({cj!r})).")


def launch_mesh(spec: str | None, cfg: ModelConfig) -> Mesh | None:
  """The launch scripts' --mesh: "data:2,expert:4" -> that mesh; absent -> `make_mesh(None, cfg)` (experts over
  as many devices as divide the expert count, data over the rest) when several devices are present, else
  None. Raises ValueError, before anything is loaded, for a mesh that does not fit the devices or the model."""
  if spec:
    return make_mesh(spec, cfg)
  return make_mesh(None, cfg) if jax.device_count() > 1 else None


def describe_mesh(mesh: Mesh | None) -> str:
  """"mesh: data:2,expert:4 over 8 tpu devices" (the launch scripts print it)."""
  if mesh is None:
    return "mesh: none (one device)"
  axes = ",".join(f"{a}:{n}" for a, n in mesh.shape.items() if n > 1) or "1 device"
  return f"mesh: {axes} over {mesh.size} {mesh.devices.flat[0].platform} devices"


def note(*args) -> None:
  """print(*args) on stderr, on process 0 only (the others of a multi-host job stay quiet)."""
  from dsv4_jax.distributed import is_primary
  if is_primary():
    print(*args, file=sys.stderr)


def load_or_init(cfg: ModelConfig, checkpoint: str | None, seed: int = 0, mesh: Mesh | None = None) -> dict:
  """The checkpoint's weights, or random ones, placed on `mesh` by the rules table (None: one device)."""
  if checkpoint:
    from dsv4_jax.weights import load_params
    check_checkpoint_config(checkpoint, cfg)
    note(f"loading {checkpoint} ...")
    return load_params(checkpoint, cfg, mesh=mesh)
  note(f"NOTE: no --checkpoint given: config {cfg.name!r} runs on RANDOM weights (seed {seed}); "
       "the generated tokens are meaningless.")
  return init_params(cfg, jax.random.key(seed), mesh=mesh)


@dataclasses.dataclass
class Runner:
  params: dict
  cfg: ModelConfig
  sampling: Sampling
  max_new_tokens: int
  max_seq_len: int | None = None
  stop_ids: tuple = ()
  cache_dtype: str | None = None
  rng: jax.Array | None = None
  mesh: Mesh | None = None       # generation runs under use_mesh(mesh): cache and activations follow the rules
  speculative: str | None = None  # "mtp": MTP speculative decoding (generate's speculative / num_draft)
  num_draft: int = 1

  def __call__(self, prompts) -> GenerateResult:
    prompts = [list(p) for p in prompts]
    n = len(prompts)
    # the batch is split over the mesh's data axis: pad it to a multiple with copies of the first prompt
    # (rows are independent), and drop their results
    pad = (-n) % (self.mesh.shape["data"] if self.mesh is not None else 1)
    with use_mesh(self.mesh):
      r = generate(self.params, self.cfg, prompts + [prompts[0]] * pad, self.max_new_tokens, sampling=self.sampling,
                   rng=self.rng, stop_ids=self.stop_ids, max_seq_len=self.max_seq_len, cache_dtype=self.cache_dtype,
                   speculative=self.speculative, num_draft=self.num_draft)
    timings = {k: v[:n] if isinstance(v, list) else v for k, v in r.timings.items()}   # per-row lists
    return dataclasses.replace(r, prompts=r.prompts[:n], tokens=r.tokens[:n], stop_reasons=r.stop_reasons[:n],
                               timings=timings)


def encode_text(tok, prompt: str | None, chat_file: str | None, thinking_mode: str, raw: bool) -> list[int]:
  from dsv4_jax.chat import chat_prompt, load_chat
  if raw:
    return [tok.bos_id] + tok.encode(prompt)
  text = chat_prompt(load_chat(chat_file) if chat_file else prompt, thinking_mode=thinking_mode)
  return tok.encode(text)


# generate()'s stop reasons that cut the output short, and how the chat printer says so.
_CUT_SHORT = {"max_new_tokens": "at the token limit (--max_new_tokens)", "stop_id": "at a --stop_ids token"}


def show_completion(tok, ids: list[int], thinking_mode: str | None, stream=None,
                    stop_reason: str | None = None) -> dict | None:
  """Prints decoded text; in chat mode through the streaming parser (reasoning / answer / tool calls).
  When `stop_reason` says generation was cut short (token limit, stop id), a reasoning or tool block left
  open prints as "[stopped] stopped at the token limit ..." rather than as malformed output."""
  stream = stream or sys.stdout
  if thinking_mode is None:
    stream.write(tok.decode(ids) + "\n")
    return None
  from dsv4_jax.chat import EventPrinter, StreamParser, to_message
  from dsv4_jax.chat.events import cut_short
  from dsv4_jax.tokenizer import StreamDecoder
  parser, dec, printer, events = StreamParser(thinking_mode), StreamDecoder(tok), EventPrinter(stream), []
  for t in ids:
    if t == tok.eos_id:
      break
    ev = parser.feed(dec.push([t]))
    printer(ev)
    events += ev
  ev = parser.feed(dec.flush()) + parser.finish()
  if stop_reason in _CUT_SHORT:
    ev = cut_short(ev, _CUT_SHORT[stop_reason])
  printer(ev)
  stream.write("\n")
  return to_message(events + ev)


def report(result: GenerateResult, tok=None, thinking_mode: str | None = None) -> None:
  for b, (p, g, why) in enumerate(zip(result.prompts, result.tokens, result.stop_reasons)):
    print(f"[{b}] prompt {len(p)} tokens -> {len(g)} new tokens (stop: {why})")
    print(f"[{b}] ids: {','.join(map(str, g))}")
    if tok is not None:
      show_completion(tok, g, thinking_mode, stop_reason=why)
  t = result.timings
  print(f"prefill {t['prefill_tokens']} tokens in {t['prefill_s']:.3f} s (compile {t['compile_prefill_s']:.1f} s); "
        f"decode {t['decode_tokens_per_s']:.1f} tokens/s (compile {t['compile_decode_s']:.1f} s)", file=sys.stderr)
  if t.get("speculative"):
    print(f"speculative {t['speculative']}, {t['num_draft']} draft(s) per step: accepted {sum(t['accepted'])} of "
          f"{t['num_draft'] * sum(t['steps'])} drafts (rate {t['acceptance_rate']:.2f}), {t['tokens_per_step']:.2f} "
          f"tokens per step; per row accepted {t['accepted']} in steps {t['steps']}", file=sys.stderr)


def result_json(result: GenerateResult, cfg: ModelConfig, random_weights: bool) -> dict:
  return {"config": cfg.name, "random_weights": random_weights, "prompt_ids": result.prompts,
          "generated_ids": result.tokens, "stop_reasons": result.stop_reasons, "timings": result.timings}


def interactive_chat(run: Runner, tok, thinking_mode: str) -> None:
  """A multi-turn loop on stdin: each turn re-encodes the conversation and generates the reply."""
  from dsv4_jax.chat import chat_prompt
  messages = []
  print("chat: empty line or EOF to quit", file=sys.stderr)
  while True:
    try:
      line = input("user> ")
    except EOFError:
      break
    if not line.strip():
      break
    messages.append({"role": "user", "content": line})
    result = run([tok.encode(chat_prompt(messages, thinking_mode=thinking_mode))])
    reply = show_completion(tok, result.tokens[0], thinking_mode, stop_reason=result.stop_reasons[0]) or {}
    messages.append({"role": "assistant", "content": reply.get("content", ""),
                     "reasoning_content": reply.get("reasoning_content", ""),
                     **({"tool_calls": reply["tool_calls"]} if reply.get("tool_calls") else {})})
