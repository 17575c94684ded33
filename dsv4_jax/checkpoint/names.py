"""Tensor names: HF transformers names -> official DeepSeek names -> paths in our parameter tree.

Official names (docs/architecture.md §5.1) are the reference's; HF names (§5.4) are what
`save_pretrained(save_original_format=False)` writes; transformers' default `save_pretrained` writes
official names with a `model.` prefix except for a few (embed_tokens, hc_head.hc_*, attn.norm).
"""
from __future__ import annotations

import re

_HF_RULES = [(re.compile(a), b) for a, b in [
    (r"^model\.", ""),
    (r"^lm_head\.", "head."),
    (r"^embed_tokens\.", "embed."),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"),
    (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
    (r"\.self_attn\.compressor\.indexer\.scorer\.", ".attn.indexer."),
    (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.attn\.sinks$", ".attn.attn_sink"),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.attn\.norm\.weight$", ".attn.kv_norm.weight"),            # transformers' default save
    (r"\.attn\.kv_proj\.", ".attn.wkv."),
    (r"compressor\.kv_proj\.", "compressor.wkv."),
    (r"compressor\.gate_proj\.", "compressor.wgate."),
    (r"compressor\.position_bias$", "compressor.ape"),
    (r"compressor\.kv_norm\.", "compressor.norm."),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.weight_scale_inv$", ".scale"),
]]

# HF stacks routed experts: gate_up_proj [E, 2F, D] (w1 rows then w3 rows), down_proj [E, D, F].
HF_STACKED_EXPERTS = re.compile(r"^(?:model\.)?layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def to_official(name: str) -> str:
  """Normalises an HF-style (or already official) tensor name to the official name."""
  for pattern, repl in _HF_RULES:
    name = pattern.sub(repl, name)
  return name


_HC = re.compile(r"^hc_(attn|ffn|head)_(fn|base|scale)$")


def block_path(rest: str) -> tuple[tuple, int | None]:
  """Path inside one block's param dict of an official per-layer name (without `layers.N.`), and the
  routed-expert index for `ffn.experts.E.wK.weight` (None otherwise)."""
  m = _HC.match(rest)
  if m:
    return (f"hc_{m.group(1)}", m.group(2)), None
  m = re.match(r"^ffn\.experts\.(\d+)\.(w[123])\.weight$", rest)
  if m:
    return ("ffn", "experts", m.group(2)), int(m.group(1))
  parts = rest.split(".")
  if parts[-1] == "weight" and len(parts) > 1 and not (parts[-2] == "gate" and parts[0] == "ffn"):
    parts = parts[:-1]
  return tuple(parts), None


def official_path(name: str) -> tuple[str, tuple, int | None]:
  """Official name -> (scope, path, expert) with scope "top", "layers.N" or "mtp.J"."""
  m = re.match(r"^(layers|mtp)\.(\d+)\.(.+)$", name)
  if m:
    path, expert = block_path(m.group(3))
    return f"{m.group(1)}.{m.group(2)}", path, expert
  m = _HC.match(name)
  if m:
    return "top", ("hc_head", m.group(2)), None
  parts = name.split(".")
  if parts[-1] == "weight":
    parts = parts[:-1]
  return "top", tuple(parts), None
