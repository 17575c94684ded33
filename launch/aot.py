r"""AOT memory plan: compile prefill and decode (and a training step, --steps=train) for a TPU slice or a GPU node
with no accelerator present, and say whether they fit.

  python -m launch.aot --config=flash --topology=v5p-64 --mesh=data:2,expert:16 --batch=8 --max_seq_len=131072
  python -m launch.aot --config=pro --topology=v6e:8x8 --mesh=data:1,expert:64 --batch=1 --max_seq_len=1048576
  python -m launch.aot --config=tiny --topology=v5p:2x2x1 --mesh=expert:4 --batch=4 --max_seq_len=2048 \
      --config.attn_impl=pallas_tpu
  python -m launch.aot --config=flash --topology=h200:8 --mesh=expert:8 --batch=4 --max_seq_len=131072

Compiles, deviceless (libtpu from PyPI, `make setup` puts it under .aot/libtpu; docs: ../shared/docs/pallas.md
§1.5), the prefill step (one chunk of cfg.query_chunk tokens appended to a cache of --max_seq_len, live bucket =
--max_seq_len: the last chunk of the longest prompt) and the decode step (one token, same live bucket) (and with
--steps=prompt a whole prompt of --max_seq_len tokens into an empty cache, context-parallel over `sequence`), with every
weight, cache leaf and activation sharded by the rules table (dsv4_jax/sharding.py) on --mesh. Arguments are
abstract (jax.ShapeDtypeStruct with shardings): nothing is allocated. Prints per chip (or GPU): weights, cache,
temporaries (XLA's memory_analysis), the total against the chip's HBM and whether it fits; then the largest batch
that fits at that context, by linear scaling: cache per sequence exactly from the cache shapes, temporaries per
sequence from a second compile of each step at another batch size (--max_batch=off skips it).

--topology: either the Cloud TPU accelerator-type name or an explicit physical shape, or a GPU node.
  * NAME-N: for v5p (and v4) N counts TensorCores, 2 per chip: v5p-64 = 32 chips (2x4x4); for v5e and v6e N
    counts chips: v6e-64 = 64 chips (8x8). tpu7x takes the explicit form only.
  * GEN:AxB[xC]: the physical chip grid, as pallas_kernels/aot.py uses: v5e:2x2, v6e:4x8, v5p:2x2x1, tpu7x:2x2x1.
  * GPU:N: N GPUs (h100:8, h200:8, b200:8; gpu:N with --hbm_gib for any other GPU).
HBM per chip: v5e 16 GiB, v6e 32 GiB, v5p 95 GiB, tpu7x 192 GiB (--hbm_gib overrides).
Memory per GPU, NVIDIA's datasheet figures read as decimal GB (10^9 bytes): H100 SXM 80 GB (74.5 GiB), H200 SXM
141 GB (131.3 GiB), B200 (HGX/DGX B200) 180 GB (167.6 GiB; 192 GB was the figure announced at GTC 2024, the
shipping HGX/DGX B200 datasheets say 180 GB). The drivers report a little more (nvidia-smi shows an H100 80GB
as 81559 MiB = 79.6 GiB, an H200 as about 140 GiB), so these are conservative by ~6%; --hbm_gib overrides.

The GPU plan (GPU:N) is an XLA:CPU stand-in, not an XLA:GPU compile: there is no deviceless XLA:GPU compile from
PyPI, so the child process runs with JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=N
and compiles the same steps, with the same shardings and the same abstract arguments, on an N-device CPU mesh.
What that means for the numbers:
  * weights and cache per GPU are exact: they are the shards of the abstract arrays, whatever the backend;
  * temporaries are XLA:CPU's buffer assignment standing in for XLA:GPU's: an estimate, and an inflated one.
    On CPU the expert exchange is the padded all-to-all emulation (dsv4_jax/expert_parallel.py: XLA:CPU has
    no ragged-all-to-all), ragged_dot is a masked dense dot ([16, rows, 4096] f32 selects in Flash's
    prefill), and XLA:CPU has no bf16 or fp8 dot, so it upcasts weights, whole layer stacks at a time (an
    f32[20,8192,4096] convert, 2.5 GiB, in Flash's decode). Measured on the same mesh and batch (Flash,
    expert:4, batch 4, 128K): XLA:CPU 19.42 / 18.55 GiB of temporaries (prefill / decode) against libtpu's
    6.79 / 4.55 GiB for v5p-8, about 3-4x. So the table reads them as an upper bound ("temporaries<="), not a
    proof (XLA:GPU has its own workspaces and scheduling). What is inflated is the fixed part (prefill: 60.76
    GiB per chip on XLA:CPU against 47.31 on libtpu); the growth per sequence is close, even lower (0.86 GiB
    against 1.06), so the extrapolated largest batch comes out low (26 against libtpu's 31 at 95 GiB), an
    estimate on the low side rather than a bound;
  * the fits column says "maybe" where weights + cache (+ other) fit and only the temporaries' upper bound
    does not (the verdict: MAY FIT), "NO" only where weights + cache alone overflow; the largest batch is
    bracketed by the one with no temporaries at all. XLA:CPU never runs out of memory while compiling: the
    verdict is arithmetic on its numbers;
  * jax on a GPU preallocates 75% of the memory by default. The verdict is against --mem_fraction (default
    0.95) of the memory: run with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (or XLA_PYTHON_CLIENT_PREALLOCATE=false)
    to get it; the CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers live in the remaining 5%;
  * attn_impl=pallas*: refused (XLA:CPU cannot compile Mosaic GPU or Triton kernels); the plan is for
    attn_impl=xla.
Flash and Pro at full depth compile in 30 to 60 s per step on XLA:CPU (2-core machine, ~1.3 GiB resident).

--weights=released: the released checkpoint's storage (fp4 routed experts, or fp8 for -Base configs whose
expert_dtype is fp8; fp8 with 128x128 e8m0 scales for wq_a, wq_b, wkv, wo_b, indexer wq_b, shared experts, MTP
e_proj/h_proj; wo_a dequantised as the loader does; the rest bf16 / fp32), as `QArray`s the model dequantises
inside its matmuls. --weights=bf16: every weight dense in the compute dtype.

The compile runs only in a child process (this script re-runs itself: for a TPU with .aot/libtpu on PYTHONPATH
and the TPU_* variables set; for a GPU with the CPU variables above), so importing launch.aot or running the CPU
tests never starts a TPU backend. Bad flags or a mesh that does not match the topology or the model fail with
one `error: ...` line and exit code 2, before the child starts. A compile that runs out of HBM is reported as
"does not fit" with XLA's numbers.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time

from absl import flags
from ml_collections import config_flags

from launch import common
from launch.common import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBTPU = os.path.join(ROOT, ".aot", "libtpu")
GiB = 2 ** 30
HBM_GIB = {"v5e": 16, "v6e": 32, "v5p": 95, "v4": 32, "tpu7x": 192}
CORES_IN_NAME = {"v5p": 2, "v4": 2}          # NAME-N counts TensorCores on these generations
GRID_RANK = {"v5e": 2, "v6e": 2, "v5p": 3, "v4": 3, "tpu7x": 3}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v7x": "tpu7x"}
GPU_GB = {"h100": 80, "h200": 141, "b200": 180}     # datasheet GB (10^9 bytes) per GPU; "gpu" needs --hbm_gib
GPU_NAMES = {"h100": "NVIDIA H100", "h200": "NVIDIA H200", "b200": "NVIDIA B200", "gpu": "GPU"}
GPU_MEM_FRACTION = 0.95                               # XLA_PYTHON_CLIENT_MEM_FRACTION the verdict assumes
STEPS = ("prefill", "decode", "prompt", "train")

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(common.CONFIG_DIR, "flash.py"),
                                          "configs/ name or .py config file.", lock_config=False)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-8", "TPU slice: NAME-N (v5p/v4: N counts TensorCores, 2 per "
                                "chip, so v5p-64 is 32 chips; v5e/v6e: N chips) or GEN:AxB[xC] (v6e:4x8, v5p:2x4x4); "
                                "or N GPUs: h100:8, h200:8, b200:8, gpu:N (with --hbm_gib), planned on XLA:CPU.")
_MESH = flags.DEFINE_string("mesh", None, "Mesh over the slice's chips, AXIS:SIZE pairs over data, sequence, tensor, "
                            "expert (sizes multiply to the chip count). Default: experts over as many chips as "
                            "divide the expert count, data over the rest.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences (a multiple of the mesh's data axis).")
_MAX_SEQ = flags.DEFINE_integer("max_seq_len", 131072, "Cache capacity in tokens (also the live bucket compiled).")
_WEIGHTS = flags.DEFINE_enum("weights", "released", ["released", "bf16"], "Weight storage (see the module doc).")
_CACHE_DTYPE = flags.DEFINE_enum("cache_dtype", "paper", ["paper", "bfloat16", "float32"],
                                 "KV cache storage: paper = fp8 entries / fp4 indexer keys + scales.")
_STEPS = flags.DEFINE_list("steps", ["prefill", "decode"], "Steps to compile: prefill (one query_chunk appended to "
                           "the cache), decode (one token), prompt (a whole --max_seq_len prompt into an empty "
                           "cache: context-parallel over the mesh's sequence axis, else chunk by chunk), train "
                           "(one optimizer step of launch.train's defaults on --batch sequences of --max_seq_len "
                           "tokens: fp32 master weights and optimizer state, bf16 compute, full remat).")
_MAX_BATCH = flags.DEFINE_enum("max_batch", "scale", ["scale", "off"], "scale: a second compile per step at "
                               "another batch gives temporaries per sequence, and so the largest batch that fits.")
_HBM = flags.DEFINE_float("hbm_gib", None, "HBM per chip (or GPU) in GiB (default: by generation, see --help).")
_MEM_FRACTION = flags.DEFINE_float("mem_fraction", None, "GPUs: the fraction of each GPU's memory jax may use "
                                   f"(XLA_PYTHON_CLIENT_MEM_FRACTION; default {GPU_MEM_FRACTION}); the verdict "
                                   "is against it. TPUs: 1.")
_HLO_DIR = flags.DEFINE_string("hlo_dir", None, "Write each compiled step's HLO text here (STEP.hlo.txt).")
_JSON = flags.DEFINE_string("json", None, "Also write the per-step numbers (bytes per chip / GPU) as JSON here.")
_LAYERS = flags.DEFINE_integer("layers", None, "Compile only the first N layers (quick looks; the report says so).")
_IN_CHILD = flags.DEFINE_bool("in_compile_process", False, "Internal: set on the child process that compiles "
                               "(libtpu for a TPU, N CPU devices for a GPU node).")
_TIMEOUT = flags.DEFINE_integer("timeout", 7200, "Seconds before the compile process is stopped.")


# ---- topology ------------------------------------------------------------------------------------------

def _grid(chips: int, rank: int) -> tuple[int, ...]:
  """The usual physical grid of a slice of `chips` (a power of two): v5p 4 -> 2x2x1, 8 -> 2x2x2, 32 -> 2x4x4,
  64 -> 4x4x4; v5e/v6e 4 -> 2x2, 8 -> 2x4, 16 -> 4x4, 32 -> 4x8."""
  if chips < 1 or chips & (chips - 1):
    raise UsageError(f"a slice of {chips} chips: the NAME-N form needs a power-of-two chip count; give the "
                     "grid instead (e.g. v5p:2x2x3).")
  if chips == 1:
    return (1,) * rank
  dims = [2, 2] + [1] * (rank - 2) if rank == 3 else [1, 1]
  if rank == 3 and chips < 4:
    raise UsageError(f"{chips} chips: 3-D slices (v5p, v4, tpu7x) start at 4 chips (2x2x1).")
  while math.prod(dims) < chips:
    lo = min(dims)
    i = max(j for j, d in enumerate(dims) if d == lo)
    dims[i] *= 2
  return tuple(dims)


def is_gpu(gen: str) -> bool:
  return gen in GPU_NAMES


def parse_topology(spec: str) -> tuple[str, str, int]:
  """"v5p-64" | "v5p:2x4x4" -> (generation, "v5p:2x4x4" for jax.experimental.topologies, chips);
  "h200:8" -> ("h200", "h200:8", 8) (GPUs: see `is_gpu`)."""
  s = spec.strip().lower()
  g = re.fullmatch(r"([a-z0-9]+):(\d+)", s)
  if g and g.group(1) in GPU_NAMES:
    n = int(g.group(2))
    if n < 1:
      raise UsageError(f"--topology={spec!r}: needs at least 1 GPU.")
    return g.group(1), f"{g.group(1)}:{n}", n
  m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)+))", s)
  if not m:
    raise UsageError(f"--topology={spec!r}: expected NAME-N (v5p-64, v6e-16), GEN:AxB[xC] (v6e:4x8, v5p:2x4x4) "
                     "or GPU:N (h200:8, h100:8, b200:8, gpu:8).")
  gen = ALIASES.get(m.group(1), m.group(1))
  if gen not in HBM_GIB:
    raise UsageError(f"--topology={spec!r}: unknown TPU generation {m.group(1)!r}; known: {', '.join(HBM_GIB)} "
                     f"(GPUs: {', '.join(GPU_NAMES)}, as GPU:N).")
  if m.group(3):
    dims = tuple(int(d) for d in m.group(3).split("x"))
    if len(dims) != GRID_RANK[gen] or min(dims) < 1:
      raise UsageError(f"--topology={spec!r}: {gen} grids have {GRID_RANK[gen]} positive dimensions.")
  else:
    if gen == "tpu7x":
      raise UsageError(f"--topology={spec!r}: give tpu7x slices as a grid, e.g. tpu7x:2x2x1.")
    n = int(m.group(2))
    per = CORES_IN_NAME.get(gen, 1)
    if n % per:
      raise UsageError(f"--topology={spec!r}: {gen}-N counts TensorCores ({per} per chip); N must be even.")
    dims = _grid(n // per, GRID_RANK[gen])
  return gen, f"{gen}:{'x'.join(map(str, dims))}", math.prod(dims)


# ---- the plan (runs in the libtpu process) ---------------------------------------------------------------

FP8_LEAVES = re.compile(r"(attn/(wq_a|wq_b|wkv|wo_b)|attn/indexer/wq_b|shared_experts/w[123]|e_proj|h_proj)$")
EXPERT_LEAVES = re.compile(r"ffn/experts/w[123]$")


def weight_format(path: str, cfg, weights: str) -> str | None:
  """"fp8" | "fp4" | None (dense) for a parameter path under --weights."""
  if weights != "released":
    return None
  if EXPERT_LEAVES.search(path):
    return cfg.expert_dtype or "fp4"
  return "fp8" if FP8_LEAVES.search(path) else None


def abstract_params(cfg, mesh, weights: str):
  """The parameter tree as ShapeDtypeStructs sharded by the rules table (QArrays of them for quantised
  leaves); nothing is allocated."""
  import jax
  import jax.numpy as jnp
  from dsv4_jax import qarray
  from dsv4_jax.params import is_spec, path_str
  from dsv4_jax.sharding import param_sharding
  from dsv4_jax.transformer import param_specs

  def sds(shape, dtype, axes):
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=param_sharding(axes, tuple(shape), mesh))

  def leaf(path, spec):
    fmt = weight_format(path_str(path), cfg, weights) if spec.kind == "weight" else None
    if fmt is None:
      return sds(spec.shape, spec.dtype(cfg.dtype), spec.axes)
    block = qarray.FP8_BLOCK if fmt == "fp8" else qarray.FP4_BLOCK
    vshape = spec.shape if fmt == "fp8" else spec.shape[:-1] + (spec.shape[-1] // 2,)
    vdtype = jnp.float8_e4m3fn if fmt == "fp8" else jnp.uint8
    return qarray.QArray(sds(vshape, vdtype, spec.axes), sds(qarray.scale_shape(spec.shape, block), jnp.uint8,
                                                            spec.axes), block, fmt)

  return jax.tree_util.tree_map_with_path(leaf, param_specs(cfg), is_leaf=is_spec)


def abstract_cache(cfg, mesh, batch: int, max_seq_len: int, cache_dtype: str):
  import jax
  from dsv4_jax.cache import cache_axes, init_cache
  from dsv4_jax.sharding import param_sharding
  cache = jax.eval_shape(lambda: init_cache(cfg, batch, max_seq_len, cache_dtype))
  axes = cache_axes(cache)
  is_axes = lambda x: isinstance(x, tuple)
  shardings = jax.tree.map(lambda ax, a: param_sharding(ax, a.shape, mesh), axes, cache, is_leaf=is_axes)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), cache, shardings)


def per_chip_bytes(tree) -> int:
  """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
  import jax
  import numpy as np
  total = 0
  for a in jax.tree.leaves(tree):
    shape = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
  return total


