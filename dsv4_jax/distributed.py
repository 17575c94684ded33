"""Multi-process start-up: `jax.distributed.initialize` exactly when the job spans several processes.

    from dsv4_jax import distributed
    distributed.initialize()                     # first thing, before anything touches jax devices
    mesh = make_mesh("data:2,expert:4", cfg)      # jax.devices() now lists every process's devices
    if distributed.is_primary():
      print(...)

`initialize(coordinator_address, num_processes, process_id)` decides, in this order:

1. Explicit: the arguments, else the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
   JAX_PROCESS_ID. All three given -> `jax.distributed.initialize(address, n, id)` (n = 1: nothing to do).
   Some but not all -> ValueError naming the missing ones, unless a cluster below is detected (jax fills
   in the rest from it).
2. A cluster jax detects itself -> `jax.distributed.initialize()` (plus whatever step 1 gave):
   - a multi-host Cloud TPU slice: TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES listing more than one host
     (GKE), MEGASCALE_* (multislice), or a Cloud TPU VM whose metadata lists more than one worker (GCE,
     `gcloud compute tpus tpu-vm ssh --worker=all`);
   - SLURM with more than one task in the step (`srun`: SLURM_NTASKS > 1 and SLURM_STEP_NODELIST set);
   - Open MPI with OMPI_COMM_WORLD_SIZE > 1 (`mpirun`); jax reads the coordinator from
     OMPI_MCA_orte_hnp_uri, which Open MPI 5 no longer sets: there pass the coordinator address.
   On SLURM and Open MPI jax gives each process the one GPU of its local rank: launch one task per GPU
   with every GPU of the node visible (`srun --ntasks-per-node=8 --gpus-per-node=8`, not --gpus-per-task).
3. Otherwise a single host: nothing happens and `initialize` returns False.

It is idempotent (a second call returns True at once when the first initialised) and touches no backend:
jax.distributed.initialize must come before jax.devices(), every computation, and the import of any module
that builds a jax array at import time. `plan(...)` says what `initialize` would do without doing it (for
scripts that refuse multi-host jobs). On CPU (tests, fake multi-host) jax's default cross-process
collectives are gloo, which needs nothing else.

What it does not do: pick the mesh (sharding.make_mesh over jax.devices(), which then spans all processes),
split input data between processes, or restore weights (weights.load_params restores on each process only
the shards its devices hold).
"""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
_state = {"reason": None}        # why initialize() started the distributed runtime (None: it did not)


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer.") from None


def _count(value: str | None) -> int:
  """Entries of a comma-separated host list ("" / None -> 0)."""
  return len([h for h in (value or "").split(",") if h.strip()])


def _gce_tpu_workers() -> int:
  """Workers of this Cloud TPU slice from the VM's metadata (0 unless this is a Cloud TPU VM). jax's own
  GCE detection, which asks the local metadata server only on a TPU VM (never on CPU or GPU hosts)."""
  try:
    from jax._src import cloud_tpu_init
    if not cloud_tpu_init.running_in_cloud_tpu_vm:
      return 0
    from jax._src.clusters.cloud_tpu_cluster import GceTpuCluster
    return len(GceTpuCluster._get_worker_list_in_slice()) if GceTpuCluster.is_env_present() else 0
  except Exception as e:                     # a private API that moved, or no metadata server: single host
    log.debug("Cloud TPU worker detection failed: %s", e)
    return 0


def detect_cluster() -> str | None:
  """The multi-process cluster jax.distributed.initialize() detects by itself, in words, or None."""
  env = os.environ
  hosts = _count(env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES"))
  if hosts > 1:
    return f"Cloud TPU slice of {hosts} hosts (TPU_WORKER_HOSTNAMES)"
  slices = _env_int("MEGASCALE_NUM_SLICES") or 0
  if slices > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return f"Cloud TPU multislice ({slices or '?'} slices, MEGASCALE_*)"
  tasks = _env_int("SLURM_NTASKS") or 0
  if tasks > 1 and "SLURM_STEP_NODELIST" in env:
    return f"SLURM step of {tasks} tasks"
  ranks = _env_int("OMPI_COMM_WORLD_SIZE") or 0
  if ranks > 1:
    return f"Open MPI job of {ranks} ranks"
  workers = _gce_tpu_workers()
  if workers > 1:
    return f"Cloud TPU slice of {workers} hosts (VM metadata)"
  return None


def plan(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None) -> tuple[str, dict] | None:
  """What `initialize` would do, without doing it: (why, in words; the keyword arguments for
  jax.distributed.initialize, None values left to jax's cluster detection), or None on a single host.
  Raises ValueError for a partial explicit setup outside a detected cluster, or a value that does not parse."""
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  n = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  pid = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  given = {"coordinator_address": address, "num_processes": n, "process_id": pid}
  if n == 1 and pid in (None, 0):
    return None                                      # asked for one process
  if n is not None and n < 1 or pid is not None and (pid < 0 or n is not None and pid >= n):
    raise ValueError(f"process_id={pid} and num_processes={n}: need 0 <= process_id < num_processes.")
  if address is not None and ":" not in address:
    raise ValueError(f"coordinator_address={address!r}: expected HOST:PORT (process 0's address and a free port).")
  if None not in given.values():
    return f"coordinator {address}", given
  cluster = detect_cluster()
  if cluster:
    if address is None and "Open MPI" in cluster and "OMPI_MCA_orte_hnp_uri" not in os.environ:
      raise ValueError(f"{cluster} without OMPI_MCA_orte_hnp_uri (Open MPI 5): jax cannot find the coordinator; "
                       "pass --coordinator_address=HOST:PORT (rank 0's host and a free port) or set "
                       "JAX_COORDINATOR_ADDRESS.")
    return cluster, given
  if any(v is not None for v in given.values()):
    missing = [f"{k} ({e})" for (k, v), e in zip(given.items(), ENV_VARS) if v is None]
    raise ValueError(f"a multi-process run needs coordinator_address, num_processes and process_id; missing "
                     f"{', '.join(missing)}. Give all three (--coordinator_address, --num_processes, --process_id "
                     "or the environment variables) or none on a single host.")
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts jax's distributed runtime when this process is one of several (`plan`, the module docstring).
  Returns True when it is (now or from an earlier call), False on a single host. Raises ValueError as `plan`,
  and jax's RuntimeError when something already initialised the backend (a jax computation, jax.devices(),
  or importing a module that builds a jax array at import)."""
  if jax.distributed.is_initialized():
    return True
  planned = plan(coordinator_address, num_processes, process_id)
  if planned is None:
    return False
  reason, kwargs = planned
  log.info("jax.distributed.initialize: %s", reason)
  jax.distributed.initialize(**kwargs)
  _state["reason"] = reason
  return True


def is_primary() -> bool:
  """Whether this is process 0, the one that prints: True without the distributed runtime (a single host;
  then no backend is touched), else jax.process_index() == 0."""
  return not jax.distributed.is_initialized() or jax.process_index() == 0


def describe() -> str:
  """"distributed: process 0 of 2 (...), 4 of 8 devices here"; "" when initialize did not start it."""
  if _state["reason"] is None:
    return ""
  return (f"distributed: process {jax.process_index()} of {jax.process_count()} ({_state['reason']}), "
          f"{jax.local_device_count()} of {jax.device_count()} devices here")


def to_host(tree):
  """`jax.device_get` that also works in a multi-process job: an array spread over several processes (e.g.
  batch over `data` across hosts) is all-gathered first, so every process gets the whole value."""
  import numpy as np
  from jax.experimental import multihost_utils

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.device_get(x)
  return jax.tree.map(one, tree)
