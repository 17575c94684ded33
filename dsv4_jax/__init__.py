"""dsv4-jax: DeepSeek-V4 (Flash / Pro) in JAX.

    from dsv4_jax import ModelConfig, load_config, init_params, load_params, forward
"""
from dsv4_jax.config import ModelConfig, config_names, describe, load_config
from dsv4_jax.transformer import (ForwardOutput, abstract_params, forward, init_params, layer_plan,
                                  param_specs)
from dsv4_jax.weights import load_params

__all__ = [
    "ModelConfig", "load_config", "config_names", "describe", "init_params", "abstract_params", "param_specs",
    "layer_plan", "load_params", "forward", "ForwardOutput",
]