def compile_step(cfg, mesh, params, step: str, batch: int, max_seq_len: int, cache_dtype: str):
  """-> dict(weights, cache, temp, other, total bytes per chip, seconds, hlo) or dict(oom=message, ...)."""
  import jax
  import jax.numpy as jnp
  from dsv4_jax import inference
  from dsv4_jax.sharding import param_sharding

  cache = abstract_cache(cfg, mesh, batch, max_seq_len, cache_dtype)
  S = {"prefill": min(cfg.query_chunk, max_seq_len), "decode": 1, "prompt": max_seq_len}[step]
  split = step == "prompt" and mesh.shape.get("sequence", 1) > 1       # context-parallel (empty cache)
  tok_axes = ("batch", "seq" if split else None)
  tokens = jax.ShapeDtypeStruct((batch, S), jnp.int32, sharding=param_sharding(tok_axes, (batch, S), mesh))
  lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=param_sharding(("batch",), (batch,), mesh))
  logits = param_sharding(("batch", None), (batch, cfg.vocab_size), mesh)
  cache_sh = jax.tree.map(lambda a: a.sharding, cache)
  live = max_seq_len
  f = jax.jit(lambda p, t, n, c: inference.step(p, cfg, t, n, c, live, split), donate_argnums=3,
              out_shardings=(logits, cache_sh))
  out = {"weights": per_chip_bytes(params), "cache": per_chip_bytes(cache), "batch": batch, "tokens": S}
  return _compiled(out, f, (params, tokens, lengths, cache), mesh, args_counted=out["weights"] + out["cache"])


