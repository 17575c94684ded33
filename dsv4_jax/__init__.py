"""dsv4-jax: DeepSeek-V4 (Flash / Pro) in JAX.

    from dsv4_jax import ModelConfig, load_config, init_params, load_params, forward
    from dsv4_jax import init_cache, prefill, decode_step, generate

Names are imported lazily, so `import dsv4_jax.chat` / `dsv4_jax.tokenizer` do not pull in JAX.
"""
import importlib

_EXPORTS = {
    "ModelConfig": "config", "load_config": "config", "config_names": "config", "describe": "config",
    "init_params": "transformer", "abstract_params": "transformer", "param_specs": "transformer",
    "layer_plan": "transformer", "relayout_layers": "transformer", "forward": "transformer",
    "ForwardOutput": "transformer", "parameter_counts": "transformer",
    "load_params": "weights",
    "init_cache": "cache", "cache_size": "cache",
    "prefill": "inference", "decode_step": "inference",
    "generate": "generation", "GenerateResult": "generation", "Sampling": "sampling",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"dsv4_jax.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'dsv4_jax' has no attribute {name!r}")


def __dir__():
  return __all__
