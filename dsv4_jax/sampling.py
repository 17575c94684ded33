"""Token sampling: greedy, temperature, top-k, top-p (nucleus). Pure functions of logits and a key."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 = greedy (argmax). top_k 0 = off (else exactly top_k tokens, ties to the lower token
  id); top_p 1.0 = off. top-k applies before top-p."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy).")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off).")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1].")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def top_k_mask(logits: jnp.ndarray, k: int) -> jnp.ndarray:
  """logits [B,V] -> the same with all but exactly min(k, V) tokens per row set to -inf. Tokens tied with
  the k-th largest logit are kept in ascending token id until k are kept (lower id wins, as lax.top_k)."""
  vals, keep = jax.lax.top_k(logits, min(k, logits.shape[-1]))               # [B,k]
  return jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], keep].set(vals)


def processed_logits(logits: jnp.ndarray, sampling: Sampling) -> jnp.ndarray:
  """logits [..., V] -> fp32 logits of the distribution `sample` draws from (temperature, then top-k, then
  top-p; excluded tokens at -inf). Not for greedy sampling."""
  shape = logits.shape
  logits = logits.astype(jnp.float32).reshape(-1, shape[-1]) / sampling.temperature
  if sampling.top_k:
    logits = top_k_mask(logits, sampling.top_k)
  if sampling.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs            # mass of strictly more likely tokens
    sorted_logits = jnp.where(before < sampling.top_p, sorted_logits, -jnp.inf)   # keeps at least one
    logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
  return logits.reshape(shape)


def probabilities(logits: jnp.ndarray, sampling: Sampling) -> jnp.ndarray:
  """logits [..., V] -> the probabilities [..., V] fp32 that `sample` draws from (greedy: one-hot on the
  argmax)."""
  if sampling.greedy:
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(processed_logits(logits, sampling), axis=-1)


def sample(logits: jnp.ndarray, key: jax.Array, sampling: Sampling) -> jnp.ndarray:
  """logits [..., V] fp32 -> token ids [...] int32."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, processed_logits(logits, sampling), axis=-1).astype(jnp.int32)
