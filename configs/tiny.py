"""A tiny DeepSeek-V4 for CPU tests and demos: Flash's layer recipe (2 sliding-only layers, then CSA /
HCA alternating, 3 hash-routed layers, an MTP block) at toy width, with an HCA ratio of 8 and a
16-token window so that short sequences exercise compression, top-k selection and the window."""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="tiny",
      vocab_size=512, dim=128, n_layers=7, n_mtp_layers=1,
      n_heads=4, head_dim=96, rope_head_dim=32, q_lora_rank=64, o_groups=2, o_lora_rank=64,
      window_size=16,
      compress_ratios=(0, 0, 4, 8, 4, 8, 4, 0),
      index_n_heads=16, index_head_dim=64, index_topk=4,
      n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=64,
      n_hash_layers=3, score_func="sqrtsoftplus", route_scale=1.5, swiglu_limit=10.0,
      rope_theta=10000.0, compress_rope_theta=160000.0, rope_factor=16.0, original_seq_len=256,
      beta_fast=32, beta_slow=1,
      hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6,
      bos_token_id=0, eos_token_id=1, max_seq_len=1024,
      expert_dtype=None, dtype="float32", quant_sim=False, attn_impl="xla", query_chunk=512, scan_layers=True,
  ))
