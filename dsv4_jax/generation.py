"""Generation: prefill the prompts, then decode inside jitted `lax.while_loop`s (no host round trip per
token), stopping each sequence on EOS / stop ids or at `max_new_tokens`. The decode runs in segments, one
per live bucket (cache.live_bucket): a step's cost follows the tokens the rows hold, not the capacity."""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.cache import init_cache, live_bucket
from dsv4_jax.config import ModelConfig
from dsv4_jax.inference import step
from dsv4_jax.sampling import Sampling, sample


@dataclasses.dataclass
class GenerateResult:
  prompts: list[list[int]]
  tokens: list[list[int]]           # generated ids per sequence (a final stop id included)
  stop_reasons: list[str]           # "eos" | "stop_id" | "max_new_tokens"
  timings: dict                     # seconds: compile_prefill, prefill, compile_decode, decode; decode tokens/s


def pad_prompts(prompts, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """A list of token-id lists (or an int array [B,S]) -> right-padded int32 [B,S] and lengths [B]."""
  if isinstance(prompts, (np.ndarray, jax.Array)):
    arr = np.asarray(prompts)
    if arr.ndim != 2:
      raise ValueError(f"prompts array must be [batch, seq]; got shape {arr.shape}.")
    prompts = arr.tolist()
  prompts = [list(map(int, p)) for p in prompts]
  if not prompts:
    raise ValueError("no prompts given.")
  for b, p in enumerate(prompts):
    if not p:
      raise ValueError(f"prompt {b} is empty: every prompt needs at least one token (e.g. BOS).")
    bad = [t for t in p if not 0 <= t < vocab_size]
    if bad:
      raise ValueError(f"prompt {b}: token id {bad[0]} is outside the vocabulary [0, {vocab_size}).")
  lengths = np.array([len(p) for p in prompts], np.int32)
  tokens = np.zeros((len(prompts), int(lengths.max())), np.int32)
  for b, p in enumerate(prompts):
    tokens[b, : len(p)] = p
  return tokens, lengths


def _record(i, tok, state, eos_id, stop_ids):
  """Stores token i of every still-running row and updates the stop flags (0 running, 1 eos, 2 stop id)."""
  out, n, stopped = state
  running = stopped == 0
  out = out.at[:, i].set(jnp.where(running, tok, 0))
  n = n + running.astype(jnp.int32)
  is_stop = jnp.isin(tok, stop_ids) if stop_ids.size else jnp.zeros_like(running)
  stopped = jnp.where(running & (tok == eos_id), 1, jnp.where(running & is_stop, 2, stopped))
  return out, n, stopped


def _first_token(logits, key, sampling: Sampling, max_new: int, eos_id: int, stop_ids):
  """Token 0 of every row, sampled from the prefill logits -> (tokens [B,max_new], n, stopped, last, key)."""
  B = logits.shape[0]
  key, sub = jax.random.split(key)
  tok = sample(logits, sub, sampling)
  state = (jnp.zeros((B, max_new), jnp.int32), jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32))
  return (*_record(0, tok, state, eos_id, stop_ids), tok, key)


def _decode_loop(params, cfg: ModelConfig, sampling: Sampling, live: int, eos_id: int, i0, i1, out, n, stopped,
                 last, cache, key, stop_ids):
  """Tokens i0..i1-1 (or until every row stopped): each iteration appends the last token of the running
  rows (stopped rows append nothing) and samples the next; no step runs after the last token. `live`
  (static) bounds the tokens any row holds during these steps (see inference.step)."""
  def cond(s):
    i, _, _, stopped, *_ = s
    return (i < i1) & jnp.any(stopped == 0)

  def body(s):
    i, out, n, stopped, last, cache, key = s
    logits, cache = step(params, cfg, last[:, None], (stopped == 0).astype(jnp.int32), cache, live)
    key, sub = jax.random.split(key)
    tok = sample(logits, sub, sampling)
    out, n, stopped = _record(i, tok, (out, n, stopped), eos_id, stop_ids)
    return i + 1, out, n, stopped, tok, cache, key

  _, out, n, stopped, last, cache, key = jax.lax.while_loop(cond, body, (i0, out, n, stopped, last, cache, key))
  return out, n, stopped, last, cache, key


_PREFILL = jax.jit(step, static_argnums=(1, 5), donate_argnums=4)
_FIRST = jax.jit(_first_token, static_argnums=(2, 3, 4))
_DECODE = jax.jit(_decode_loop, static_argnums=(1, 2, 3, 4), donate_argnums=11)
_EXECUTABLES: dict = {}


