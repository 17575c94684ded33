"""Muon, as DeepSeek-V4 trains its matrices (docs/architecture.md §6, docs/training.md).

For a gradient G of a weight W [n, m] at step t, with learning rate eta and weight decay lambda:

    M_t = mu M_{t-1} + G_t                                   momentum (mu = 0.95)
    O'  = NewtonSchulz(mu M_t + G_t)                         Nesterov; ~ U V^T of the SVD
    O   = O' * sqrt(max(n, m)) * 0.18                        update RMS 0.18: reuses AdamW's learning rate
    W  <- W (1 - eta lambda) - eta O                         decoupled weight decay

NewtonSchulz(X): X0 = X / ||X||_F, then 10 steps of X <- a X + b (X X^T) X + c (X X^T)^2 X, the first 8
with (a, b, c) = (3.4445, -4.7750, 2.0315) (fast growth of the small singular values), the last 2 with
(2, -1.5, 0.5) (convergence to 1).

Every axis but the last two is a batch axis: a stacked [E, F, D] expert weight is E matrices, each
orthogonalised alone, and so is a scanned [layers, ...] axis. The caller (dsv4_jax/train.py) decides
which parameters are matrices; optax.contrib.muon's routing and its NAdam branch do not fit (training.md).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

F32 = jnp.float32
NS_COEFFS: tuple[tuple[float, float, float], ...] = ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2
NS_EPS = 1e-7


def newton_schulz(G: jnp.ndarray, coeffs=NS_COEFFS, eps: float = NS_EPS) -> jnp.ndarray:
  """G: [..., n, m] -> fp32 [..., n, m], every matrix's singular values pushed to ~1 (U V^T).

  The iteration runs on the wide orientation (n <= m) so that X X^T is the smaller Gram matrix."""
  X = G.astype(F32)
  tall = X.shape[-2] > X.shape[-1]
  if tall:
    X = jnp.swapaxes(X, -1, -2)
  X = X / (jnp.sqrt(jnp.sum(jnp.square(X), axis=(-2, -1), keepdims=True)) + eps)

  def step(X, abc):
    a, b, c = abc[0], abc[1], abc[2]
    A = X @ jnp.swapaxes(X, -1, -2)                                   # [..., n, n]
    return a * X + (b * A + c * (A @ A)) @ X, None

  X, _ = jax.lax.scan(step, X, jnp.asarray(coeffs, F32))             # one loop body: small HLO per leaf
  return jnp.swapaxes(X, -1, -2) if tall else X


class ScaleByMuonState(NamedTuple):
  momentum: Any          # M, fp32, like the parameters


def scale_by_muon(momentum: float = 0.95, rms_scale: float = 0.18,
                  coeffs=NS_COEFFS) -> optax.GradientTransformation:
  """G -> O = NewtonSchulz(mu M_t + G_t) * sqrt(max(n, m)) * rms_scale with M_t = mu M_{t-1} + G_t, per
  matrix."""

  def init(params):
    return ScaleByMuonState(jax.tree.map(lambda p: jnp.zeros_like(p, F32), params))     # sharded like p

  def update(updates, state, params=None):
    del params
    m = jax.tree.map(lambda m, g: momentum * m + g.astype(F32), state.momentum, updates)

    def orthogonalise(m, g):
      if g.ndim < 2:
        raise ValueError(f"Muon needs matrices [..., n, m]; got a parameter of shape {g.shape}.")
      o = newton_schulz(momentum * m + g.astype(F32), coeffs)
      return (o * (max(g.shape[-2:]) ** 0.5 * rms_scale)).astype(g.dtype)

    return jax.tree.map(orthogonalise, m, updates), ScaleByMuonState(m)

  return optax.GradientTransformation(init, update)


def muon(learning_rate, momentum: float = 0.95, weight_decay: float = 0.1, rms_scale: float = 0.18,
         coeffs=NS_COEFFS) -> optax.GradientTransformation:
  """The whole Muon update: W <- W (1 - eta lambda) - eta O (`learning_rate` a float or an optax schedule)."""
  return optax.chain(scale_by_muon(momentum, rms_scale, coeffs),
                     optax.add_decayed_weights(weight_decay),
                     optax.scale_by_learning_rate(learning_rate))
