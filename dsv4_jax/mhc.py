"""Manifold-constrained Hyper-Connections (mHC), docs/architecture.md §2.3.

The residual is `nh` streams X: [B, S, nh, D]. Around every sublayer F:
    x, post, comb = hc_pre(X);   X' = hc_post(F(x), X, post, comb)
i.e. X' = comb^T X + post * F(pre . X), with comb projected onto (nearly) doubly-stochastic matrices by
Sinkhorn iterations. All of it is fp32; streams are stored in the compute dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.params import ParamSpec

F32 = jnp.float32


def hc_specs(nh: int, dim: int) -> dict:
  """One mixing site (attention or FFN): fn [(2+nh)*nh, nh*D], base [(2+nh)*nh], scale [3]."""
  mix = (2 + nh) * nh
  return {
      "fn": ParamSpec((mix, nh * dim), ("hc_mix", "embed"), "f32", ("normal", (nh * dim) ** -0.5)),
      "base": ParamSpec((mix,), ("hc_mix",), "f32", ("normal", 0.1)),
      "scale": ParamSpec((3,), (None,), "f32", ("normal_plus_one", 0.1)),
  }


def head_specs(nh: int, dim: int) -> dict:
  """The final collapse hc_head: fn [nh, nh*D], base [nh], scale [1]."""
  return {
      "fn": ParamSpec((nh, nh * dim), ("hc", "embed"), "f32", ("normal", (nh * dim) ** -0.5)),
      "base": ParamSpec((nh,), ("hc",), "f32", ("normal", 0.1)),
      "scale": ParamSpec((1,), (None,), "f32", ("normal_plus_one", 0.1)),
  }


def _mixes(X: jnp.ndarray, fn: jnp.ndarray, norm_eps: float) -> tuple[jnp.ndarray, jnp.ndarray]:
  """fp32 streams [B,S,nh,D] and mixes = (flat(X) @ fn^T) * rsqrt(mean(flat(X)^2) + eps): [B,S,M]."""
  xf = X.astype(F32)
  flat = xf.reshape(*xf.shape[:-2], -1)
  rs = jax.lax.rsqrt(jnp.mean(jnp.square(flat), axis=-1, keepdims=True) + norm_eps)
  mix = jnp.einsum("bsk,mk->bsm", flat, fn.astype(F32), precision="highest") * rs
  return xf, mix


def sinkhorn(logits: jnp.ndarray, iters: int, eps: float) -> jnp.ndarray:
  """[..., n, n] -> row softmax, then alternate column / row normalisation, ending on columns."""
  def normalise_columns(m):
    return m / (jnp.sum(m, axis=-2, keepdims=True) + eps)

  def row_then_column(_, m):
    return normalise_columns(m / (jnp.sum(m, axis=-1, keepdims=True) + eps))

  m = normalise_columns(jax.nn.softmax(logits, axis=-1) + eps)
  return jax.lax.fori_loop(0, iters - 1, row_then_column, m)


def hc_pre(X: jnp.ndarray, p: dict, nh: int, iters: int, hc_eps: float, norm_eps: float):
  """X: [B,S,nh,D] -> (x [B,S,D] in X.dtype, post [B,S,nh] fp32, comb [B,S,nh,nh] fp32)."""
  xf, mix = _mixes(X, p["fn"], norm_eps)
  scale, base = p["scale"].astype(F32), p["base"].astype(F32)
  pre = jax.nn.sigmoid(mix[..., :nh] * scale[0] + base[:nh]) + hc_eps
  post = 2.0 * jax.nn.sigmoid(mix[..., nh:2 * nh] * scale[1] + base[nh:2 * nh])
  comb_logits = (mix[..., 2 * nh:] * scale[2] + base[2 * nh:]).reshape(*mix.shape[:-1], nh, nh)
  comb = sinkhorn(comb_logits, iters, hc_eps)
  x = jnp.einsum("bsj,bsjd->bsd", pre, xf, precision="highest").astype(X.dtype)
  return x, post, comb


def hc_post(f: jnp.ndarray, X_res: jnp.ndarray, post: jnp.ndarray, comb: jnp.ndarray) -> jnp.ndarray:
  """X_new[k] = post[k] * f + sum_j comb[j, k] * X_res[j]; f: [B,S,D], X_res: [B,S,nh,D]."""
  mixed = jnp.einsum("bsjk,bsjd->bskd", comb, X_res.astype(F32), precision="highest")
  return (post[..., None] * f.astype(F32)[..., None, :] + mixed).astype(X_res.dtype)


def hc_head(X: jnp.ndarray, p: dict, hc_eps: float, norm_eps: float) -> jnp.ndarray:
  """Final collapse of the streams: [B,S,nh,D] -> [B,S,D]."""
  xf, mix = _mixes(X, p["fn"], norm_eps)
  pre = jax.nn.sigmoid(mix * p["scale"].astype(F32)[0] + p["base"].astype(F32)) + hc_eps
  return jnp.einsum("bsj,bsjd->bsd", pre, xf, precision="highest").astype(X.dtype)
