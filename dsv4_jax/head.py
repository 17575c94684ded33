"""Output head: collapse the mHC streams, final RMSNorm, fp32 logits (docs/architecture.md §2.12)."""
import jax.numpy as jnp

from dsv4_jax import mhc
from dsv4_jax.config import ModelConfig
from dsv4_jax.linear import f32_linear
from dsv4_jax.norm import rms_norm
from dsv4_jax.sharding import constrain


def logits(X: jnp.ndarray, hc_head: dict, norm_w: jnp.ndarray, head_w: jnp.ndarray, cfg: ModelConfig):
  """X: [B,S,nh,D] -> [B,S,V] fp32."""
  x = rms_norm(mhc.hc_head(X, hc_head, cfg.hc_eps, cfg.norm_eps), norm_w, cfg.norm_eps)
  return constrain(f32_linear(x, head_w), ("batch", "seq", "act_vocab"))
