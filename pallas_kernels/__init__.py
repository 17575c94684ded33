"""Pallas kernels for DeepSeek-V4's attention ops, for TPU (Mosaic) and GPU (Triton).

One file per kernel, each equal to a plain-jnp reference in `dsv4_jax.ops`:
    sparse_attention.py   sparse MQA with a sink over gathered rows   (ops.sparse_attention_ref)
    indexer.py            lightning-indexer scores, top-k in XLA      (ops.indexer_topk_ref)
    compressor.py         gated softmax pooling of m tokens           (ops.compress_pool_ref)
    encode.py             KV entries -> the cache's stored words      (ops.encode_rows_ref)
Helpers: rowcodec.py (decoding stored KV rows inside a kernel), platform.py (backend choice, limits).

Importing the package registers the kernels with `dsv4_jax.ops` under `cfg.attn_impl`:
    "pallas"      the default device's backend (CPU: the TPU kernels, interpreted)
    "pallas_tpu"  Mosaic TPU kernels (interpreted unless on a TPU; a CPU host can AOT-compile them)
    "pallas_gpu"  Triton kernels (interpreted unless on a GPU; a CPU host can lower them for CUDA)
"""
from __future__ import annotations

import functools

from dsv4_jax import ops
from pallas_kernels import compressor, encode, indexer, sparse_attention


def _register() -> None:
  for name, backend in (("pallas", None), ("pallas_tpu", "tpu"), ("pallas_gpu", "gpu")):
    ops.register(name, planar_reads=False,       # the kernels decode stored rows in natural dim order
                 indexer_topk=functools.partial(indexer.indexer_topk, backend=backend),
                 sparse_attention=functools.partial(sparse_attention.sparse_attention, backend=backend),
                 compress_pool=functools.partial(compressor.pool, backend=backend),
                 encode_rows=functools.partial(encode.encode_rows, backend=backend))


_register()
