"""RMSNorm as the reference computes it (docs/architecture.md §2.2): fp32 inside, weight applied in fp32
before the cast back."""
import jax
import jax.numpy as jnp

F32 = jnp.float32


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
  """x: [..., N]; weight: [N]. Returns x.dtype."""
  xf = x.astype(F32)
  y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
  return (weight.astype(F32) * y).astype(x.dtype)


def head_rms_rescale(q: jnp.ndarray, eps: float) -> jnp.ndarray:
  """Unweighted per-head RMS rescale of the attention queries, in q's own dtype (bf16 in the reference:
  the mean is accumulated in fp32 and rounded; eps-add, rsqrt and the multiply are bf16 ops)."""
  ms = jnp.mean(jnp.square(q.astype(F32)), axis=-1, keepdims=True).astype(q.dtype)
  return q * jax.lax.rsqrt(ms + jnp.asarray(eps, q.dtype))