def _state_shardings(state, params, mesh):
  """Shardings of an abstract TrainState built from the sharded abstract `params`: a parameter's own; an
  optimizer leaf (a moment, a momentum) that of the parameter whose path ends its own path, with the same shape
  (optax keeps moments in trees shaped like the parameters); anything else (step counts, scalars) replicated."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec
  by_path = {tuple(path): (leaf.shape, leaf.sharding) for path, leaf in
             jax.tree_util.tree_flatten_with_path(params)[0]}
  replicated = NamedSharding(mesh, PartitionSpec())

  def of(path, leaf):
    for k in range(len(path)):
      hit = by_path.get(tuple(path[k:]))
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(of, state)


def compile_train(cfg, mesh, batch: int, seq_len: int):
  """One training step (dsv4_jax.train, launch.train's defaults) on abstract arguments -> the dict of
  `compile_step`, with weights = fp32 master weights + optimizer state per chip (also apart: params, optimizer)
  and no cache."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec
  from dsv4_jax import train
  from dsv4_jax.sharding import param_sharding

  tc = train.TrainConfig(batch_size=batch, seq_len=seq_len)
  params = abstract_params(cfg, mesh, "bf16")
  tx = train.make_optimizer(tc, params)
  shapes = jax.eval_shape(lambda p: train.init_train_state(p, tx, cfg, tc), params)
  state_sh = _state_shardings(shapes, params, mesh)
  state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), shapes, state_sh)
  split = mesh.shape.get("sequence", 1) > 1
  tok = param_sharding(("batch", "seq" if split else None), (batch, seq_len), mesh)
  data = {"tokens": jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=tok),
          "loss_mask": jax.ShapeDtypeStruct((batch, seq_len), jnp.float32, sharding=tok)}
  f = jax.jit(train._train_step, donate_argnums=0, out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())))
  p_bytes, o_bytes = per_chip_bytes(state.params), per_chip_bytes(state.opt_state)
  out = {"weights": p_bytes + o_bytes, "params": p_bytes, "optimizer": o_bytes, "cache": 0, "batch": batch,
         "tokens": seq_len}
  return _compiled(out, f, (state, data), mesh, args_counted=p_bytes + o_bytes)


