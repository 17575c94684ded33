"""Cached inference: `prefill` appends a chunk of tokens per sequence, `decode_step` one token.

Both are the same function, `step`: every batch row appends `lengths[b]` tokens (right-padded in
`tokens`) at its own position `cache["length"][b]`, so a batch may mix prompts of different lengths,
prompts may be prefilled in chunks, and several tokens may be verified at once. The jitted entry points
donate the cache: decoding updates it in place.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax import context_parallel as cp
from dsv4_jax import head, mtp
from dsv4_jax.cache import live_bucket
from dsv4_jax.config import ModelConfig
from dsv4_jax.distributed import to_host
from dsv4_jax.transformer import check_tokens, embed_streams, run_layers


def _last(X: jnp.ndarray, idx: jnp.ndarray) -> jnp.ndarray:
  """X [B,S,nh,D], idx [B] -> [B,1,nh,D]."""
  return jnp.take_along_axis(X, jnp.clip(idx, 0, X.shape[1] - 1)[:, None, None, None], axis=1)


def step_streams(params: dict, cfg: ModelConfig, tokens: jnp.ndarray, lengths: jnp.ndarray, cache: dict,
                 live: int | None = None, all_positions: bool = False, context_parallel: bool = False):
  """`step` up to the head: -> (final streams [B,1,nh,D] at each row's last new token, or with
  `all_positions` (static; S <= cfg.query_chunk) at every position [B,S,nh,D]; updated cache).

  A cache built with `mtp=True` (speculative decoding) also feeds its MTP block every new position but the
  last of each row (whose next token is not known yet), so that MTP cache keeps up with a chunked prefill;
  with `all_positions` (verification) the caller feeds the MTP block the positions it keeps.
  `context_parallel` (static; the cache empty, no MTP caches): the prompt runs whole, each layer's attention
  split over the mesh's `sequence` axis (dsv4_jax/context_parallel.py), instead of chunk by chunk.
  """
  tokens = tokens.astype(jnp.int32)
  lengths = lengths.astype(jnp.int32)
  start = cache["length"]
  live = live or cfg.max_seq_len
  B, S = tokens.shape
  Q = cfg.query_chunk
  with_mtp = "mtp" in cache and not all_positions
  if context_parallel and with_mtp:
    raise ValueError("context_parallel prefill does not feed MTP caches; prefill a speculative cache in chunks.")
  if all_positions and S > Q:
    raise ValueError(f"all_positions needs at most query_chunk={Q} tokens per call; got {S}.")
  nxt = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))                     # the token after each position

  def run(state, toks, nxt_c, start_c, len_c):
    layer_caches, mtp_caches = state
    positions = start_c[:, None] + jnp.arange(toks.shape[1], dtype=jnp.int32)
    X = embed_streams(params, cfg, toks)
    X, layer_caches = run_layers(params["layers"], cfg, X, toks, positions=positions, lengths=len_c,
                                 caches=layer_caches, live=live, fresh=context_parallel)
    if with_mtp:                              # MTP position i: streams X_i and the token i+1, both known
      len_m = jnp.maximum(len_c - (start_c + len_c == start + lengths), 0)
      mtp_caches = [mtp.mtp_step(p, cfg, cfg.n_layers + j, params["embed"], X, nxt_c, start_c, len_m, c, live)[1]
                    for j, (p, c) in enumerate(zip(params["mtp"], mtp_caches))]
    return X, (layer_caches, mtp_caches)

  state = (cache["layers"], cache.get("mtp") if with_mtp else None)
  if S <= Q or context_parallel:
    X, state = run(state, tokens, nxt, start, lengths)
    X_out = X if all_positions else _last(X, lengths - 1)
  else:
    n = -(-S // Q)
    split = lambda t: jnp.moveaxis(jnp.pad(t, ((0, 0), (0, n * Q - S))).reshape(B, n, Q), 1, 0)

    def body(carry, xs):
      state, X_last = carry
      c, toks, nxt_c = xs
      done = jnp.minimum(c * Q, lengths)
      X, state = run(state, toks, nxt_c, start + done, jnp.clip(lengths - c * Q, 0, Q))
      here = (lengths > 0) & ((lengths - 1) // Q == c)
      X_last = jnp.where(here[:, None, None, None], _last(X, lengths - 1 - c * Q), X_last)
      return (state, X_last), None

    X0 = jnp.zeros((B, 1, cfg.hc_mult, cfg.dim), cfg.dtype)
    (state, X_out), _ = jax.lax.scan(body, (state, X0), (jnp.arange(n), split(tokens), split(nxt)))
  new_cache = dict(cache, length=start + lengths, layers=state[0])
  if with_mtp:
    new_cache.update(mtp=state[1], mtp_length=jnp.where(lengths > 0, start + lengths - 1, cache["mtp_length"]))
  return X_out, new_cache


def step(params: dict, cfg: ModelConfig, tokens: jnp.ndarray, lengths: jnp.ndarray, cache: dict,
         live: int | None = None, context_parallel: bool = False):
  """tokens [B,S] (row b's first lengths[b] are real), lengths [B] -> (logits [B,V] fp32 at each row's last
  new token, updated cache). Pure; see `prefill` / `decode_step` for the checked, jitted entry points.

  `live` (static): a bound on the tokens any row holds after the call; compressed stores are read up to
  live // m rows, so the cost follows the live context, not the capacity (default: the whole capacity).
  A call longer than cfg.query_chunk runs as a scan over chunks of that many tokens through the whole
  stack (a chunked prefill inside one executable): activations exist for one chunk at a time, the cache
  is the only thing that grows with S, and only the last positions reach the head. `context_parallel`
  (static): a prompt into an empty cache runs whole, split over the mesh's `sequence` axis (see
  `use_context_parallel`).
  """
  X_last, new_cache = step_streams(params, cfg, tokens, lengths, cache, live, context_parallel=context_parallel)
  logits = head.logits(X_last, params["hc_head"], params["norm"], params["head"], cfg)[:, 0]
  return logits, new_cache


_step_jit = jax.jit(step, static_argnums=(1, 5, 6), donate_argnums=4)


def cache_lengths(cache: dict) -> tuple[np.ndarray, int]:
  """Host-side (one sync, multi-process safe): (tokens cached per row [B], the cache's capacity)."""
  used, cap = to_host((cache["length"], cache["max_seq_len"]))
  return np.asarray(used), int(cap)


def use_context_parallel(cache: dict, used: np.ndarray | None = None) -> bool:
  """Host-side: whether a prefill into `cache` runs context-parallel: the active mesh has a `sequence` axis,
  every row of the cache is empty and it has no MTP caches (speculative decoding prefills in chunks).
  `used`: the cache's lengths if the caller has read them (`cache_lengths`)."""
  if cp.shards() <= 1 or "mtp" in cache:
    return False
  return not (cache_lengths(cache)[0] if used is None else used).any()


def check_append(cfg: ModelConfig, tokens, lengths, cache: dict, used: np.ndarray | None = None,
                 cap: int | None = None) -> int:
  """Host-side checks before any compute: ids in the vocabulary, lengths within the chunk, the batch and
  the capacity of the cache (JAX would otherwise clamp or drop silently). Returns the live bucket of the
  call (`cache.live_bucket`). `used`, `cap`: the cache's lengths and capacity if already read."""
  check_tokens(tokens, cfg)
  B, S = tokens.shape
  lengths = np.asarray(lengths)
  if lengths.shape != (B,):
    raise ValueError(f"lengths must have shape [batch]=({B},); got {lengths.shape}.")
  if (lengths < 0).any() or (lengths > S).any():
    raise ValueError(f"lengths {lengths.tolist()} must lie in [0, {S}] (the chunk length).")
  cache_b = cache["length"].shape[0]
  if B != cache_b:
    raise ValueError(f"batch of {B} sequences does not match the cache's batch of {cache_b}; build the cache "
                     f"with init_cache(cfg, batch_size={B}, ...).")
  if used is None or cap is None:
    used, cap = cache_lengths(cache)
  over = np.nonzero(used + lengths > cap)[0]
  if over.size:
    b = int(over[0])
    raise ValueError(f"sequence {b}: {int(used[b])} cached + {int(lengths[b])} new tokens exceed the cache's "
                     f"max_seq_len={cap}; build a larger cache (init_cache(..., max_seq_len=...)).")
  return live_bucket(int((used + lengths).max()), cap)


def prefill(params: dict, cfg: ModelConfig, tokens, lengths, cache: dict):
  """Appends prompts (or a chunk of them) to the cache: tokens [B,S] right-padded, lengths [B].

  Returns (logits [B,V] at each row's last token, cache). The input cache is donated (invalid afterwards).
  Under a mesh with a `sequence` axis, a prompt into an empty cache runs context-parallel.
  """
  tokens = np.asarray(tokens) if not isinstance(tokens, jax.Array) else tokens
  used, cap = cache_lengths(cache)
  live = check_append(cfg, tokens, lengths, cache, used, cap)
  return _step_jit(params, cfg, jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32), cache, live,
                   use_context_parallel(cache, used))


def decode_step(params: dict, cfg: ModelConfig, next_tokens, cache: dict, live: int | None = None):
  """One token per sequence: next_tokens [B] -> (logits [B,V], cache). Unchecked hot path: the caller
  (e.g. `generate`) guarantees ids and capacity. `live`: the static bucket to compile for (see `step`);
  by default it is read from the cache's lengths (one host sync); pass it to avoid that."""
  next_tokens = jnp.asarray(next_tokens, jnp.int32)
  ones = jnp.ones(next_tokens.shape, jnp.int32)
  if live is None:
    used, cap = cache_lengths(cache)
    live = live_bucket(int(np.max(used)) + 1, cap)
  return _step_jit(params, cfg, next_tokens[:, None], ones, cache, live)
