"""DeepSeek-V4-Flash-Base: the Flash architecture with FP8 routed experts (docs/architecture.md §1.3)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import flash  # noqa: E402


def get_config():
  cfg = flash.get_config()
  cfg.name = "flash_base"
  cfg.expert_dtype = "fp8"
  return cfg
