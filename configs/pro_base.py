"""DeepSeek-V4-Pro-Base: the Pro architecture with FP8 routed experts (docs/architecture.md §1.3)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import pro  # noqa: E402


def get_config():
  cfg = pro.get_config()
  cfg.name = "pro_base"
  cfg.expert_dtype = "fp8"
  return cfg
