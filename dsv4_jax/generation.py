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

from dsv4_jax import context_parallel as cp
from dsv4_jax import sharding
from dsv4_jax.distributed import to_host
from dsv4_jax import speculative as spec
from dsv4_jax.cache import init_cache, live_bucket
from dsv4_jax.config import ModelConfig
from dsv4_jax.inference import step
from dsv4_jax.sampling import Sampling, sample


@dataclasses.dataclass
class GenerateResult:
  prompts: list[list[int]]
  tokens: list[list[int]]           # generated ids per sequence (a final stop id included)
  stop_reasons: list[str]           # "eos" | "stop_id" | "max_new_tokens"
  timings: dict                     # seconds: compile_prefill, prefill, compile_decode, decode; decode tokens/s;
                                    # speculative: steps, accepted drafts per row, acceptance rate, tokens/step


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
  is_stop = jnp.isin(tok, stop_ids)
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


def _record_many(emitted, count, state, eos_id, stop_ids, max_new: int):
  """Appends emitted[b, :count[b]] to row b's tokens (count 0: a stopped row), stopping at the first EOS /
  stop id among them and at max_new tokens."""
  out, n, stopped = state
  j = jnp.arange(emitted.shape[1])[None]
  is_eos = emitted == eos_id
  hit = (is_eos | jnp.isin(emitted, stop_ids)) & (j < count[:, None])
  first = jnp.argmax(hit, axis=1)
  count = jnp.minimum(jnp.where(jnp.any(hit, axis=1), first + 1, count), max_new - n)
  b = jnp.arange(emitted.shape[0])[:, None]
  out = out.at[b, jnp.where(j < count[:, None], n[:, None] + j, max_new)].set(emitted, mode="drop")
  stop_kept = jnp.any(hit, axis=1) & (first < count)
  reason = jnp.where(jnp.take_along_axis(is_eos, first[:, None], axis=1)[:, 0], 1, 2)
  return out, n + count, jnp.where(stop_kept, reason, stopped)


def _spec_prefill(params, cfg: ModelConfig, tokens, lengths, cache, live: int, num_draft: int, sampling: Sampling,
                  max_new: int, eos_id: int, key, stop_ids):
  """Prefill with the MTP block, token 0 of every row, the first drafts."""
  key, sub = jax.random.split(key)
  first, drafts, dlogits, cache = spec.prefill(params, cfg, tokens, lengths, cache, live, num_draft, sampling, sub)
  B = first.shape[0]
  state = (jnp.zeros((B, max_new), jnp.int32), jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32))
  out, n, stopped = _record(0, first, state, eos_id, stop_ids)
  return out, n, stopped, first, drafts, dlogits, cache, key


def _spec_loop(params, cfg: ModelConfig, sampling: Sampling, live: int, eos_id: int, max_new: int, out, n, stopped,
               pending, drafts, dlogits, cache, key, stop_ids, accepted, steps):
  """Speculative iterations (dsv4_jax/speculative.py) while a row runs and every row's verification fits in
  `live` (static) tokens. accepted / steps [B]: drafts accepted and verify steps per row."""
  k = drafts.shape[1]

  def running(n, stopped):
    return (stopped == 0) & (n < max_new)

  def cond(s):                 # stopped rows may hold more tokens (a last step's overshoot): not counted
    _, n, stopped, _, _, _, cache, *_ = s
    run = running(n, stopped)
    return jnp.any(run) & (jnp.max(jnp.where(run, cache["length"], 0)) + k + 1 <= live)

  def body(s):
    out, n, stopped, pending, drafts, dlogits, cache, key, accepted, steps = s
    key, sub = jax.random.split(key)
    run = running(n, stopped)
    emitted, a, drafts, dlogits, cache = spec.verify(params, cfg, pending, drafts, dlogits, run, cache, live,
                                                     sampling, sub)
    out, n, stopped = _record_many(emitted, (a + 1) * run, (out, n, stopped), eos_id, stop_ids, max_new)
    pending = jnp.where(run, jnp.take_along_axis(emitted, a[:, None], axis=1)[:, 0], pending)
    return (out, n, stopped, pending, drafts, dlogits, cache, key, accepted + a * run, steps + run)

  return jax.lax.while_loop(cond, body, (out, n, stopped, pending, drafts, dlogits, cache, key, accepted, steps))


_PREFILL = jax.jit(step, static_argnums=(1, 5, 6), donate_argnums=4)
_SPEC_PREFILL = jax.jit(_spec_prefill, static_argnums=(1, 5, 6, 7, 8, 9), donate_argnums=4)
_SPEC_LOOP = jax.jit(_spec_loop, static_argnums=(1, 2, 3, 4, 5), donate_argnums=12)
_FIRST = jax.jit(_first_token, static_argnums=(2, 3, 4))
_DECODE = jax.jit(_decode_loop, static_argnums=(1, 2, 3, 4), donate_argnums=11)
_EXECUTABLES: dict = {}