def _compiled(out: dict, f, args: tuple, mesh, args_counted: int) -> dict:
  """Compiles jitted `f` on abstract `args` under `mesh`; fills `out` with seconds, temp, other, total and hlo,
  or `oom` (XLA reports an HBM overflow as a compile error: that is the answer)."""
  from dsv4_jax.sharding import use_mesh
  t0 = time.time()
  try:
    with use_mesh(mesh):
      compiled = f.trace(*args).lower().compile()
  except Exception as e:  # noqa: BLE001
    msg = " ".join(str(e).split())
    if "RESOURCE_EXHAUSTED" not in msg and "Ran out of memory" not in msg:
      raise
    out.update(oom=msg, seconds=time.time() - t0)
    return out
  out["seconds"] = time.time() - t0
  ma = compiled.memory_analysis()
  out["temp"] = int(ma.temp_size_in_bytes)
  out["other"] = max(0, int(ma.argument_size_in_bytes) - args_counted) + max(
      0, int(ma.output_size_in_bytes) - int(ma.alias_size_in_bytes))
  out["total"] = out["weights"] + out["cache"] + out["temp"] + out["other"]
  out["hlo"] = compiled.as_text()
  return out


def _gib(b: float) -> str:
  return f"{b / GiB:.2f} GiB"


