"""Tiny checkpoints in the exact released DeepSeek-V4 format (docs/architecture.md §5.1, §5.2), for tests.

    fp8 e4m3 [out, in] + e8m0 scale [ceil(out/128), ceil(in/128)]   wq_a, wq_b, wkv, wo_a, wo_b,
                                                                     indexer.wq_b, shared_experts.w1/2/3,
                                                                     mtp e_proj / h_proj
    fp4 e2m1 packed in int8 [out, in/2] (low nibble first)
        + e8m0 scale [out, in/32]                                    routed experts w1/w2/w3
    bf16                                                             embed, head, norms, compressor
                                                                     wkv/wgate, gate.weight, weights_proj
    fp32                                                             hc_*, attn_sink, ape, gate.bias
    int64                                                            tid2eid

written with our own safetensors writer (dtype tags F8_E4M3, F8_E8M0, I8, BF16, F32, I64), sharded in
file order embed, layers 0..N-1, head/norm/hc_head, mtp (all mtp in the last shard) with a
`model.safetensors.index.json`, next to a hub `config.json` with a `quantization_config`.

Independent of dsv4_jax: the quantisers and the reference dequantisation here are written from the
format description, not shared with the code under test.
"""
from __future__ import annotations

import json
import os
import re

import ml_dtypes
import numpy as np

FP8_NAMES = re.compile(r"(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|shared_experts\.w[123]|"
                       r"(e_proj|h_proj))\.weight$")
FP4_NAMES = re.compile(r"ffn\.experts\.\d+\.w[123]\.weight$")
F32_NAMES = re.compile(r"(hc_(attn|ffn|head)_(fn|base|scale)|attn_sink|\.ape|gate\.bias)$")

QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "scale_fmt": "ue8m0", "weight_block_size": [128, 128], "expert_dtype": "fp4"}

_ST_DTYPE = {np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3", np.dtype(ml_dtypes.float8_e8m0fnu): "F8_E8M0",
             np.dtype(np.int8): "I8", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float32): "F32",
             np.dtype(np.int64): "I64", np.dtype(np.uint8): "U8", np.dtype(np.int16): "I16"}


def kind_of(name: str) -> str:
  if name.endswith("tid2eid"):
    return "int64"
  if FP4_NAMES.search(name):
    return "fp4"
  if FP8_NAMES.search(name):
    return "fp8"
  if F32_NAMES.search(name):
    return "fp32"
  return "bf16"


# ---- quantisers (power-of-two scales, as the released weights) -------------------------------------

def _pow2_exponent_ceil(x: np.ndarray) -> np.ndarray:
  """Smallest integer e with 2^e >= x (x > 0), exactly."""
  m, e = np.frexp(x.astype(np.float64))
  return np.where(m == 0.5, e - 1, e).astype(np.int64)


def quantize_fp8(w: np.ndarray, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
  """fp32 [out, in] -> (e4m3 [out, in], e8m0 [ceil(out/b), ceil(in/b)])."""
  out, inp = w.shape
  bo, bi = -(-out // block), -(-inp // block)
  pad = np.zeros((bo * block, bi * block), np.float32)
  pad[:out, :inp] = w
  amax = np.abs(pad.reshape(bo, block, bi, block)).max(axis=(1, 3))
  e = _pow2_exponent_ceil(np.maximum(amax, 1e-30) / 448.0)
  s = np.ldexp(1.0, e).astype(np.float32)
  q = (w / np.repeat(np.repeat(s, block, 0), block, 1)[:out, :inp]).astype(ml_dtypes.float8_e4m3fn)
  return q, (e + 127).astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)


_E2M1_GRID = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)


