"""MTP speculative decoding: the MTP block drafts, one multi-token step verifies, the cache rolls back.

One iteration, for a row holding L tokens whose next token t_L is known but not yet cached, with drafts
d_1..d_k of the tokens after it:
    verify   the main model appends [t_L, d_1, .., d_k] at positions L..L+k in one cached step
             (inference.step_streams) and gives the target's distribution p_j at each position;
    accept   greedy: the longest prefix of drafts equal to the target's argmax, then the target's token at
             the first mismatch (or the bonus token after k matches); sampling: draft d_j is kept with
             probability min(1, p(d_j) / q(d_j)), the first rejected one is replaced by a sample of
             normalise(max(p - q, 0)), so the output is distributed exactly as plain sampling from p;
    roll back the cache's `length` is set to L + a + 1 (a accepted drafts). Nothing else needs undoing:
             every store is read by position up to `length` and the rings hold `rollback` = k spare rows
             (cache.init_cache), so the rejected tokens leave no trace;
    draft    the MTP block consumes positions L..L+a (the main streams there and the tokens after them)
             and its head drafts d'_1; d'_2.. re-apply the block to its own output streams and the
             previous draft (the usual recipe for k > 1: the released model has one MTP block trained
             for depth 1, so acceptance falls with depth). Those extra MTP positions are rolled back
             the same way (`mtp_length`).

Rows of a batch accept different counts; a stopped row appends nothing. `generate(..., speculative="mtp",
num_draft=k)` runs this loop inside `lax.while_loop`s, one executable per live bucket.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax import head, mtp
from dsv4_jax.config import ModelConfig
from dsv4_jax.inference import _last, step_streams
from dsv4_jax.sampling import Sampling, probabilities, sample

I32 = jnp.int32


def draft(params: dict, cfg: ModelConfig, X_main: jnp.ndarray, next_ids: jnp.ndarray, lengths: jnp.ndarray,
          cache: dict, live: int, num_draft: int, sampling: Sampling, key: jax.Array):
  """The MTP block consumes lengths[b] positions from cache["mtp_length"][b] (main streams X_main
  [B,S,nh,D] there, next_ids [B,S] the token after each), then drafts `num_draft` tokens after the last one.

  -> (drafts [B,k] int32, draft logits [B,k,V] fp32, cache with mtp_length advanced by `lengths`).
  """
  p, layer_id, embed = params["mtp"][0], cfg.n_layers, params["embed"]
  start = cache["mtp_length"]
  Xm, tree = mtp.mtp_step(p, cfg, layer_id, embed, X_main, next_ids, start, lengths, cache["mtp"][0], live)
  X = _last(Xm, lengths - 1)                                               # [B,1,nh,D]
  ones = (lengths > 0).astype(I32)
  drafts, logits = [], []
  for j in range(num_draft):
    if j:                                    # depth j+1: the block again, on its own streams and draft j
      X, tree = mtp.mtp_step(p, cfg, layer_id, embed, X, drafts[-1][:, None], start + lengths + j - 1, ones,
                             tree, live)
    lg = head.logits(X, p["hc_head"], p["norm"], params["head"], cfg)[:, 0]
    key, sub = jax.random.split(key)
    drafts.append(sample(lg, sub, sampling))
    logits.append(lg)
  cache = dict(cache, mtp=[tree] + list(cache["mtp"][1:]), mtp_length=start + lengths)
  return jnp.stack(drafts, 1), jnp.stack(logits, 1), cache


def accept(drafts: jnp.ndarray, draft_logits: jnp.ndarray, target_logits: jnp.ndarray, sampling: Sampling,
           key: jax.Array) -> tuple[jnp.ndarray, jnp.ndarray]:
  """drafts [B,k], draft_logits [B,k,V], target_logits [B,k+1,V] (the target at each verified position)
  -> (a [B] drafts accepted, the token after them [B]).

  Greedy: a = the longest prefix with drafts == argmax(target), then argmax at position a. Sampling: the
  standard rejection rule (accept d_j with probability min(1, p/q); at the first rejection sample
  normalise(max(p - q, 0)); after k acceptances sample p_k), whose output is distributed as p.
  """
  k = drafts.shape[1]
  if sampling.greedy:
    g = jnp.argmax(target_logits, axis=-1).astype(I32)                    # [B,k+1]
    a = jnp.sum(jnp.cumprod(drafts == g[:, :k], axis=1), axis=1).astype(I32)
    return a, jnp.take_along_axis(g, a[:, None], axis=1)[:, 0]
  p = probabilities(target_logits, sampling)                               # [B,k+1,V]
  q = probabilities(draft_logits, sampling)                                # [B,k,V]
  pd = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=2)[..., 0]
  qd = jnp.take_along_axis(q, drafts[..., None], axis=2)[..., 0]           # > 0: d_j was drawn from q_j
  k_u, k_s = jax.random.split(key)
  u = jax.random.uniform(k_u, pd.shape)
  a = jnp.sum(jnp.cumprod(u * qd < pd, axis=1), axis=1).astype(I32)
  resid = jnp.maximum(p[:, :k] - q, 0.0)
  mass = jnp.sum(resid, axis=-1, keepdims=True)
  resid = jnp.where(mass > 0, resid / jnp.where(mass > 0, mass, 1.0), p[:, :k])   # p == q: never rejected
  dist = jnp.concatenate([resid, p[:, k:]], axis=1)                        # [B,k+1,V]
  chosen = jnp.take_along_axis(dist, a[:, None, None], axis=1)[:, 0]       # [B,V]
  return a, jax.random.categorical(k_s, jnp.log(chosen), axis=-1).astype(I32)


def prefill(params: dict, cfg: ModelConfig, tokens, lengths, cache: dict, live: int, num_draft: int,
            sampling: Sampling, key: jax.Array):
  """Prompts in, first token sampled, first drafts made: -> (first token [B], drafts [B,k], draft logits
  [B,k,V], cache). The cache must be empty and built with mtp=True, rollback >= num_draft."""
  X_last, cache = step_streams(params, cfg, tokens, lengths, cache, live)  # the MTP block keeps up
  logits = head.logits(X_last, params["hc_head"], params["norm"], params["head"], cfg)[:, 0]
  key, sub = jax.random.split(key)
  first = sample(logits, sub, sampling)
  drafts, dlogits, cache = draft(params, cfg, X_last, first[:, None], (lengths > 0).astype(I32), cache, live,
                                 num_draft, sampling, key)
  return first, drafts, dlogits, cache


def verify(params: dict, cfg: ModelConfig, pending: jnp.ndarray, drafts: jnp.ndarray, draft_logits: jnp.ndarray,
           running: jnp.ndarray, cache: dict, live: int, sampling: Sampling, key: jax.Array):
  """One speculative iteration for the rows `running` [B] bool: verify [pending, drafts], accept, roll back,
  draft again. -> (emitted [B,k+1] (the first a+1 are this step's tokens), a [B], next drafts, next draft
  logits, cache)."""
  k = drafts.shape[1]
  start = cache["length"]
  toks = jnp.concatenate([pending[:, None], drafts], axis=1)               # [B,k+1]
  X, cache = step_streams(params, cfg, toks, (k + 1) * running.astype(I32), cache, live, all_positions=True)
  logits = head.logits(X, params["hc_head"], params["norm"], params["head"], cfg)   # [B,k+1,V]
  k_acc, k_draft = jax.random.split(key)
  a, nxt = accept(drafts, draft_logits, logits, sampling, k_acc)
  a = jnp.where(running, a, 0)
  j = jnp.arange(k + 1)[None]
  emitted = jnp.where(j < a[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), nxt[:, None])
  cache = dict(cache, length=jnp.where(running, start + a + 1, start))     # the roll-back
  n_new = (a + 1) * running.astype(I32)
  drafts, dlogits, cache = draft(params, cfg, X, emitted, n_new, cache, live, k, sampling, k_draft)
  return emitted, a, drafts, dlogits, cache
