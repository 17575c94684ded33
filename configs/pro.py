"""DeepSeek-V4-Pro (1.6T total, 49B active): the released instruct model (docs/architecture.md §1)."""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="pro",
      vocab_size=129280, dim=7168, n_layers=61, n_mtp_layers=1,
      n_heads=128, head_dim=512, rope_head_dim=64, q_lora_rank=1536, o_groups=16, o_lora_rank=1024,
      window_size=128,
      # layers 0,1 HCA; even layers 2..60 CSA (m=4); odd 3..59 HCA (m=128); MTP sliding only.
      compress_ratios=(128, 128) + (4, 128) * 29 + (4, 0),
      index_n_heads=64, index_head_dim=128, index_topk=1024,
      n_routed_experts=384, n_shared_experts=1, n_activated_experts=6, moe_inter_dim=3072,
      n_hash_layers=3, score_func="sqrtsoftplus", route_scale=2.5, swiglu_limit=10.0,
      rope_theta=10000.0, compress_rope_theta=160000.0, rope_factor=16.0, original_seq_len=65536,
      beta_fast=32, beta_slow=1,
      hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6,
      bos_token_id=0, eos_token_id=1, max_seq_len=1048576,
      expert_dtype="fp4", dtype="bfloat16", quant_sim=True, attn_impl="xla", query_chunk=512, scan_layers=True,
  ))