def quantize_fp4(w: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """fp32 [out, in] -> (int8 [out, in/2] two e2m1 codes per byte, low nibble first; e8m0 [out, in/32])."""
  out, inp = w.shape
  wb = w.reshape(out, inp // block, block)
  e = _pow2_exponent_ceil(np.maximum(np.abs(wb).max(-1), 1e-30) / 6.0)
  y = wb / np.ldexp(1.0, e)[..., None]
  a = np.abs(y).reshape(out, inp)
  code = np.abs(a[..., None] - _E2M1_GRID).argmin(-1).astype(np.uint8)     # nearest grid point
  code |= (np.sign(y).reshape(out, inp) < 0).astype(np.uint8) << 3
  packed = code[:, 0::2] | (code[:, 1::2] << 4)
  return packed.view(np.int8), (e + 127).astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)


# ---- the reference dequantisation (written from §5.2) ----------------------------------------------

def ref_dequant_fp8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
  """W[o, i] = fp8[o, i] * 2^(scale_byte[o//128, i//128] - 127), fp32."""
  out, inp = q.shape
  sb = scale.view(np.uint8).astype(np.float64) - 127
  full = np.kron(np.exp2(sb), np.ones((128, 128)))[:out, :inp]
  return (q.astype(np.float64) * full).astype(np.float32)


def ref_dequant_fp4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
  """Codes c (low nibble = element 2k): sign bit 3, exponent bits 2..1, mantissa bit 0 (bias 1)."""
  b = packed.view(np.uint8)
  c = np.empty((b.shape[0], 2 * b.shape[1]), np.uint8)
  c[:, 0::2], c[:, 1::2] = b & 0xF, b >> 4
  e, m = (c >> 1) & 3, (c & 1).astype(np.float64)
  mag = np.where(e == 0, 0.5 * m, np.exp2(e.astype(np.float64) - 1) * (1 + 0.5 * m))
  v = np.where(c & 8, -mag, mag)
  s = np.exp2(np.repeat(scale.view(np.uint8).astype(np.float64) - 127, 32, axis=1))
  return (v * s).astype(np.float32)


def to_released(name: str, w: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """One fp32 (or int) tensor -> ({stored name: stored array}, the dense fp32 value a loader must see)."""
  kind = kind_of(name)
  if kind == "int64":
    return {name: w.astype(np.int64)}, w.astype(np.int64)
  if kind == "fp8":
    q, s = quantize_fp8(w.astype(np.float32))
    return {name: q, name[: -len("weight")] + "scale": s}, ref_dequant_fp8(q, s)
  if kind == "fp4":
    q, s = quantize_fp4(w.astype(np.float32))
    return {name: q, name[: -len("weight")] + "scale": s}, ref_dequant_fp4(q, s)
  if kind == "fp32":
    return {name: w.astype(np.float32)}, w.astype(np.float32)
  b = w.astype(ml_dtypes.bfloat16)
  return {name: b}, b.astype(np.float32)


# ---- files ------------------------------------------------------------------------------------------

def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  header, offset = {}, 0
  for n, a in tensors.items():
    header[n] = {"dtype": _ST_DTYPE[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
  header["__metadata__"] = {"format": "pt"}
  h = json.dumps(header).encode()
  h += b" " * (-len(h) % 8)
  with open(path, "wb") as f:
    f.write(len(h).to_bytes(8, "little"))
    f.write(h)
    for a in tensors.values():
      f.write(np.ascontiguousarray(a).tobytes())


def release_order(name: str):
  """embed, layers in order, head / norm / hc_head, then mtp (as the hub shards)."""
  m = re.match(r"^(layers|mtp)\.(\d+)\.", name)
  if name.startswith("embed."):
    return (0, 0)
  if m and m.group(1) == "layers":
    return (1, int(m.group(2)))
  if m:
    return (3, int(m.group(2)))
  return (2, 0)


def write_released(out_dir: str, official: dict[str, np.ndarray], config: dict, n_shards: int = 3,
                   single_file: bool = False) -> dict[str, np.ndarray]:
  """Writes `official` (fp32 / int arrays by official name) in the released format; returns the dense fp32
  values (dequantised) that a correct loader must produce for every official name."""
  os.makedirs(out_dir, exist_ok=True)
  stored, dense = {}, {}
  for name in sorted(official, key=lambda n: (release_order(n), n)):
    s, d = to_released(name, np.asarray(official[name]))
    stored.update(s)
    dense[name] = d
  names = list(stored)
  mtp_start = next((i for i, n in enumerate(names) if n.startswith("mtp.")), len(names))
  if single_file:
    shards = [names]
  else:
    total = sum(stored[n].nbytes for n in names[:mtp_start])
    shards, cur, acc = [], [], 0
    for n in names[:mtp_start]:
      cur.append(n)
      acc += stored[n].nbytes
      if acc >= total * (len(shards) + 1) / n_shards and len(shards) < n_shards - 1:
        shards.append(cur)
        cur = []
    cur += names[mtp_start:]                                     # all mtp tensors in the last shard
    shards.append(cur)
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = "model.safetensors" if single_file else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    write_safetensors(os.path.join(out_dir, fname), {n: stored[n] for n in shard})
    weight_map.update({n: fname for n in shard})
  if not single_file:
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": sum(a.nbytes for a in stored.values())}, "weight_map": weight_map}, f,
                indent=1)
  cfg = dict(config)
  cfg["quantization_config"] = dict(QUANTIZATION_CONFIG)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg, f, indent=1)
  return dense


# ---- random weights by official name ----------------------------------------------------------------

def random_official(cfg, seed: int = 0, with_mtp: bool = True) -> dict[str, np.ndarray]:
  """Random fp32 weights (int64 tid2eid) for every official tensor name of `cfg` (a dsv4_jax ModelConfig)."""
  from dsv4_jax.checkpoint import stream
  rng = np.random.default_rng(seed)
  out = {}
  for unit, specs in stream.unit_specs(cfg).items():
    if unit.startswith("mtp.") and not with_mtp:
      continue
    for path, spec in stream.flatten(specs):
      experts = range(spec.shape[0]) if stream.is_expert_leaf(path) else [None]
      shape = spec.shape[1:] if stream.is_expert_leaf(path) else spec.shape
      for e in experts:
        name = stream.official_name(unit, path, e)
        if spec.kind == "int":
          out[name] = np.stack([rng.permutation(cfg.n_routed_experts)[: shape[1]] for _ in range(shape[0])]
                               ).astype(np.int64)
        elif len(shape) == 1:
          out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif spec.kind == "f32":
          out[name] = (0.3 / np.sqrt(shape[-1]) * rng.standard_normal(shape)).astype(np.float32)
        else:
          out[name] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
  return out


def load_into_hf(model, dense: dict[str, np.ndarray]) -> None:
  """Sets an HF DeepseekV4ForCausalLM's weights to `dense` (official names; mtp.* ignored as HF does)."""
  import torch
  import hf_oracle
  sd = model.state_dict()
  new = {}
  for o, h in hf_oracle._TOP_MAP:
    new[h] = dense[o]
  inter = model.config.moe_intermediate_size
  for n in range(model.config.num_hidden_layers):
    for o, h in hf_oracle._LAYER_MAP:
      if f"model.layers.{n}.{h}" in sd:
        new[f"model.layers.{n}.{h}"] = dense[f"layers.{n}.{o}"]
    E = sd[f"model.layers.{n}.mlp.experts.gate_up_proj"].shape[0]
    new[f"model.layers.{n}.mlp.experts.gate_up_proj"] = np.stack(
        [np.concatenate([dense[f"layers.{n}.ffn.experts.{e}.w1.weight"],
                         dense[f"layers.{n}.ffn.experts.{e}.w3.weight"]]) for e in range(E)])
    new[f"model.layers.{n}.mlp.experts.down_proj"] = np.stack(
        [dense[f"layers.{n}.ffn.experts.{e}.w2.weight"] for e in range(E)])
  assert set(new) == set(sd), sorted(set(sd) ^ set(new))
  assert inter * 2 == new["model.layers.0.mlp.experts.gate_up_proj"].shape[1]
  model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in new.items()}, strict=True)