def _aot(key: tuple, arrays, lower) -> tuple:
  """(executable, compile seconds): compiled ahead of time once per static key and array signature, so that
  compile time is reported apart from run time and repeated calls reuse the executable."""
  leaves, tree = jax.tree.flatten(arrays)
  key = key + (tree, tuple((np.shape(x), str(x.dtype) if hasattr(x, "dtype") else type(x)) for x in leaves))
  if key in _EXECUTABLES:
    return _EXECUTABLES[key], 0.0
  t0 = time.perf_counter()
  _EXECUTABLES[key] = lower().compile()
  return _EXECUTABLES[key], time.perf_counter() - t0


def generate(params: dict, cfg: ModelConfig, prompts, max_new_tokens: int, sampling: Sampling | None = None,
             rng: jax.Array | None = None, stop_ids: Sequence[int] = (), stop_on_eos: bool = True,
             max_seq_len: int | None = None, cache_dtype=None) -> GenerateResult:
  """Generates up to `max_new_tokens` for each prompt (lists of ids of any lengths, or [B,S]).

  The cache holds `max_seq_len` tokens (default: the longest prompt plus max_new_tokens); everything is
  checked before any compute. Seeded by `rng` (default key 0): the same call gives the same tokens.
  """
  sampling = sampling or Sampling()
  rng = jax.random.key(0) if rng is None else rng
  tokens, lengths = pad_prompts(prompts, cfg.vocab_size)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
  need = int(lengths.max()) + max_new_tokens
  max_seq_len = max_seq_len or need
  if need > max_seq_len or need > cfg.max_seq_len:
    limit = min(max_seq_len, cfg.max_seq_len)
    raise ValueError(f"the longest prompt ({int(lengths.max())} tokens) plus max_new_tokens={max_new_tokens} "
                     f"needs {need} positions but the cache holds {limit} (max_seq_len={max_seq_len}, config "
                     f"max_seq_len={cfg.max_seq_len}); shorten the prompt or lower max_new_tokens.")
  stops = jnp.asarray(list(stop_ids), jnp.int32)
  eos_id = cfg.eos_token_id if stop_on_eos else -1
  cache = init_cache(cfg, tokens.shape[0], max_seq_len, cache_dtype)   # ids and capacity checked above

  timings = {}
  used = int(lengths.max())
  live = live_bucket(used, max_seq_len)
  prefill_c, timings["compile_prefill_s"] = _aot(
      ("prefill", cfg, live), (params, tokens, lengths, cache),
      lambda: _PREFILL.lower(params, cfg, tokens, lengths, cache, live))
  t0 = time.perf_counter()
  logits, cache = prefill_c(params, tokens, lengths, cache)
  logits.block_until_ready()
  timings["prefill_s"] = time.perf_counter() - t0

  first_c, timings["compile_decode_s"] = _aot(
      ("first", sampling, max_new_tokens, eos_id), (logits, rng, stops),
      lambda: _FIRST.lower(logits, rng, sampling, max_new_tokens, eos_id, stops))
  t0 = time.perf_counter()
  compile_in_loop = 0.0
  out, n, stopped, last, key = first_c(logits, rng, stops)
  i = 1
  while i < max_new_tokens and bool(jax.device_get(jnp.any(stopped == 0))):
    # one executable per live bucket: tokens i..i1-1 keep every row within `live` tokens
    live = live_bucket(used + i, max_seq_len)
    i1 = min(max_new_tokens, live - used + 1)
    args = (jnp.int32(i), jnp.int32(i1), out, n, stopped, last, cache, key, stops)
    loop_c, secs = _aot(("decode", cfg, sampling, live, eos_id), (params, *args),
                        lambda: _DECODE.lower(params, cfg, sampling, live, eos_id, *args))
    compile_in_loop += secs
    out, n, stopped, last, cache, key = loop_c(params, *args)
    i = i1
  out, n, stopped = jax.device_get((out, n, stopped))
  timings["decode_s"] = time.perf_counter() - t0 - compile_in_loop
  timings["compile_decode_s"] += compile_in_loop
  n_tokens = int(np.sum(n))
  timings["decode_tokens_per_s"] = n_tokens / timings["decode_s"] if timings["decode_s"] > 0 else float("nan")
  timings["prefill_tokens"] = int(lengths.sum())
  reasons = {0: "max_new_tokens", 1: "eos", 2: "stop_id"}
  return GenerateResult(
      prompts=[tokens[b, : lengths[b]].tolist() for b in range(len(lengths))],
      tokens=[out[b, : n[b]].tolist() for b in range(len(n))],
      stop_reasons=[reasons[int(s)] for s in stopped],
      timings=timings)
