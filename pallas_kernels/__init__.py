"""Pallas kernels for DeepSeek-V4 (compressor, indexer, sparse attention). Each kernel sits beside
a plain-jnp reference in `dsv4_jax`; none are implemented yet."""