# ---- large synthetic checkpoints, written tensor by tensor (memory tests and bench) -----------------

def _stored_layout(name: str, shape: tuple, kind_int: bool) -> list[tuple[str, str, tuple]]:
  """(stored name, safetensors dtype, shape) of one official tensor in the released format."""
  kind = "int64" if kind_int else kind_of(name)
  base = name[: -len("weight")]
  if kind == "fp8":
    return [(name, "F8_E4M3", shape), (base + "scale", "F8_E8M0", (-(-shape[0] // 128), -(-shape[1] // 128)))]
  if kind == "fp4":
    return [(name, "I8", (shape[0], shape[1] // 2)), (base + "scale", "F8_E8M0", (shape[0], shape[1] // 32))]
  return [(name, {"int64": "I64", "fp32": "F32", "bf16": "BF16"}[kind], shape)]


_ITEMSIZE = {"F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "I64": 8, "F32": 4, "BF16": 2}


def _random_bytes(rng, st_dtype: str, shape: tuple, n_experts: int) -> bytes:
  n = int(np.prod(shape))
  if st_dtype == "F8_E4M3":
    return (rng.integers(0, 256, n, dtype=np.uint8) & 0xF7).tobytes()        # no NaN (0x7F / 0xFF)
  if st_dtype == "F8_E8M0":
    return rng.integers(120, 128, n, dtype=np.uint8).tobytes()
  if st_dtype == "I8":
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()
  if st_dtype == "I64":
    return np.stack([rng.permutation(n_experts)[: shape[1]] for _ in range(shape[0])]).astype(np.int64).tobytes()
  if st_dtype == "F32":
    return (0.01 * rng.standard_normal(n)).astype(np.float32).tobytes()
  return (0.01 * rng.standard_normal(n)).astype(ml_dtypes.bfloat16).tobytes()


def write_synthetic(out_dir: str, config: dict, n_shards: int, seed: int = 0) -> dict:
  """A released-format checkpoint of random bytes for `config` (hub keys), generated and written one tensor
  at a time (the writer itself never holds more than one tensor). Returns sizes: total, largest shard,
  largest layer (stored bytes)."""
  from dsv4_jax.checkpoint import stream
  from dsv4_jax.config import ModelConfig
  cfg = ModelConfig.from_hf_config(config)
  entries, layer_bytes = [], {}
  for unit, specs in stream.unit_specs(cfg).items():
    for path, spec in stream.flatten(specs):
      expert_leaf = stream.is_expert_leaf(path)
      for e in (range(spec.shape[0]) if expert_leaf else [None]):
        name = stream.official_name(unit, path, e)
        for stored in _stored_layout(name, spec.shape[1:] if expert_leaf else spec.shape, spec.kind == "int"):
          nb = int(np.prod(stored[2])) * _ITEMSIZE[stored[1]]
          entries.append(stored + (nb,))
          layer_bytes[unit] = layer_bytes.get(unit, 0) + nb
  entries.sort(key=lambda x: release_order(x[0]))
  total = sum(x[3] for x in entries)
  shards, cur, acc = [], [], 0
  for x in entries:
    if x[0].startswith("mtp.") or len(shards) == n_shards - 1:
      cur.append(x)
      continue
    cur.append(x)
    acc += x[3]
    if acc >= total * (len(shards) + 1) / n_shards:
      shards.append(cur)
      cur = []
  shards.append(cur)
  shards = [s for s in shards if s]
  os.makedirs(out_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    header, off = {}, 0
    for name, dt, shape, nb in shard:
      header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + nb]}
      off += nb
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(out_dir, fname), "wb") as f:
      f.write(len(h).to_bytes(8, "little"))
      f.write(h)
      for name, dt, shape, nb in shard:
        f.write(_random_bytes(rng, dt, shape, cfg.n_routed_experts))
    weight_map.update({x[0]: fname for x in shard})
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(dict(config, quantization_config=dict(QUANTIZATION_CONFIG)), f, indent=1)
  shard_sizes = [sum(x[3] for x in s) for s in shards]
  return {"total": total, "largest_shard": max(shard_sizes), "n_shards": len(shards),
          "largest_layer": max(v for k, v in layer_bytes.items() if k != "top"), "top": layer_bytes["top"]}
