import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))                      # tests/hf_oracle.py
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))     # the repo root (configs/, launch/)


import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops jax's compiled executables after each test module: one long pytest process otherwise accumulates
  hundreds of programs (the interpret-mode kernels are large), and XLA:CPU crashed once deep into such a run."""
  yield
  jax.clear_caches()
  gc.collect()
