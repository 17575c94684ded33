"""Output head: collapse the mHC streams, final RMSNorm, fp32 logits (docs/architecture.md §2.12)."""
import jax.numpy as jnp

from dsv4_jax import mhc
from dsv4_jax.config import ModelConfig
from dsv4_jax.linear import f32_acc_linear, f32_linear
from dsv4_jax.norm import rms_norm
from dsv4_jax.sharding import constrain


def final_hidden(X: jnp.ndarray, hc_head: dict, norm_w: jnp.ndarray, cfg: ModelConfig) -> jnp.ndarray:
  """X: [B,S,nh,D] -> norm(hc_head(X)): [B,S,D] in X.dtype, the head's input."""
  return rms_norm(mhc.hc_head(X, hc_head, cfg.hc_eps, cfg.norm_eps), norm_w, cfg.norm_eps)


def project(x: jnp.ndarray, head_w: jnp.ndarray, cfg: ModelConfig) -> jnp.ndarray:
  """x: [B,S,D] (`final_hidden`) -> [B,S,V] fp32.

  The reference upcasts the bf16 normed activations and the bf16 head weight to fp32. A float32 config does
  exactly that; otherwise the [V, D] weight stays in the compute dtype and the matmul accumulates in fp32
  (`f32_acc_linear`): the same products, summed in fp32, without an fp32 copy of the weight.
  """
  y = f32_linear(x, head_w) if jnp.dtype(cfg.dtype) == jnp.float32 else f32_acc_linear(x, head_w)
  return constrain(y, ("batch", "seq", "act_vocab"))


def logits(X: jnp.ndarray, hc_head: dict, norm_w: jnp.ndarray, head_w: jnp.ndarray, cfg: ModelConfig):
  """X: [B,S,nh,D] -> [B,S,V] fp32."""
  return project(final_hidden(X, hc_head, norm_w, cfg), head_w, cfg)
