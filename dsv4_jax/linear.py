"""The linear-layer kinds of the reference (docs/architecture.md §2.0).

Weights keep the reference layout `[out, in]`. `fp8_linear` is every layer that is FP8 (or FP4) in the
released checkpoint: under `quant_sim` its input goes through the per-128 FP8 activation round-trip the
real GEMM applies; accumulation is fp32 and the output is in the compute dtype. `f32_linear` is the
fp32 island (compressor, gate, head). `f32_acc_linear` gives the head's fp32 logits from compute-dtype
operands, without an fp32 copy of the weight.
"""
import jax.numpy as jnp

from dsv4_jax import quant, sharding
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


MXU_ROWS = 8   # a TPU matmul unit takes 8 rows at a time (one sublane tile)


def pad_seq_rows(x: jnp.ndarray) -> tuple[jnp.ndarray, int]:
  """x: [B, S, ...] -> (x zero-padded along S so that each device holds at least MXU_ROWS rows, the original S).

  A decode step's matmuls have B*S rows, often 1 per device. XLA:TPU lowers a matmul of fewer than 8 rows to
  a broadcast and multiply-reduce on the vector unit, and in a chain of projections it materialises the
  broadcast input at the weight's shape in fp32: for V4-Flash's grouped output projection (wo_a [8,1024,4096]
  then wo_b [4096,8192]) at batch 1 that is 134.4 MB of temporaries and 403.8 MB accessed for 134.2 MB of
  weights, against 0.3 MB and 135.5 MB with the rows padded (one v5p chip, deviceless compile;
  bench/output_projection.py). S is padded, not the batch: the batch may be split over the mesh (`batch`
  shards, counted here), S never is at decode. The extra rows read no extra weights; callers slice them off.
  Long inputs are returned as they are."""
  B, S = x.shape[:2]
  local_b = -(-B // sharding.axis_shards("batch"))
  if local_b * S >= MXU_ROWS:
    return x, S
  return jnp.pad(x, [(0, 0), (0, -(-MXU_ROWS // local_b) - S)] + [(0, 0)] * (x.ndim - 2)), S
