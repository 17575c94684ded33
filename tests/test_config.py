"""Configs: shipped files, the three released config.json key sets, validation, parameter counts."""
import dataclasses
import json

import pytest

from dsv4_jax import ModelConfig, config_names, layer_plan, load_config
from dsv4_jax.transformer import parameter_counts

FLASH_HUB = {   # the released DeepSeek-V4-Flash config.json (docs/architecture.md §1)
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 129280,
    "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64, "num_key_value_heads": 1,
    "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024,
    "sliding_window": 128, "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "index_n_heads": 64,
    "index_head_dim": 128, "index_topk": 512, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 6, "moe_intermediate_size": 2048, "num_hash_layers": 3,
    "scoring_func": "sqrtsoftplus", "routed_scaling_factor": 1.5, "norm_topk_prob": True,
    "topk_method": "noaux_tc", "swiglu_limit": 10.0, "rope_theta": 10000, "compress_rope_theta": 160000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                     "beta_slow": 1},
    "max_position_embeddings": 1048576, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
    "num_nextn_predict_layers": 1,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
}

REFERENCE_FLASH = {   # the reference's inference/config.json (ModelArgs names)
    "vocab_size": 129280, "dim": 4096, "moe_inter_dim": 2048, "n_layers": 43, "n_hash_layers": 3,
    "n_heads": 64, "n_routed_experts": 256, "n_shared_experts": 1, "n_activated_experts": 6,
    "score_func": "sqrtsoftplus", "route_scale": 1.5, "swiglu_limit": 10.0, "q_lora_rank": 1024,
    "head_dim": 512, "rope_head_dim": 64, "o_groups": 8, "o_lora_rank": 1024, "window_size": 128,
    "original_seq_len": 65536, "rope_theta": 10000, "rope_factor": 16, "beta_fast": 32, "beta_slow": 1,
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20,
    "dtype": "fp8", "scale_fmt": "ue8m0", "expert_dtype": "fp4", "compress_rope_theta": 160000,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
}


def _arch(cfg):
  skip = {"name", "dtype", "quant_sim", "attn_impl", "max_seq_len"}
  return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in skip}


def test_shipped_configs_load():
  assert {"flash", "pro", "flash_base", "pro_base", "tiny"} <= set(config_names())
  for name in config_names():
    cfg = load_config(name)
    assert cfg.name == name
    hash(cfg)   # frozen and hashable: usable as a jit static argument


def test_hub_and_reference_config_json_equal_our_flash(tmp_path):
  ours = load_config("flash")
  p = tmp_path / "config.json"
  p.write_text(json.dumps(FLASH_HUB))
  assert _arch(ModelConfig.from_hf_config(p)) == _arch(ours)
  assert _arch(load_config(str(tmp_path))) == _arch(ours)         # a directory holding config.json
  assert ModelConfig.from_hf_config(p).quant_sim                   # quantised release: simulate by default
  assert _arch(ModelConfig.from_hf_config(REFERENCE_FLASH)) == _arch(ours)


def test_save_pretrained_key_set():
  """transformers' save_pretrained form: layer_types / compress_rates / mlp_layer_types / rope_parameters."""
  raw = {k: v for k, v in FLASH_HUB.items() if k not in ("compress_ratios", "num_hash_layers", "rope_scaling",
                                                         "qk_rope_head_dim")}
  kinds = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
  raw.update(
      layer_types=[kinds[r] for r in FLASH_HUB["compress_ratios"][:43]],
      compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
      mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 40,
      partial_rotary_factor=0.125,
      rope_parameters={"main": {"rope_type": "default", "rope_theta": 10000.0},
                       "compress": {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 16.0,
                                    "original_max_position_embeddings": 65536, "beta_fast": 32,
                                    "beta_slow": 1, "attention_factor": 1.0}})
  assert _arch(ModelConfig.from_hf_config(raw)) == _arch(load_config("flash"))


@pytest.mark.parametrize("change, message", [
    ({"num_key_value_heads": 8}, "num_key_value_heads"),
    ({"compress_ratios": [0, 4]}, "compress_ratios has 2 entries"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_size": None}, "hidden_size"),
    ({"o_groups": 7}, "o_groups"),
    ({"rope_scaling": {"type": "yarn", "factor": 16, "attention_factor": 1.3}}, "attention_factor"),
])
def test_bad_hub_configs_raise_naming_the_key(change, message):
  raw = dict(FLASH_HUB)
  for k, v in change.items():
    if v is None:
      raw.pop(k)
    else:
      raw[k] = v
  with pytest.raises(ValueError, match=message):
    ModelConfig.from_hf_config(raw)


def test_bad_fields_raise():
  with pytest.raises(ValueError, match="dtype"):
    dataclasses.replace(load_config("tiny"), dtype="float16")
  with pytest.raises(ValueError, match="Unknown ModelConfig field"):
    ModelConfig.from_dict({"dimension": 3})
  with pytest.raises(ValueError, match="MTP layer"):
    dataclasses.replace(load_config("tiny"), compress_ratios=(0, 0, 4, 8, 4, 8, 4, 4))
  with pytest.raises(ValueError, match="Unknown config"):
    load_config("flash_v9")


def test_parameter_counts_match_the_report():
  flash, pro = parameter_counts(load_config("flash")), parameter_counts(load_config("pro"))
  assert round(flash["total"] / 1e9, 1) == 284.3          # without MTP
  assert round(flash["active"] / 1e9, 1) == 13.3
  assert round(pro["total_with_mtp"] / 1e9, 1) == 1598.8  # "1.6T"
  assert round(pro["active"] / 1e9, 1) == 48.9


def test_layer_plan_scans_the_repeated_pattern():
  flash, pro = layer_plan(load_config("flash")), layer_plan(load_config("pro"))
  assert flash.prefix == (0, 1, 2) and flash.period == (3, 4) and flash.reps == 20 and flash.suffix == ()
  assert pro.prefix == (0, 1, 2) and pro.period == (3, 4) and pro.reps == 29 and pro.suffix == ()
  for cfg in (load_config("flash"), load_config("tiny")):
    plan = layer_plan(cfg)
    seen = list(plan.prefix) + [plan.stack_layer(j, r) for r in range(plan.reps) for j in range(len(plan.period))]
    assert seen + list(plan.suffix) == list(range(cfg.n_layers))
    for i in range(cfg.n_layers):
      where, pos, rep = plan.locate(i)
      assert (where != "stack") or plan.stack_layer(pos, rep) == i
