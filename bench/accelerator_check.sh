#!/usr/bin/env bash
# The whole accelerator check in one call, for a session lent a GPU or TPU (e.g. through the device tool):
# the kernel tests with the kernels running for real on this machine's backend (tests pass backend="gpu" /
# "tpu" explicitly; the one matching the device runs natively, the other interpreted), then the bench.
# Output goes to stdout and, when $OUT is set, to $OUT/accelerator_check.txt; commit it under bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
log=${OUT:-/tmp}/accelerator_check.txt
{
  echo "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null)"
  $PY -c "import jax; print('jax', jax.__version__, jax.devices())"
  echo "== kernel tests (native on this device's backend)"
  $PY -m pytest -q -x tests/test_pallas.py tests/test_kernel_compressor.py -k "not model_with and not races" 2>&1 | tail -15
  echo "== bench/kernels.py"
  $PY bench/kernels.py "$@"
} 2>&1 | tee "$log"
