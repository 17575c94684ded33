"""The linear-layer kinds of the reference (docs/architecture.md §2.0).

Weights keep the reference layout `[out, in]`. `fp8_linear` is every layer that is FP8 (or FP4) in the
released checkpoint: under `quant_sim` its input goes through the per-128 FP8 activation round-trip the
real GEMM applies; accumulation is fp32 and the output is in the compute dtype. `f32_linear` is the
fp32 island (compressor, gate, head). `f32_acc_linear` gives the head's fp32 logits from compute-dtype
operands, without an fp32 copy of the weight.
"""
import jax.numpy as jnp

from dsv4_jax import quant
from dsv4_jax.qarray import dense

F32 = jnp.float32


def fp8_linear(x: jnp.ndarray, w: jnp.ndarray, quant_sim: bool) -> jnp.ndarray:
  """x: [..., in] (compute dtype); w: [out, in]. Returns [..., out] in x.dtype."""
  if quant_sim:
    x = quant.act_quant(x, 128)
  y = jnp.einsum("...i,oi->...o", x, dense(w, x.dtype), preferred_element_type=F32)
  return y.astype(x.dtype)


def plain_linear(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """Compute-dtype matmul with fp32 accumulation (wo_a, indexer.weights_proj)."""
  return jnp.einsum("...i,oi->...o", x, dense(w, x.dtype), preferred_element_type=F32).astype(x.dtype)


def f32_linear(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """Both operands upcast to fp32, fp32 result."""
  return jnp.einsum("...i,oi->...o", x.astype(F32), dense(w, F32), precision="highest")


def f32_acc_linear(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """x: [..., in] (compute dtype), w: [out, in] -> [..., out] fp32: the weight in x.dtype (no copy when it is
  stored so), fp32 accumulation and result. For bf16 operands this is `f32_linear` up to summation order
  (bf16 x bf16 products are exact in fp32), without materialising w in fp32."""
  return jnp.einsum("...i,oi->...o", x, dense(w, x.dtype), preferred_element_type=F32)
