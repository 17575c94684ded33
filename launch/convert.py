"""Convert a released DeepSeek-V4 safetensors checkpoint to the Orbax layout `load_params` restores.

    python -m launch.convert --input=/path/DeepSeek-V4-Flash --output=/path/flash-orbax [--dtype=keep]

--dtype=keep (default) keeps fp8 / fp4 weights quantised (155 GB for Flash); bf16 / fp32 write dense
arrays. See dsv4_jax/checkpoint/convert.py. A bad input (missing, truncated or mismatched shards, an existing
output without --overwrite) fails with one `error: ...` line on stderr and exit code 2 (launch/common.py).

Conversion is host work for one process: in a multi-host job (a TPU slice, `srun`, `mpirun`, or the
--coordinator_address flags) it refuses to start. Convert once onto storage every host reads (then every host
restores only its shards), or on each host into its own disk with --num_processes=1.
"""
import os

from absl import flags

from dsv4_jax.checkpoint import convert
from launch import common

_INPUT = flags.DEFINE_string("input", None, "Released checkpoint: a directory with config.json and safetensors "
                            "shards (with or without model.safetensors.index.json), or one .safetensors file.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to create.")
_DTYPE = flags.DEFINE_enum("dtype", "keep", sorted(convert.DTYPES), "keep: fp8/fp4 stay quantised; bf16/fp32: "
                           "dequantised dense weights.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")
flags.mark_flags_as_required(["input", "output"])


def main(argv):
  if len(argv) > 1:
    raise common.UsageError(f"unexpected arguments: {argv[1:]}")
  if not os.path.exists(_INPUT.value):
    raise FileNotFoundError(f"--input={_INPUT.value!r}: no such file or directory.")
  summary = convert.convert(_INPUT.value, _OUTPUT.value, dtype=_DTYPE.value, overwrite=_OVERWRITE.value)
  print(summary)


if __name__ == "__main__":
  common.run(main, multihost="launch.convert runs in one process; run it on one host writing to storage every "
                             "host reads, or on each host separately with --num_processes=1.")