def _aot(key: tuple, arrays, lower) -> tuple:
  """(executable, compile seconds): compiled ahead of time once per static key and array signature, so that
  compile time is reported apart from run time and repeated calls reuse the executable (under the same
  mesh: the active mesh is part of the key, as it is of jit's)."""
  leaves, tree = jax.tree.flatten(arrays)
  key = key + (sharding.active_mesh()[0], tree, tuple((np.shape(x), str(x.dtype) if hasattr(x, "dtype") else type(x)) for x in leaves))
  if key in _EXECUTABLES:
    return _EXECUTABLES[key], 0.0
  t0 = time.perf_counter()
  _EXECUTABLES[key] = lower().compile()
  return _EXECUTABLES[key], time.perf_counter() - t0


def _plain(params, cfg, tokens, lengths, max_new_tokens, sampling, rng, stops, eos_id, cache, timings):
  """Prefill, then one token per step. -> (out, n, stopped) on the host."""
  max_seq_len = int(cache["max_seq_len"])
  used = int(lengths.max())
  live = live_bucket(used, max_seq_len)
  split = cp.shards() > 1                  # the cache is empty: the prompt may run context-parallel
  prefill_c, timings["compile_prefill_s"] = _aot(
      ("prefill", cfg, live, split), (params, tokens, lengths, cache),
      lambda: _PREFILL.lower(params, cfg, tokens, lengths, cache, live, split))
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
  while i < max_new_tokens and bool(to_host(jnp.any(stopped == 0))):
    # one executable per live bucket: tokens i..i1-1 keep every row within `live` tokens
    live = live_bucket(used + i, max_seq_len)
    i1 = min(max_new_tokens, live - used + 1)
    args = (jnp.int32(i), jnp.int32(i1), out, n, stopped, last, cache, key, stops)
    loop_c, secs = _aot(("decode", cfg, sampling, live, eos_id), (params, *args),
                        lambda: _DECODE.lower(params, cfg, sampling, live, eos_id, *args))
    compile_in_loop += secs
    out, n, stopped, last, cache, key = loop_c(params, *args)
    i = i1
  out, n, stopped = to_host((out, n, stopped))
  timings["decode_s"] = time.perf_counter() - t0 - compile_in_loop
  timings["compile_decode_s"] += compile_in_loop
  return out, n, stopped


def _speculative(params, cfg, tokens, lengths, max_new_tokens, sampling, rng, stops, eos_id, cache, timings, k):
  """Prefill with the MTP block, then verify k drafts per step (dsv4_jax/speculative.py). -> (out, n,
  stopped) on the host; acceptance counts go to `timings`."""
  max_seq_len = int(cache["max_seq_len"])
  live = live_bucket(int(lengths.max()) + k, max_seq_len)
  args = (tokens, lengths, cache)
  prefill_c, timings["compile_prefill_s"] = _aot(
      ("spec_prefill", cfg, live, k, sampling, max_new_tokens, eos_id), (params, *args, rng, stops),
      lambda: _SPEC_PREFILL.lower(params, cfg, *args, live, k, sampling, max_new_tokens, eos_id, rng, stops))
  t0 = time.perf_counter()
  state = prefill_c(params, *args, rng, stops)
  jax.block_until_ready(state)
  timings["prefill_s"] = time.perf_counter() - t0
  timings["compile_decode_s"] = 0.0
  zeros = jnp.zeros((tokens.shape[0],), jnp.int32)
  state = (*state, stops, zeros, zeros)          # out, n, stopped, pending, drafts, dlogits, cache, key, ..
  t0 = time.perf_counter()
  compile_in_loop = 0.0
  while True:
    out, n, stopped, _, _, _, cache, *_ = state
    length, n_h, stopped_h = to_host((cache["length"], n, stopped))
    run = (stopped_h == 0) & (n_h < max_new_tokens)
    if not run.any():
      break
    live = live_bucket(int(length[run].max()) + k + 1, max_seq_len)     # <= capacity for running rows
    loop_c, secs = _aot(("spec", cfg, sampling, live, eos_id, max_new_tokens), (params, *state),
                        lambda: _SPEC_LOOP.lower(params, cfg, sampling, live, eos_id, max_new_tokens, *state))
    compile_in_loop += secs
    out, n, stopped, pending, drafts, dlogits, cache, key, accepted, steps = loop_c(params, *state)
    state = (out, n, stopped, pending, drafts, dlogits, cache, key, stops, accepted, steps)
  out, n, stopped, accepted, steps = to_host((state[0], state[1], state[2], state[9], state[10]))
  timings["decode_s"] = time.perf_counter() - t0 - compile_in_loop
  timings["compile_decode_s"] += compile_in_loop
  timings.update(speculative="mtp", num_draft=k, steps=steps.tolist(), accepted=accepted.tolist(),
                 acceptance_rate=float(accepted.sum() / max(1, k * steps.sum())),
                 tokens_per_step=float((n.sum() - len(n)) / max(1, steps.sum())))
  return out, n, stopped


