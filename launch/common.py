"""What every launch script shares: one-line errors, `--config=NAME` for the files in configs/, quiet logs.

A launch script defines its absl flags and a `main(argv)` as usual and ends with

    if __name__ == "__main__":
      common.run(main)                    # or common.run(main, config_flag="config") with a config_flags flag

instead of `absl.app.run(main)`. Then:

- Expected failures (bad flags or input, a missing or existing path, a config that does not exist or does
  not fit: the types in `EXPECTED_ERRORS`, and `app.UsageError` raised by the script) print ONE line,
  `error: <message>`, on stderr and exit with code 2. Write the message so it says what to change.
  Any other exception is a bug and keeps its traceback (exit 1). `--verbosity=1` (debug) shows the
  traceback of expected failures too.
- The log stays at WARNING: absl's default INFO level would print library chatter such as jax's
  "Unable to initialize backend 'tpu'" on every run. `--verbosity=N` / `-v N` sets it as absl does
  (0 = INFO, 1 = DEBUG).
- Multi-host: `--coordinator_address`, `--num_processes`, `--process_id` (or JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID; on a multi-host TPU slice, SLURM `srun` or `mpirun` none is needed) start
  jax's distributed runtime (`dsv4_jax.distributed.initialize`) after flag parsing and before `main` touches
  a device; then `jax.devices()` lists every process's devices and a `--mesh` spans them all. Scripts print
  results on process 0 only (`distributed.is_primary()`). On a single host nothing changes.
- With `config_flag`, `--config=NAME` (NAME one of `config_names()`, optionally `NAME:ARGS`) becomes the path of
  configs/NAME.py before absl parses the flags; a NAME that is neither a config there nor an existing file fails
  with `error: no config named ...`, listing the names.

Helpers a script can call itself: `fail(message)` (print the error line, exit 2), `error_line`, `config_path` /
`config_argv` (the configs/ name resolution), `parse_ids` (token ids from a flag, UsageError when malformed or
empty), `quiet_logs` (the WARNING default; `run` already calls it).
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Sequence

from absl import app, flags, logging

from dsv4_jax.config import config_names

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
EXIT_ERROR = 2            # an expected failure: the message says what to change
EXIT_INTERRUPTED = 130    # Ctrl-C

UsageError = app.UsageError   # raise this for bad flag values or combinations

_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0 (any free port, "
                                   "the same on every process). Default: JAX_COORDINATOR_ADDRESS, else detected on "
                                   "a TPU slice / SLURM / Open MPI, else a single host.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: processes in the job (default: "
                                      "JAX_NUM_PROCESSES or detected; 1 = single process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process, 0..num_processes-1 (default: "
                                   "JAX_PROCESS_ID or detected).")
# Expected failures: their message is the whole story. ValueError covers input validation across dsv4_jax
# (bad ids, shapes that do not match a config, corrupt or truncated checkpoints, JSON that does not parse);
# OSError covers paths the user gave (missing, existing, not a directory, unreadable) and a full disk.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (app.UsageError, ValueError, MemoryError, OSError)


def error_line(e: BaseException | str, hint: str = "") -> str:
  """`error: <message>[ (hint)]` on one line (a multi-line message is joined with spaces)."""
  text = e if isinstance(e, str) else (str(e) or type(e).__name__)
  head, tb, rest = text.partition("Traceback (most recent call last):")
  if tb:                                   # a message quoting a traceback (config_flags): keep its last line
    last = [line for line in rest.splitlines() if line.strip()][-1:]
    text = head + "".join(last)
  return ("error: " + " ".join(line.strip() for line in text.strip().splitlines() if line.strip())
          + (f" ({hint})" if hint else ""))


def fail(e: BaseException | str, hint: str = "") -> None:
  """Prints `error_line(e, hint)` on stderr and exits with code 2."""
  sys.stdout.flush()
  print(error_line(e, hint), file=sys.stderr, flush=True)
  sys.exit(EXIT_ERROR)


def config_path(spec: str) -> str:
  """A `--config` value -> what config_flags loads: a configs/ name (with an optional `:ARGS` tail) becomes
  configs/NAME.py[:ARGS]; an existing file stays as it is; anything else raises UsageError naming the choices."""
  head, sep, tail = spec.partition(":")
  names = config_names()
  if head in names:
    return os.path.join(CONFIG_DIR, head + ".py") + sep + tail
  if os.path.isfile(head):
    return spec
  raise UsageError(f"no config named {head!r}: use one of {', '.join(names)} (the files in configs/) or the "
                   "path of a .py config file.")


def config_argv(argv: Sequence[str], flag: str = "config") -> list[str]:
  """argv with every `--FLAG=VALUE` / `--FLAG VALUE` passed through `config_path` (`--FLAG.field=...`
  overrides are left alone). Raises UsageError for an unknown config."""
  out, argv, i = [], list(argv), 0
  while i < len(argv):
    a = argv[i]
    if a == "--":                                        # absl: the rest are positional arguments
      out += argv[i:]
      break
    if a.startswith(f"--{flag}="):
      a = f"--{flag}=" + config_path(a[len(flag) + 3:])
    elif a == f"--{flag}" and i + 1 < len(argv):
      out += [a, config_path(argv[i + 1])]
      i += 2
      continue
    out.append(a)
    i += 1
  return out


def parse_ids(spec: str, flag: str, sequences: bool = True) -> list[list[int]] | list[int]:
  """Token ids from a flag value: "5,17,300;7,8" -> [[5, 17, 300], [7, 8]] (`sequences`: ';' separates
  sequences, each needs at least one id), or "5,17" -> [5, 17] (may be empty). Raises UsageError naming
  `flag` (e.g. "--prompt_ids")."""
  try:
    seqs = [[int(t) for t in seq.split(",") if t.strip()] for seq in (spec.split(";") if sequences else [spec])]
  except ValueError:
    raise UsageError(f"{flag}={spec!r}: expected comma-separated integers"
                     + (", ';' between sequences." if sequences else ".")) from None
  if not sequences:
    return seqs[0]
  if not all(seqs):
    raise UsageError(f"{flag}={spec!r}: empty prompt; give at least one token id per sequence.")
  return seqs


def verbosity_given() -> bool:
  """Whether the command line set --verbosity / -v (after flag parsing)."""
  return flags.FLAGS["verbosity"].present > 0


def quiet_logs() -> None:
  """Log at WARNING unless the command line chose a verbosity (call after flag parsing)."""
  if not verbosity_given():
    logging.set_verbosity(logging.WARNING)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(e, hint="--helpshort lists the flags")
  except (AttributeError, KeyError) as e:             # ml_collections: `--config.FIELD=...` for a missing FIELD
    name = str(e).strip("\"'")
    fail(f"the config has no field {name!r} to override (--config.FIELD=VALUE sets an existing field).")


def start_distributed() -> bool:
  """`distributed.initialize` from the multi-host flags (else the environment); prints which process this is
  (process 0 only). True when the job spans several processes."""
  from dsv4_jax import distributed
  started = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if started and distributed.describe() and distributed.is_primary():
    print(distributed.describe(), file=sys.stderr, flush=True)
  return started


def refuse_multihost(what: str) -> None:
  """Raises UsageError when the flags or the environment make this one process of several (`what`: why the
  script cannot take part, and what to do instead); starts nothing."""
  from dsv4_jax import distributed
  planned = distributed.plan(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if planned:
    raise UsageError(f"this is a multi-host job ({planned[0]}): {what}")


def _main(main: Callable, argv: list[str], multihost: bool | str = True):
  quiet_logs()
  try:
    if isinstance(multihost, str):
      refuse_multihost(multihost)
    elif multihost:
      start_distributed()
    return main(argv)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
  except EXPECTED_ERRORS as e:
    if flags.FLAGS.verbosity >= 1:                     # debugging: the whole traceback
      raise
    fail(e)


def run(main: Callable[[list[str]], object], *, config_flag: str | None = None, argv: Sequence[str] | None = None,
        multihost: bool | str = True):
  """`absl.app.run(main)` with the behaviour in this module's docstring. `config_flag` names the script's
  `config_flags.DEFINE_config_file` flag (usually "config") whose value may be a configs/ name. `multihost`:
  True starts jax's distributed runtime when the flags or the environment ask for it; False never does (a
  deviceless compile); a message: a script
  that runs in one process refuses such a job with `error: this is a multi-host job (...): MESSAGE`."""
  argv = list(sys.argv if argv is None else argv)
  if config_flag:
    try:
      argv = config_argv(argv, config_flag)
    except UsageError as e:
      fail(e)
  app.run(functools.partial(_main, main, multihost=multihost), argv=argv, flags_parser=_parse_flags)