def _oom_used(msg: str) -> str:
  m = re.search(r"(Used [^.]*? of [^.]*? hbm[^.]*\.(?: Exceeded [^.]*\.)?)", msg)
  return m.group(1) if m else msg[:300]


COLLECTIVES = ("ragged-all-to-all", "all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")


def _collectives(hlo: str, cpu: bool = False) -> str:
  counts = {k: len(re.findall(rf"\b{k}(?:-start)?\(", hlo)) for k in COLLECTIVES}
  counts["all-to-all"] -= counts["ragged-all-to-all"]       # "ragged-all-to-all(" also ends in "all-to-all("
  text = ", ".join(f"{k} {v}" for k, v in counts.items())
  if cpu:                                                    # no Mosaic on XLA:CPU
    return text + " (XLA:CPU: the expert exchange's ragged all-to-alls are emulated by padded all-to-alls)"
  return text + "; " + _kernels(hlo)


def _kernels(hlo: str) -> str:
  """Mosaic custom calls in the compiled HLO: XLA's own ragged-dot kernels apart from the Pallas kernels."""
  names = [line for line in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
  ragged = sum("ragged-dot" in n or "ragged_dot" in n for n in names)
  return f"Mosaic custom calls {len(names)} (XLA ragged-dot {ragged}, Pallas kernels {len(names) - ragged})"


def _compile_pallas_for_tpu(cfg):
  """In the libtpu process the default backend is the CPU (no chips), so the Pallas kernels would pick interpret
  mode: register "pallas_tpu" with interpret=False (Mosaic TPU kernels) and compile "pallas" as it."""
  import dataclasses
  import functools
  if not cfg.attn_impl.startswith("pallas"):
    return cfg
  if cfg.attn_impl == "pallas_gpu":
    raise UsageError("attn_impl=pallas_gpu cannot compile for a TPU topology; use pallas_tpu (or xla).")
  from dsv4_jax import ops
  from pallas_kernels import compressor, encode, indexer, sparse_attention
  kw = dict(backend="tpu", interpret=False)
  ops.register("pallas_tpu", indexer_topk=functools.partial(indexer.indexer_topk, **kw),
               sparse_attention=functools.partial(sparse_attention.sparse_attention, **kw),
               compress_pool=functools.partial(compressor.pool, **kw),
               encode_rows=functools.partial(encode.encode_rows, **kw))
  return dataclasses.replace(cfg, attn_impl="pallas_tpu")


def _devices(gen: str, grid: str):
  """The compile target's devices and their name: TPU topology devices (no chips needed), or for a GPU node the
  N host CPU devices of the child process (XLA_FLAGS=--xla_force_host_platform_device_count=N)."""
  import jax
  if is_gpu(gen):
    devices, chips = jax.devices("cpu"), int(grid.split(":")[1])
    if len(devices) != chips:
      raise RuntimeError(f"{grid}: the compile process has {len(devices)} CPU devices, not {chips} "
                         "(XLA_FLAGS=--xla_force_host_platform_device_count did not take).")
    return devices, GPU_NAMES[gen]
  from jax.experimental import topologies
  dims = [int(d) for d in grid.split(":")[1].split("x")]
  small = {"chips_per_host_bounds": dims + [1] * (3 - len(dims))} if math.prod(dims) < 4 else {}   # < one host
  devices = topologies.get_topology_desc(topology_name=grid, platform="tpu", **small).devices
  return devices, devices[0].device_kind


def plan(cfg, topo_name: str, topo_grid: str, mesh_spec: str | None, batch: int, max_seq_len: int, weights: str,
         cache_dtype: str, steps: list[str], max_batch: str, hbm: float, hlo_dir: str | None,
         mem_fraction: float = 1.0, json_path: str | None = None) -> int:
  """Compiles `steps` for the target and prints the report. hbm: memory per chip / GPU in bytes; the verdict and
  the largest batch are against mem_fraction * hbm (1 on TPUs; jax's usable fraction on GPUs)."""
  import jax
  from dsv4_jax.runtime import describe_mesh
  from dsv4_jax.sharding import make_mesh

  gen = topo_grid.split(":")[0]
  gpu = is_gpu(gen)
  if not gpu:
    cfg = _compile_pallas_for_tpu(cfg)
  devices, kind = _devices(gen, topo_grid)
  mesh = make_mesh(mesh_spec, cfg, devices=devices)
  data = int(mesh.shape["data"])
  usable = mem_fraction * hbm
  unit = "GPU" if gpu else "chip"
  expert_fmt = (cfg.expert_dtype or "fp4") if weights == "released" else None
  wdesc = (f"released ({expert_fmt} routed experts, fp8 dense projections)" if weights == "released"
           else f"dense {cfg.dtype}")
  if gpu:
    sheet = f"{GPU_GB[gen]} GB = " if abs(hbm - GPU_GB.get(gen, 0) * 1e9) < 1 else ""   # datasheet, or --hbm_gib
    mem_desc = f"{sheet}{hbm / GiB:.1f} GiB each, usable {mem_fraction:.0%} = {usable / GiB:.1f} GiB"
    print(f"aot plan: config {cfg.name} ({cfg.n_layers} layers), {topo_name} = {len(devices)} x {kind} "
          f"({mem_desc}), compiled on {len(devices)} XLA:CPU devices standing in; {describe_mesh(mesh)}",
          flush=True)
    print("  NOTE: an XLA:CPU stand-in for XLA:GPU. Weights and cache per GPU are exact (the shards of the "
          "abstract arrays). Temporaries are XLA:CPU's buffer assignment, read as an upper bound: on CPU the "
          "expert exchange is the padded all-to-all emulation, ragged_dot a masked dense dot, and bf16 / fp8 "
          "weights are upcast for XLA:CPU's dots (3-4x libtpu's temporaries for Flash on the same mesh). "
          f"Usable memory assumes XLA_PYTHON_CLIENT_MEM_FRACTION={mem_fraction:g} (jax's default preallocation "
          "is 0.75) or XLA_PYTHON_CLIENT_PREALLOCATE=false.", flush=True)
  else:
    print(f"aot plan: config {cfg.name} ({cfg.n_layers} layers), {topo_name} = {topo_grid}, {len(devices)} chips "
          f"({kind}, HBM {hbm / GiB:.0f} GiB each); {describe_mesh(mesh)}", flush=True)
  kinds = ([f"weights {wdesc}, cache {cache_dtype}, compute {cfg.dtype}"] if set(steps) - {"train"} else []) + (
      ["train: fp32 master weights and optimizer state, bfloat16 compute"] if "train" in steps else [])
  print(f"  batch {batch} x max_seq_len {max_seq_len} (live bucket {max_seq_len}), {'; '.join(kinds)}, "
        f"attn_impl {cfg.attn_impl}, jax {jax.__version__}", flush=True)
  params = abstract_params(cfg, mesh, weights)
  results = {}
  for step in steps:
    print(f"compiling {step} for {topo_name} (batch {batch}) ...", flush=True)
    r = (compile_train(cfg, mesh, batch, max_seq_len) if step == "train" else
         compile_step(cfg, mesh, params, step, batch, max_seq_len, cache_dtype))
    results[step] = r
    print(f"  {step}: compiled in {r['seconds']:.1f} s", flush=True)
    if hlo_dir and "hlo" in r:
      os.makedirs(hlo_dir, exist_ok=True)
      with open(os.path.join(hlo_dir, f"{step}.hlo.txt"), "w") as f:
        f.write(r["hlo"])

  if gpu:
    print(f"\nper GPU ({len(devices)} x {kind}, {hbm / GiB:.1f} GiB, usable {usable / GiB:.1f} GiB), batch {batch}, "
          f"context {max_seq_len} (weights, cache: the shards of the abstract arrays, exact; temporaries: XLA:CPU "
          "memory_analysis, an upper bound for XLA:GPU; other: XLA's arguments beyond them (tokens, padding) + "
          "outputs not aliased to the donated cache):")
  else:
    print(f"\nper chip ({len(devices)} x {kind}, {hbm / GiB:.0f} GiB HBM), batch {batch}, context {max_seq_len} "
          "(weights, cache: the shards of the abstract arrays; temporaries: XLA memory_analysis; other: XLA's "
          "arguments beyond them (tokens, tile padding) + outputs not aliased to the donated cache):")
  temp_head = "temporaries<=" if gpu else "temporaries"      # <=: an upper bound on the GPU (module doc)
  of = "usable" if gpu else "HBM"
  tw = len(temp_head)
  print(f"  {'step':8s} {'weights':>11s} {'cache':>11s} {temp_head:>{tw}s} {'other':>10s} {'total':>11s}  fits")
  for step, r in results.items():
    if "oom" in r:
      print(f"  {step:8s} {_gib(r['weights']):>11s} {_gib(r['cache']):>11s} {'-':>{tw}s} {'-':>10s} {'-':>11s}  NO: "
            f"XLA: {_oom_used(r['oom'])}")
      continue
    print(f"  {step:8s} {_gib(r['weights']):>11s} {_gib(r['cache']):>11s} {_gib(r['temp']):>{tw}s} "
          f"{_gib(r['other']):>10s} {_gib(r['total']):>11s}  {_fits(r, usable, of, gpu)}")
  for step, r in results.items():
    if "hlo" in r:
      print(f"  {step} collectives: {_collectives(r['hlo'], gpu)}")
  if "train" in results:
    r = results["train"]
    print(f"  train: weights = fp32 master weights {_gib(r['params'])} + optimizer state {_gib(r['optimizer'])} "
          f"(Muon momentum, AdamW moments); {batch} sequences of {max_seq_len} tokens, no cache")

  serving = {k: r for k, r in results.items() if k != "train"}
  if max_batch == "scale" and serving:
    _largest_batch(cfg, mesh, params, serving, batch, data, max_seq_len, cache_dtype, usable, topo_name, unit)
  ok = all("oom" not in r and r["total"] <= usable for r in results.values())
  no = any("oom" in r or r["total"] - r["temp"] > usable for r in results.values())
  if json_path:
    import json
    keys = ("weights", "params", "optimizer", "cache", "temp", "other", "total", "batch", "seconds", "oom")
    with open(json_path, "w") as f:
      json.dump({"config": cfg.name, "topology": topo_name, "devices": len(devices), "device_kind": kind,
                 "mesh": {k: int(v) for k, v in mesh.shape.items()}, "batch": batch, "max_seq_len": max_seq_len,
                 "hbm_bytes": hbm, "usable_bytes": usable, "xla_cpu_stand_in": gpu, "fits": ok,
                 "fits_without_temporaries": not no,
                 "steps": {st: {k: r[k] for k in keys if k in r} for st, r in results.items()}}, f, indent=1)
  where = f"{topo_name} (XLA:CPU stand-in, {mem_fraction:.0%} of memory usable)" if gpu else topo_name
  word = "FITS" if ok else "DOES NOT FIT" if no or not gpu else "MAY FIT"
  what = (f"{weights} weights, {cache_dtype} cache" if serving else
          "training: fp32 master weights and optimizer state")
  maybe = ": weights + cache fit, the temporaries' XLA:CPU upper bound does not; only an XLA:GPU compile decides."
  print(f"\nverdict: {cfg.name} {word} on {where} at batch {batch} x {max_seq_len} tokens ({what})"
        + (maybe if word == "MAY FIT" else "."), flush=True)
  return 0


def _fits(r: dict, usable: float, of: str, gpu: bool) -> str:
  """The table's last column. GPUs: the temporaries are an upper bound, so a step that fits only without them
  is "maybe"; one whose weights + cache + other alone overflow is a sure NO."""
  pct = f"{100 * r['total'] / usable:.0f}% of {of}"
  if r["total"] <= usable:
    return f"yes ({pct})"
  if not gpu:
    return f"NO ({pct})"
  sure = r["total"] - r["temp"]
  if sure > usable:
    return f"NO ({pct}; weights + cache + other alone {100 * sure / usable:.0f}%)"
  return f"maybe ({pct} with the temporaries' upper bound, {100 * sure / usable:.0f}% without them)"


def _largest_batch(cfg, mesh, params, results, batch, data, max_seq_len, cache_dtype, hbm, topo_name,
                   unit: str = "chip"):
  """Linear in the batch per chip (or GPU): weights fixed; cache exact per sequence; temporaries per sequence
  from a second compile. Largest multiple of the data axis whose every step fits in `hbm` bytes."""
  print(f"\nlargest batch at {max_seq_len} tokens (by scaling: cache per sequence exact from the cache shapes, "
        "temporaries per sequence from compiles at two batch sizes):")
  best, best_hi = None, math.inf
  for step, r1 in results.items():
    other = [b for b in (batch // 2, batch * 2) if b >= data and b % data == 0 and b != batch]
    r2 = None
    for b2 in other[:1] if "oom" not in r1 else [b for b in (batch // 2, batch // 4) if b >= data and b % data == 0]:
      print(f"compiling {step} for {topo_name} (batch {b2}) ...", flush=True)
      r2 = compile_step(cfg, mesh, params, step, b2, max_seq_len, cache_dtype)
      print(f"  {step}: compiled in {r2['seconds']:.1f} s", flush=True)
      if "oom" not in r2:
        break
    pts = [r for r in (r1, r2) if r is not None and "oom" not in r]
    if len(pts) < 2:
      print(f"  {step}: cannot scale (needs two batch sizes that compile; got {len(pts)})")
      continue
    a, b = sorted(pts, key=lambda r: r["batch"])
    db = b["batch"] - a["batch"]
    cache_seq = (b["cache"] - a["cache"]) / db
    temp_seq = ((b["temp"] + b["other"]) - (a["temp"] + a["other"])) / db
    note = ""
    if temp_seq < 0:          # XLA's scheduling is not linear in the batch: take no growth, the larger fixed part
      note, temp_seq = f" (measured slope {temp_seq / 2**20:.1f} MiB clamped to 0)", 0.0
    fixed = a["weights"] + max(r["temp"] + r["other"] - temp_seq * r["batch"] for r in (a, b))
    per_seq = cache_seq + temp_seq
    n = int((hbm - fixed) // per_seq) if per_seq > 0 else 0
    n = max(0, n // data * data)
    hi_text = ""
    if unit == "GPU":         # the temporaries are an upper bound: bracket the batch with none at all
      hi = max(0, int((hbm - a["weights"] - a["other"]) // cache_seq) // data * data) if cache_seq > 0 else 0
      hi_text, best_hi = f" ({hi} with no temporaries at all)", min(best_hi, hi)
    print(f"  {step:8s} fixed {_gib(fixed)} per {unit} + {per_seq / 2**20:.2f} MiB per sequence "
          f"(cache {cache_seq / 2**20:.2f} MiB, temporaries {temp_seq / 2**20:.2f} MiB{note}; from batches "
          f"{a['batch']} and {b['batch']}) -> at most {n} sequences{hi_text}")
    best = n if best is None else min(best, n)
  if best is not None:
    bound = (f"; XLA:CPU's fixed temporaries are inflated, so likely low; at most {best_hi} with no temporaries at "
             "all" if unit == "GPU" else "")
    print(f"  largest batch that fits every step: {best} (a multiple of data:{data}; extrapolated, not compiled"
          f"{bound})")


# ---- entry points ----------------------------------------------------------------------------------------

def _config(layers: int | None):
  import dataclasses
  from dsv4_jax.config import from_config_dict
  cfg = from_config_dict(_CONFIG.value)
  if layers:
    if not 1 <= layers <= cfg.n_layers:
      raise UsageError(f"--layers={layers}: must lie in [1, {cfg.n_layers}].")
    cfg = dataclasses.replace(cfg, n_layers=layers, compress_ratios=cfg.compress_ratios[:layers]
                              + cfg.compress_ratios[cfg.n_layers:])
  return cfg


def _check(cfg, gen: str, chips: int):
  """Flag checks that need no compile process: the mesh against the chip (GPU) count and the model, the batch
  against data, what the GPU stand-in cannot do."""
  from jax.sharding import AbstractMesh
  from dsv4_jax import sharding
  shape = sharding.parse_mesh(_MESH.value) if _MESH.value else sharding.default_mesh_shape(chips, cfg)
  sizes = tuple(int(shape.get(a, 1)) for a in sharding.MESH_AXES)
  if math.prod(sizes) != chips:
    given = ",".join(f"{a}:{n}" for a, n in zip(sharding.MESH_AXES, sizes) if n > 1) or "1 device"
    raise ValueError(f"mesh {given} has {math.prod(sizes)} devices but --topology={_TOPOLOGY.value} has {chips} "
                     f"{'GPUs' if is_gpu(gen) else 'chips'}; the axis sizes must multiply to {chips}"
                     + (f" ({gen}-N counts TensorCores, 2 per chip)." if gen in CORES_IN_NAME and "-" in _TOPOLOGY.value
                        else "."))
  sharding.check_mesh(AbstractMesh(sizes, sharding.MESH_AXES), cfg)
  data = shape.get("data", 1)
  if _BATCH.value < 1 or _BATCH.value % data:
    raise UsageError(f"--batch={_BATCH.value} must be a positive multiple of the mesh's data axis ({data}).")
  if _MAX_SEQ.value < 1:
    raise UsageError(f"--max_seq_len={_MAX_SEQ.value} must be >= 1.")
  bad = [s for s in _STEPS.value if s not in STEPS]
  if bad or not _STEPS.value:
    raise UsageError(f"--steps={','.join(_STEPS.value)}: choose from {', '.join(STEPS)}.")
  if is_gpu(gen):
    if cfg.attn_impl.startswith("pallas"):
      raise UsageError(f"attn_impl={cfg.attn_impl}: a GPU plan compiles on XLA:CPU, which cannot compile Mosaic "
                       "GPU or Triton kernels; use --config.attn_impl=xla.")
    if gen == "gpu" and not _HBM.value:
      raise UsageError(f"--topology={_TOPOLOGY.value}: give the memory per GPU with --hbm_gib (or name the GPU: "
                       f"{', '.join(GPU_GB)}).")
  elif _MEM_FRACTION.value is not None:
    raise UsageError("--mem_fraction is for GPU topologies (jax's GPU memory preallocation); a TPU plan uses "
                     "all of the HBM.")
  if _MEM_FRACTION.value is not None and not 0 < _MEM_FRACTION.value <= 1:
    raise UsageError(f"--mem_fraction={_MEM_FRACTION.value}: must lie in (0, 1].")
  if _HBM.value is not None and _HBM.value <= 0:
    raise UsageError(f"--hbm_gib={_HBM.value}: must be positive.")


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments: {argv[1:]}")
  gen, grid, chips = parse_topology(_TOPOLOGY.value)
  cfg = _config(_LAYERS.value)
  _check(cfg, gen, chips)
  gpu = is_gpu(gen)
  hbm = _HBM.value * GiB if _HBM.value else (GPU_GB[gen] * 1e9 if gpu else HBM_GIB[gen] * GiB)
  fraction = (_MEM_FRACTION.value or GPU_MEM_FRACTION) if gpu else 1.0
  if _IN_CHILD.value:
    if _LAYERS.value:
      print(f"NOTE: --layers={_LAYERS.value}: only the first {_LAYERS.value} layers are compiled; weights, cache "
            "and temporaries are NOT those of the full model.", flush=True)
    return plan(cfg, _TOPOLOGY.value, grid, _MESH.value, _BATCH.value, _MAX_SEQ.value, _WEIGHTS.value,
                _CACHE_DTYPE.value, list(_STEPS.value), _MAX_BATCH.value, hbm, _HLO_DIR.value, fraction,
                _JSON.value)
  path = [ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
  if gpu:                              # N host CPU devices stand in for the N GPUs
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env.update(PYTHONPATH=os.pathsep.join(path), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={chips}")
  else:
    from pallas_kernels.aot import libtpu_env
    env = libtpu_env(path[1:], LIBTPU)
    env.pop("XLA_FLAGS", None)
  try:
    rc = subprocess.run([sys.executable, "-m", "launch.aot", *sys.argv[1:], "--in_compile_process"], env=env,
                        cwd=ROOT, timeout=_TIMEOUT.value).returncode
  except subprocess.TimeoutExpired:
    raise UsageError(f"the compile did not finish in --timeout={_TIMEOUT.value} s.") from None
  if rc:
    sys.exit(rc)


if __name__ == "__main__":
  common.run(main, config_flag="config", multihost=False)   # compiles for a topology; no chips, no peers
