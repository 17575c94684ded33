"""Mixture of experts: sqrt-softplus router, hash routing, clamped SwiGLU experts, one shared expert
(docs/architecture.md §2.10).

    s   = sqrt(softplus(x @ gate^T))                         [T, E] fp32
    idx = tid2eid[token]  (hash layers)  |  top-k(s + bias)  (bias only chooses)
    w   = s[idx] / sum(s[idx]) * route_scale
    y   = sum_k w_k * expert_{idx_k}(x) + shared(x)          (weight applied before w2, in fp32)

Routed experts run as grouped matmuls over tokens sorted by expert (`jax.lax.ragged_dot`), so the cost is
that of the chosen experts only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax import quant
from dsv4_jax.config import ModelConfig
from dsv4_jax.linear import f32_linear, fp8_linear
from dsv4_jax.params import ParamSpec
from dsv4_jax.qarray import dense

F32 = jnp.float32


def moe_specs(cfg: ModelConfig, hash_routed: bool) -> dict:
  E, F, D, k = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim, cfg.n_activated_experts
  gate = {"weight": ParamSpec((E, D), ("experts", "embed"))}
  if hash_routed:
    gate["tid2eid"] = ParamSpec((cfg.vocab_size, k), ("vocab", "topk"), "int", ("hash", E))
  else:
    gate["bias"] = ParamSpec((E,), ("experts",), "f32", ("normal", 0.1))
  specs = {
      "gate": gate,
      "experts": {
          "w1": ParamSpec((E, F, D), ("experts", "expert_mlp", "embed")),
          "w2": ParamSpec((E, D, F), ("experts", "embed", "expert_mlp")),
          "w3": ParamSpec((E, F, D), ("experts", "expert_mlp", "embed")),
      },
  }
  if cfg.n_shared_experts:
    Fs = F * cfg.n_shared_experts
    specs["shared_experts"] = {
        "w1": ParamSpec((Fs, D), ("mlp", "embed")),
        "w2": ParamSpec((D, Fs), ("embed", "mlp")),
        "w3": ParamSpec((Fs, D), ("mlp", "embed")),
    }
  return specs


def route(p: dict, cfg: ModelConfig, x: jnp.ndarray, token_ids: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """x: [T,D], token_ids: [T] -> expert ids [T,k] int32, combination weights [T,k] fp32."""
  s = jnp.sqrt(jax.nn.softplus(f32_linear(x, p["weight"])))
  if "tid2eid" in p:
    idx = p["tid2eid"][token_ids].astype(jnp.int32)
  else:
    _, idx = jax.lax.top_k(s + p["bias"].astype(F32), cfg.n_activated_experts)
  w = jnp.take_along_axis(s, idx, axis=-1)
  w = w / jnp.sum(w, axis=-1, keepdims=True) * cfg.route_scale
  return idx, w


def swiglu(g: jnp.ndarray, u: jnp.ndarray, limit: float) -> jnp.ndarray:
  """silu(min(g, limit)) * clip(u, -limit, limit) in fp32; limit 0 = no clamp (as the reference)."""
  g, u = g.astype(F32), u.astype(F32)
  if limit > 0:
    u = jnp.clip(u, -limit, limit)
    g = jnp.minimum(g, limit)
  return jax.nn.silu(g) * u


def shared_expert(p: dict, cfg: ModelConfig, x: jnp.ndarray) -> jnp.ndarray:
  h = swiglu(fp8_linear(x, p["w1"], cfg.quant_sim), fp8_linear(x, p["w3"], cfg.quant_sim), cfg.swiglu_limit)
  return fp8_linear(h.astype(x.dtype), p["w2"], cfg.quant_sim)


def _expert_mlp(p: dict, cfg: ModelConfig, xs: jnp.ndarray, wts: jnp.ndarray, matmul) -> jnp.ndarray:
  """Clamped SwiGLU of one (token, slot) per row: xs [N,D], wts [N] routing weights, matmul(a, w) applies
  each row's expert weight w [E, out, in] -> [N,D] in xs.dtype."""
  if cfg.quant_sim:
    xs = quant.act_quant(xs, 128)
  h = swiglu(matmul(xs, p["w1"]), matmul(xs, p["w3"]), cfg.swiglu_limit)
  h = (h * wts[:, None]).astype(xs.dtype)
  if cfg.quant_sim:
    h = quant.act_quant(h, 128)
  return matmul(h, p["w2"]).astype(xs.dtype)


def _grouped(x: jnp.ndarray, w, group_sizes: jnp.ndarray) -> jnp.ndarray:
  """x: [N, in] sorted by expert; w: [E, out, in] -> [N, out] fp32."""
  return jax.lax.ragged_dot(x, jnp.swapaxes(dense(w, x.dtype), 1, 2), group_sizes, preferred_element_type=F32)


def _gathered(x: jnp.ndarray, w, experts: jnp.ndarray) -> jnp.ndarray:
  """x: [N, in], row n through expert experts[n]; only those experts' weights are read (and dequantised)."""
  w_rows = jax.tree.map(lambda a: a[experts], w)                 # [N, out, in] (QArray: values and scales)
  return jnp.einsum("ni,noi->no", x, dense(w_rows, x.dtype), preferred_element_type=F32)


def routed_experts(p: dict, cfg: ModelConfig, x: jnp.ndarray, idx: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """x: [T,D], idx/w: [T,k] -> sum_k w * expert(x): [T,D] fp32 (each expert's output rounded to x.dtype,
  as the reference's bf16 GEMM output).

  Fewer (token, slot) pairs than experts (decode): gather just the chosen experts' weights. Otherwise sort
  the pairs by expert and run grouped matmuls (`ragged_dot`). Same math either way.
  """
  T, k = idx.shape
  flat = idx.reshape(-1)
  if T * k < cfg.n_routed_experts:
    y = _expert_mlp(p, cfg, jnp.repeat(x, k, axis=0), w.reshape(-1), lambda a, wt: _gathered(a, wt, flat))
  else:
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=cfg.n_routed_experts).astype(jnp.int32)
    y = _expert_mlp(p, cfg, x[order // k], w.reshape(-1)[order], lambda a, wt: _grouped(a, wt, group_sizes))
    y = jnp.zeros_like(y).at[order].set(y)
  return jnp.sum(y.reshape(T, k, -1).astype(F32), axis=1)


def moe(p: dict, cfg: ModelConfig, x: jnp.ndarray, token_ids: jnp.ndarray) -> jnp.ndarray:
  """x: [B,S,D] (ffn_norm output), token_ids: [B,S] -> [B,S,D] in x.dtype."""
  B, S, D = x.shape
  xt = x.reshape(B * S, D)
  idx, w = route(p["gate"], cfg, xt, token_ids.reshape(-1))
  y = routed_experts(p["experts"], cfg, xt, idx, w)
  if "shared_experts" in p:
    y = y + shared_expert(p["shared_experts"], cfg, xt).astype(F32)
  return y.astype(x.dtype).reshape(B, S, D)
