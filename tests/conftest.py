import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the whole run: compiles dominate this suite, and many programs recur
# (the same tiny-model step in several files, after `jax.clear_caches()` between modules, in the
# `launch.decode` / fake-device subprocesses, which inherit the variable). The controller creates the
# directory before the xdist workers start, so both workers share it; it is removed when the run ends. A
# size limit turns on jax's file lock around cache reads and writes (two workers write the same entries).
# An explicitly set JAX_COMPILATION_CACHE_DIR is used as is and kept.
_RUN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  _RUN_CACHE = tempfile.mkdtemp(prefix="dsv4_jax_test_cc_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _RUN_CACHE
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(64 << 30))
# XLA:CPU compile time dominates this suite (tiny models, many programs): its LLVM back end runs without
# optimisation (about 40% less compile time, the programs are small enough that run time does not matter);
# on top of that, the older loop emitters instead of the MLIR fusion emitters, and one LLVM module per
# program instead of parallel codegen splits (each about 40% less again on the tiny model's forward and
# decode step, Dec 2026, jax 0.10; run time unchanged). Appended to any XLA_FLAGS already set; subprocesses
# inherit them (tests/fake_devices.py keeps them).
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                      "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_FLAGS).strip()
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


# `make test` runs two xdist workers, one file at a time each (--dist loadfile --no-loadscope-reorder): the
# slowest files go first, so that no long file starts when the other worker is nearly done (longest first;
# seconds for the file alone in one process on 2 busy cores, Dec 2026, except where marked CI: seconds per
# file in a CI log with two workers). The other files follow in the usual order. xdist starts each worker on
# two files (the 1st and 3rd to one, the 2nd and 4th to the other): test_sharded_context.py runs after
# test_sharded_model.py on the same worker and finds their common one-device reference programs (the same
# script, tests/pod_meshes.py) in the run's persistent compilation cache instead of compiling them again.
SLOW_FILES_FIRST = (
    "test_sharded_model.py",        # ~630 s, one subprocess on 8 fake devices (tests/pod_meshes.py)
    "test_inference.py",            # ~450 s
    "test_sharded_context.py",      # ~500 s, the same on the sequence mesh, with a training step
    "test_speculative.py",          # ~370 s
    "test_multihost.py",            # CI ~290 s
    "test_inference_launch.py",     # CI ~280 s, launch.decode subprocesses
    "test_train_launch.py",         # CI ~220 s
    "test_modules.py",              # ~165 s
    "test_pods.py",
    "test_expert_parallel.py",
    "test_checkpoint_convert.py",
    "test_train.py",
    "test_nnx.py",
)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))      # stable: the rest keep their order


def pytest_unconfigure(config):
  if _RUN_CACHE is not None:
    import shutil
    shutil.rmtree(_RUN_CACHE, ignore_errors=True)