STOP_IDS_PAD = 8


def _stop_array(stop_ids: Sequence[int]) -> jax.Array:
  """The stop ids as int32 [n], padded with -1 (no token's id) to a multiple of STOP_IDS_PAD: the number of
  stop ids is part of the compiled programs, so calls with up to 8 stop ids (none included) share them."""
  ids = [int(t) for t in stop_ids]
  n = max(1, -(-len(ids) // STOP_IDS_PAD)) * STOP_IDS_PAD
  return jnp.asarray(ids + [-1] * (n - len(ids)), jnp.int32)


def generate(params: dict, cfg: ModelConfig, prompts, max_new_tokens: int, sampling: Sampling | None = None,
             rng: jax.Array | None = None, stop_ids: Sequence[int] = (), stop_on_eos: bool = True,
             max_seq_len: int | None = None, cache_dtype=None, speculative: str | None = None,
             num_draft: int = 1) -> GenerateResult:
  """Generates up to `max_new_tokens` for each prompt (lists of ids of any lengths, or [B,S]).

  The cache holds `max_seq_len` tokens (default: the longest prompt plus max_new_tokens, plus num_draft when
  speculating); everything is checked before any compute. Seeded by `rng` (default key 0): the same call
  gives the same tokens. `speculative="mtp"`: the MTP block drafts `num_draft` tokens per step and one
  cached step verifies them (dsv4_jax/speculative.py); greedy output equals plain greedy decoding, sampled
  output has the same distribution. Per-row accepted drafts and steps land in `timings`.
  """
  sampling = sampling or Sampling()
  rng = jax.random.key(0) if rng is None else rng
  tokens, lengths = pad_prompts(prompts, cfg.vocab_size)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
  extra = 0
  if speculative is not None:
    if speculative != "mtp":
      raise ValueError(f"speculative={speculative!r}: the only drafter is 'mtp' (None: plain decoding).")
    if not cfg.n_mtp_layers or not params.get("mtp"):
      raise ValueError(f"speculative='mtp' needs the MTP block, but config {cfg.name!r} / these parameters have "
                       "none (n_mtp_layers=0 or an empty params['mtp']).")
    if not 1 <= num_draft < cfg.query_chunk:
      raise ValueError(f"num_draft={num_draft} must be in [1, {cfg.query_chunk - 1}] (one verify step holds "
                       f"num_draft + 1 <= query_chunk tokens).")
    extra = num_draft
  need = int(lengths.max()) + max_new_tokens + extra
  max_seq_len = max_seq_len or need
  if need > max_seq_len or need > cfg.max_seq_len:
    limit = min(max_seq_len, cfg.max_seq_len)
    raise ValueError(f"the longest prompt ({int(lengths.max())} tokens) plus max_new_tokens={max_new_tokens}"
                     + (f" plus num_draft={extra}" if extra else "") + f" needs {need} positions but the cache "
                     f"holds {limit} (max_seq_len={max_seq_len}, config max_seq_len={cfg.max_seq_len}); shorten "
                     "the prompt or lower max_new_tokens.")
  stops = _stop_array(stop_ids)
  eos_id = cfg.eos_token_id if stop_on_eos else -1
  timings = {}
  if speculative:
    cache = init_cache(cfg, tokens.shape[0], max_seq_len, cache_dtype, rollback=extra, mtp=True)
    out, n, stopped = _speculative(params, cfg, tokens, lengths, max_new_tokens, sampling, rng, stops, eos_id,
                                   cache, timings, num_draft)
  else:
    cache = init_cache(cfg, tokens.shape[0], max_seq_len, cache_dtype)   # ids and capacity checked above
    out, n, stopped = _plain(params, cfg, tokens, lengths, max_new_tokens, sampling, rng, stops, eos_id, cache,
                             timings)
  n_tokens = int(np.sum(n))
  timings["decode_tokens_per_s"] = n_tokens / timings["decode_s"] if timings["decode_s"] > 0 else float("nan")
  timings["prefill_tokens"] = int(lengths.sum())
  reasons = {0: "max_new_tokens", 1: "eos", 2: "stop_id"}
  return GenerateResult(
      prompts=[tokens[b, : lengths[b]].tolist() for b in range(len(lengths))],
      tokens=[out[b, : n[b]].tolist() for b in range(len(n))],
      stop_reasons=[reasons[int(s)] for s in stopped],
      timings=timings)
