"""The shipped demo model: a 2M-parameter DeepSeek-V4 trained on Botchan in a few CPU minutes.

Every V4 feature is on, at toy width: a sliding-window + hash-routed first layer, then CSA (ratio 4, with
the lightning indexer picking top-8 compressed entries), HCA (ratio 16), CSA; attention sinks, mHC with 4
streams, score-routed MoE (top-2 of 4 experts + a shared one), and an MTP block. The vocabulary is the
SentencePiece BPE model the demo was trained with (dsv4_jax/assets/demo/tokenizer.model: 1,000 pieces, <unk>=0,
<s>=1, </s>=2). fp32: bf16 matmuls are slow on CPUs.

`get_train_config()` holds the training defaults launch.train uses for this config (--train.X overrides
them); dsv4_jax/assets/demo/README.md has the command that trained the shipped checkpoint and its held-out loss.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="demo",
      vocab_size=1000, dim=128, n_layers=4, n_mtp_layers=1,
      n_heads=4, head_dim=64, rope_head_dim=32, q_lora_rank=64, o_groups=2, o_lora_rank=64,
      window_size=32,
      compress_ratios=(0, 4, 16, 4, 0),
      index_n_heads=8, index_head_dim=32, index_topk=8,
      n_routed_experts=4, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=96,
      n_hash_layers=1, score_func="sqrtsoftplus", route_scale=1.5, swiglu_limit=10.0,
      rope_theta=10000.0, compress_rope_theta=160000.0, rope_factor=16.0, original_seq_len=512,
      beta_fast=32, beta_slow=1,
      hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6,
      bos_token_id=1, eos_token_id=2, max_seq_len=512,
      expert_dtype=None, dtype="float32", quant_sim=False, attn_impl="xla", query_chunk=512, scan_layers=True,
  ))


def get_train_config() -> dict:
  """launch.train's defaults for this config (fields of dsv4_jax.train.TrainConfig)."""
  return dict(learning_rate=1e-2, min_lr_ratio=0.1, warmup_steps=20, batch_size=16, seq_len=128,
              mtp_weight=0.3, loss_chunk=128, remat="none", compute_dtype="float32", weight_decay=0.1)
