"""Model configuration: one frozen dataclass, read from our config files or any released config.json.

Field names follow the reference `inference/model.py` `ModelArgs` (docs/architecture.md §1.1).
`compress_ratios` has one entry per main layer plus one per MTP layer (the MTP layer is sliding-only).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any, Mapping

_DTYPES = ("bfloat16", "float32")
ATTN_IMPLS = ("xla", "pallas", "pallas_tpu", "pallas_gpu")
_EXPERT_DTYPES = ("fp4", "fp8", None)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """DeepSeek-V4 hyper-parameters. Defaults are V4-Flash (docs/architecture.md §1)."""

  name: str = "flash"
  vocab_size: int = 129280
  dim: int = 4096                      # D
  n_layers: int = 43
  n_mtp_layers: int = 1
  n_heads: int = 64                    # H
  head_dim: int = 512                  # c (K)
  rope_head_dim: int = 64              # r: the last r dims of every head get RoPE
  q_lora_rank: int = 1024              # d_c
  o_groups: int = 8                    # g
  o_lora_rank: int = 1024              # d_g
  window_size: int = 128               # n_win
  compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4, 0)
  index_n_heads: int = 64
  index_head_dim: int = 128
  index_topk: int = 512
  n_routed_experts: int = 256          # E
  n_shared_experts: int = 1
  n_activated_experts: int = 6
  moe_inter_dim: int = 2048            # F
  n_hash_layers: int = 3
  score_func: str = "sqrtsoftplus"
  route_scale: float = 1.5
  swiglu_limit: float = 10.0           # 0 disables the clamp (as in the reference)
  rope_theta: float = 10000.0
  compress_rope_theta: float = 160000.0
  rope_factor: float = 16.0            # YaRN, compressed layers only
  original_seq_len: int = 65536
  beta_fast: int = 32
  beta_slow: int = 1
  hc_mult: int = 4
  hc_sinkhorn_iters: int = 20
  hc_eps: float = 1e-6
  norm_eps: float = 1e-6
  bos_token_id: int = 0
  eos_token_id: int = 1
  max_seq_len: int = 1048576
  expert_dtype: str | None = "fp4"     # released routed-expert format ("fp8" for -Base)
  # Runtime choices, not architecture.
  dtype: str = "bfloat16"              # compute / activation dtype
  quant_sim: bool = True               # reproduce the reference's QAT numerics (§4)
  attn_impl: str = "xla"               # "xla" (plain jnp) | "pallas" (default device's backend; CPU:
                                       # interpreted) | "pallas_tpu" / "pallas_gpu" (forced, for AOT compiles)
  query_chunk: int = 512               # queries per block in attention and indexer (bounds gathered memory)
  scan_layers: bool = True             # run the repeated layer group under lax.scan (compile time flat in
                                       # depth); False unrolls every layer, each with its own parameters and
                                       # caches (transformer.layer_plan, relayout_layers)

  def __post_init__(self):
    object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
    self.validate()

  # ---- derived quantities -------------------------------------------------------------------
  @property
  def nope_head_dim(self) -> int:
    return self.head_dim - self.rope_head_dim

  @property
  def n_total_layers(self) -> int:
    return self.n_layers + self.n_mtp_layers

  @property
  def softmax_scale(self) -> float:
    return self.head_dim ** -0.5

  def layer_ratio(self, layer_id: int) -> int:
    """Compression ratio of layer `layer_id` (0: sliding only; 4: CSA; other: HCA)."""
    return self.compress_ratios[layer_id]

  def is_hash_layer(self, layer_id: int) -> bool:
    return layer_id < self.n_hash_layers

  def validate(self) -> None:
    def bad(field, value, expected):
      raise ValueError(f"ModelConfig({self.name!r}): {field}={value!r} is invalid; expected {expected}.")

    if self.dtype not in _DTYPES:
      bad("dtype", self.dtype, f"one of {_DTYPES}")
    if self.expert_dtype not in _EXPERT_DTYPES:
      bad("expert_dtype", self.expert_dtype, f"one of {_EXPERT_DTYPES}")
    if self.query_chunk < 1:
      bad("query_chunk", self.query_chunk, ">= 1")
    if not isinstance(self.scan_layers, bool):
      bad("scan_layers", self.scan_layers, "True or False")
    if self.attn_impl not in ATTN_IMPLS:
      bad("attn_impl", self.attn_impl, f"one of {ATTN_IMPLS}")
    if self.score_func != "sqrtsoftplus":
      bad("score_func", self.score_func, "'sqrtsoftplus' (the only router DeepSeek-V4 uses)")
    if len(self.compress_ratios) != self.n_total_layers:
      bad("compress_ratios", f"<{len(self.compress_ratios)} entries>",
          f"n_layers + n_mtp_layers = {self.n_total_layers} entries")
    for i, r in enumerate(self.compress_ratios):
      if r < 0 or (r > 0 and r != 4 and r < 2):
        bad(f"compress_ratios[{i}]", r, "0 (sliding only), 4 (CSA) or an HCA ratio >= 2")
      if i >= self.n_layers and r != 0:
        bad(f"compress_ratios[{i}] (MTP layer)", r, "0: the MTP block is sliding-window only")
    if self.rope_head_dim % 2 or not 0 < self.rope_head_dim <= self.head_dim:
      bad("rope_head_dim", self.rope_head_dim, f"an even number in (0, head_dim={self.head_dim}]")
    if self.rope_head_dim > self.index_head_dim:
      bad("rope_head_dim", self.rope_head_dim, f"<= index_head_dim={self.index_head_dim}")
    if self.n_heads % self.o_groups:
      bad("o_groups", self.o_groups, f"a divisor of n_heads={self.n_heads}")
    if not 0 < self.n_activated_experts <= self.n_routed_experts:
      bad("n_activated_experts", self.n_activated_experts, f"in [1, n_routed_experts={self.n_routed_experts}]")
    if self.n_shared_experts not in (0, 1):
      bad("n_shared_experts", self.n_shared_experts, "0 or 1")
    if not 0 <= self.n_hash_layers <= self.n_layers:
      bad("n_hash_layers", self.n_hash_layers, f"in [0, n_layers={self.n_layers}]")
    if self.hc_mult < 1 or self.hc_sinkhorn_iters < 1:
      bad("hc_mult/hc_sinkhorn_iters", (self.hc_mult, self.hc_sinkhorn_iters), ">= 1")
    if self.window_size < 1 or self.index_topk < 1:
      bad("window_size/index_topk", (self.window_size, self.index_topk), ">= 1")
    if self.index_head_dim & (self.index_head_dim - 1):
      bad("index_head_dim", self.index_head_dim, "a power of two (Hadamard rotation)")

  # ---- constructors --------------------------------------------------------------------------
  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"Unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}.")
    return cls(**dict(d))

  @classmethod
  def from_hf_config(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides) -> "ModelConfig":
    """Reads a released `config.json` (hub keys), a transformers `save_pretrained` one
    (`layer_types`, `compress_rates`, `rope_parameters`) or the reference `inference/config.json`.

    `path_or_dict` may be a file, a directory holding `config.json`, or an already parsed dict.
    """
    if isinstance(path_or_dict, Mapping):
      raw, where = dict(path_or_dict), "<dict>"
    else:
      where = os.fspath(path_or_dict)
      if os.path.isdir(where):
        where = os.path.join(where, "config.json")
      if not os.path.isfile(where):
        raise FileNotFoundError(f"No config.json at {where!r}.")
      with open(where) as f:
        raw = json.load(f)
    fields = _parse_hf_keys(raw, where)
    fields.update(overrides)
    return cls.from_dict(fields)


def _parse_hf_keys(raw: dict, where: str) -> dict:
  """Maps the three released key sets onto ModelConfig fields; raises on conflicts."""
  if "dim" in raw and "n_layers" in raw:       # reference inference/config.json (ModelArgs names)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    out = {k: v for k, v in raw.items() if k in known}
    if "n_activated_experts" not in raw and "num_experts_per_tok" in raw:
      out["n_activated_experts"] = raw["num_experts_per_tok"]
    if "original_seq_len" in raw:
      out["original_seq_len"] = raw["original_seq_len"]
    ignored = {"dtype", "scale_fmt", "scale_dtype", "max_batch_size", "n_dense_layers", "n_expert_groups",
               "n_limited_groups", "topk_method", "norm_topk_prob"}
    unknown = sorted(set(raw) - known - ignored - {"num_experts_per_tok"})
    if unknown:
      raise ValueError(f"{where}: unknown reference config key(s) {unknown}.")
    out.pop("dtype", None)
    if "n_mtp_layers" not in raw:
      out["n_mtp_layers"] = 1
    ratios = list(out.get("compress_ratios", []))
    n_total = out["n_layers"] + out.get("n_mtp_layers", 1)
    if len(ratios) == out["n_layers"]:
      ratios += [0] * (n_total - len(ratios))
    out["compress_ratios"] = ratios
    return out

  if raw.get("model_type", "deepseek_v4") != "deepseek_v4":
    raise ValueError(f"{where}: model_type={raw.get('model_type')!r}; expected 'deepseek_v4'.")

  def need(key):
    if key not in raw:
      raise ValueError(f"{where}: required key {key!r} is missing.")
    return raw[key]

  n_layers = int(need("num_hidden_layers"))
  n_mtp = int(raw.get("num_nextn_predict_layers", 1))
  head_dim = int(need("head_dim"))

  # Compression pattern: hub `compress_ratios` (ints, maybe with the MTP entry), or HF `layer_types`.
  rates = dict(raw.get("compress_rates") or {})
  csa_rate = int(rates.get("compressed_sparse_attention", raw.get("compress_rate_csa", 4)))
  hca_rate = int(rates.get("heavily_compressed_attention", raw.get("compress_rate_hca", 128)))
  if csa_rate != 4:
    raise ValueError(f"{where}: CSA compress rate {csa_rate} is not supported; DeepSeek-V4 uses 4.")
  label_to_ratio = {0: 0, 4: 4, 128: hca_rate}
  if raw.get("compress_ratios") is not None:
    # Released configs use the labels 0 / 4 / 128 (128 = the HCA rate); other values are literal ratios.
    cr = [int(r) for r in raw["compress_ratios"]]
    ratios = [label_to_ratio.get(r, r) for r in cr]
    bad = [r for r in ratios if r < 0 or r == 1 or (r not in (0, 4) and "compress_rates" in raw and r != hca_rate)]
    if bad:
      raise ValueError(f"{where}: compress_ratios entries {bad} disagree with compress_rates {rates}.")
    if len(ratios) not in (n_layers, n_layers + n_mtp):
      raise ValueError(f"{where}: compress_ratios has {len(ratios)} entries; expected num_hidden_layers="
                       f"{n_layers} or num_hidden_layers + num_nextn_predict_layers={n_layers + n_mtp}.")
  elif raw.get("layer_types") is not None:
    type_to_ratio = {"sliding_attention": 0, "compressed_sparse_attention": 4,
                     "heavily_compressed_attention": hca_rate}
    bad = [t for t in raw["layer_types"] if t not in type_to_ratio]
    if bad:
      raise ValueError(f"{where}: unknown layer_types {bad}; expected {sorted(type_to_ratio)}.")
    ratios = [type_to_ratio[t] for t in raw["layer_types"]]
    if len(ratios) != n_layers:
      raise ValueError(f"{where}: layer_types has {len(ratios)} entries; expected {n_layers}.")
  else:
    raise ValueError(f"{where}: neither compress_ratios nor layer_types is given; cannot tell the "
                     "attention type of each layer.")
  ratios = ratios[:n_layers] + [0] * n_mtp

  # Hash-routed layers: `num_hash_layers` or a prefix of `mlp_layer_types`.
  if raw.get("mlp_layer_types") is not None:
    mlt = list(raw["mlp_layer_types"])
    n_hash = sum(t == "hash_moe" for t in mlt)
    if mlt != ["hash_moe"] * n_hash + ["moe"] * (len(mlt) - n_hash):
      raise ValueError(f"{where}: mlp_layer_types must be hash_moe layers followed by moe layers; got {mlt}.")
    if "num_hash_layers" in raw and int(raw["num_hash_layers"]) != n_hash:
      raise ValueError(f"{where}: num_hash_layers={raw['num_hash_layers']} disagrees with mlp_layer_types "
                       f"({n_hash} hash_moe layers).")
  else:
    n_hash = int(raw.get("num_hash_layers", 3))

  # RoPE: hub `rope_scaling` + `qk_rope_head_dim`, or HF `rope_parameters` {main, compress}.
  rope_theta = float(raw.get("rope_theta", 10000.0))
  compress_theta = float(raw.get("compress_rope_theta", 160000.0))
  yarn = dict(raw.get("rope_scaling") or {})
  rp = raw.get("rope_parameters") or {}
  if isinstance(rp.get("main"), dict):
    rope_theta = float(rp["main"].get("rope_theta", rope_theta))
  if isinstance(rp.get("compress"), dict):
    compress_theta = float(rp["compress"].get("rope_theta", compress_theta))
    yarn = {**rp["compress"], **yarn}
  elif rp and not yarn:
    yarn = dict(rp)
  rope_type = yarn.get("rope_type", yarn.get("type", "yarn" if yarn else "default"))
  if rope_type not in ("yarn", "default"):
    raise ValueError(f"{where}: rope type {rope_type!r} is not supported; expected 'yarn'.")
  if rope_type == "yarn":
    factor = float(yarn.get("factor", 16.0))
    orig = int(yarn.get("original_max_position_embeddings", 65536))
    beta_fast, beta_slow = yarn.get("beta_fast", 32), yarn.get("beta_slow", 1)
    if float(yarn.get("attention_factor", 1.0) or 1.0) != 1.0:
      raise ValueError(f"{where}: YaRN attention_factor={yarn['attention_factor']}; DeepSeek-V4 uses 1.0.")
  else:
    factor, orig, beta_fast, beta_slow = 1.0, 65536, 32, 1
  if "qk_rope_head_dim" in raw:
    rope_dim = int(raw["qk_rope_head_dim"])
  elif raw.get("partial_rotary_factor") is not None:
    rope_dim = int(round(head_dim * float(raw["partial_rotary_factor"])))
  else:
    rope_dim = 64

  if int(raw.get("num_key_value_heads", 1)) != 1:
    raise ValueError(f"{where}: num_key_value_heads={raw['num_key_value_heads']}; DeepSeek-V4 has one shared "
                     "KV head.")
  if raw.get("scoring_func", "sqrtsoftplus") != "sqrtsoftplus":
    raise ValueError(f"{where}: scoring_func={raw['scoring_func']!r}; expected 'sqrtsoftplus'.")
  if raw.get("norm_topk_prob", True) is not True:
    raise ValueError(f"{where}: norm_topk_prob=false is not DeepSeek-V4's router.")
  if raw.get("tie_word_embeddings", False):
    raise ValueError(f"{where}: tie_word_embeddings=true; DeepSeek-V4 has a separate head.")

  qc = raw.get("quantization_config") or {}
  expert_dtype = qc.get("expert_dtype", raw.get("expert_dtype", "fp4" if qc else None))
  eos = raw.get("eos_token_id", 1)
  if isinstance(eos, (list, tuple)):
    eos = eos[0]

  return dict(
      name=str(raw.get("_name_or_path", "") or "hf").rstrip("/").split("/")[-1] or "hf",
      vocab_size=int(need("vocab_size")),
      dim=int(need("hidden_size")),
      n_layers=n_layers,
      n_mtp_layers=n_mtp,
      n_heads=int(need("num_attention_heads")),
      head_dim=head_dim,
      rope_head_dim=rope_dim,
      q_lora_rank=int(need("q_lora_rank")),
      o_groups=int(need("o_groups")),
      o_lora_rank=int(need("o_lora_rank")),
      window_size=int(raw.get("sliding_window", 128)),
      compress_ratios=tuple(ratios),
      index_n_heads=int(raw.get("index_n_heads", 64)),
      index_head_dim=int(raw.get("index_head_dim", 128)),
      index_topk=int(raw.get("index_topk", 512)),
      n_routed_experts=int(need("n_routed_experts")),
      n_shared_experts=int(raw.get("n_shared_experts", 1)),
      n_activated_experts=int(need("num_experts_per_tok")),
      moe_inter_dim=int(need("moe_intermediate_size")),
      n_hash_layers=n_hash,
      route_scale=float(raw.get("routed_scaling_factor", 1.0)),
      swiglu_limit=float(raw.get("swiglu_limit", 0.0) or 0.0),
      rope_theta=rope_theta,
      compress_rope_theta=compress_theta,
      rope_factor=factor,
      original_seq_len=orig,
      beta_fast=int(beta_fast),
      beta_slow=int(beta_slow),
      hc_mult=int(raw.get("hc_mult", 4)),
      hc_sinkhorn_iters=int(raw.get("hc_sinkhorn_iters", 20)),
      hc_eps=float(raw.get("hc_eps", 1e-6)),
      norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
      bos_token_id=int(raw.get("bos_token_id", 0) or 0),
      eos_token_id=int(eos if eos is not None else 1),
      expert_dtype=expert_dtype,
      quant_sim=bool(qc),       # real (quantised) checkpoints were trained with the simulation on
  )


_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def config_names() -> list[str]:
  """Names of the config files shipped in `configs/`."""
  return sorted(f[:-3] for f in os.listdir(_CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))


def load_config(name_or_path: str | os.PathLike, **overrides) -> ModelConfig:
  """A `configs/` name ("flash", "tiny", ...), an ml_collections `.py` config file, or a
  `config.json` (file or directory) in any of the released formats."""
  spec = os.fspath(name_or_path)
  if spec in config_names():
    spec = os.path.join(_CONFIG_DIR, spec + ".py")
  if spec.endswith(".py") and os.path.isfile(spec):
    return from_config_dict(_load_py_config(spec), **overrides)
  if spec.endswith(".json") or os.path.isdir(spec):
    return ModelConfig.from_hf_config(spec, **overrides)
  raise ValueError(f"Unknown config {spec!r}: expected one of {config_names()}, a .py config file, or a "
                   "config.json file or directory.")


def from_config_dict(cd: Any, **overrides) -> ModelConfig:
  """ModelConfig from an ml_collections ConfigDict (or a plain mapping)."""
  d = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
  d.update(overrides)
  return ModelConfig.from_dict(d)


def _load_py_config(path: str):
  spec = importlib.util.spec_from_file_location(f"_dsv4_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"Config file {path!r} defines no get_config().")
  return module.get_config()


def describe(cfg: ModelConfig) -> str:
  kinds = {0: "SWA", 4: "CSA"}
  pattern = [kinds.get(r, f"HCA{r}") for r in cfg.compress_ratios[: cfg.n_layers]]
  return (f"{cfg.name}: D={cfg.dim} layers={cfg.n_layers}(+{cfg.n_mtp_layers} MTP) heads={cfg.n_heads}x"
          f"{cfg.head_dim} experts={cfg.n_routed_experts}x{cfg.moe_inter_dim} top{cfg.n_activated_experts} "
          f"pattern={'/'.join(pattern)} dtype={cfg.dtype} quant_sim={cfg.quant_sim}")

