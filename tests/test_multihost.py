"""Multi-host on one machine: two OS processes x 2 CPU devices each, joined by jax's distributed runtime
(coordinator on 127.0.0.1, gloo collectives, jax's CPU default). Checks `distributed.initialize`'s decision
logic (jax.distributed.initialize mocked), per-host restore of a converted checkpoint (every leaf a global
array whose addressable shards are the matching slices of the single-process parameters; with experts over
both processes each holds only its half), the forward's logits against one process, and `launch.decode`
in two processes (process 0 prints the single-process ids, process 1 nothing)."""
import socket
import subprocess
import sys
import textwrap

import pytest

from fake_devices import ROOT, cpu_env

from dsv4_jax import distributed

TIMEOUT = 240          # seconds for one group of processes; a hang fails instead of blocking CI


# ---- initialize's decision logic, jax.distributed.initialize mocked ----------------------------------------

CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_WORKER_HOSTNAMES",
                "TPU_PROCESS_ADDRESSES", "MEGASCALE_NUM_SLICES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS",
                "SLURM_STEP_NODELIST", "OMPI_COMM_WORLD_SIZE", "OMPI_MCA_orte_hnp_uri")


@pytest.fixture()
def calls(monkeypatch):
  """A clean environment and a recording jax.distributed.initialize; returns the list of its calls."""
  import jax
  for v in CLUSTER_VARS:
    monkeypatch.delenv(v, raising=False)
  made = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(made))
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: made.append(kw))
  monkeypatch.setattr(distributed, "_gce_tpu_workers", lambda: 0)
  monkeypatch.setitem(distributed._state, "reason", None)
  return made


def _args(address=None, n=None, pid=None):
  return {"coordinator_address": address, "num_processes": n, "process_id": pid}


def test_single_host_does_nothing(calls, monkeypatch):
  assert distributed.initialize() is False
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1k-w-0")                   # a one-host slice
  monkeypatch.setenv("SLURM_NTASKS", "1")
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node1")
  monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
  assert distributed.initialize() is False
  assert distributed.initialize("10.0.0.1:1234", 1, 0) is False              # one process asked for
  assert calls == [] and distributed.describe() == "" and distributed.is_primary()


def test_explicit_arguments_and_environment(calls, monkeypatch):
  assert distributed.initialize("10.0.0.1:1234", 2, 1) is True
  assert calls == [_args("10.0.0.1:1234", 2, 1)]
  assert distributed.initialize("10.0.0.1:1234", 2, 1) is True              # idempotent: no second call
  assert len(calls) == 1
  calls.clear()
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:99")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert distributed.initialize() is True
  assert calls == [_args("10.0.0.2:99", 4, 3)]


@pytest.mark.parametrize("given, missing", [
    (("10.0.0.1:1234", None, None), ("num_processes", "process_id")),
    ((None, 2, 0), ("coordinator_address",)),
    ((None, None, 1), ("coordinator_address", "num_processes")),
])
def test_partial_explicit_setup_names_what_is_missing(calls, given, missing):
  with pytest.raises(ValueError) as e:
    distributed.initialize(*given)
  for name in missing:
    assert name in str(e.value)
  assert calls == []


def test_bad_values(calls, monkeypatch):
  for args, words in [(("10.0.0.1:1", 2, 2), "process_id=2"), (("10.0.0.1", 2, 0), "HOST:PORT")]:
    with pytest.raises(ValueError, match=words):
      distributed.initialize(*args)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
    distributed.initialize()
  assert calls == []


@pytest.mark.parametrize("env", [
    {"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"},
    {"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"},
    {"MEGASCALE_NUM_SLICES": "2", "MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"},
    {"SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "node[1-2]"},
    {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_orte_hnp_uri": "123.0;tcp://10.0.0.1:4000"},
])
def test_detected_clusters_use_jax_auto_detection(calls, monkeypatch, env):
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert distributed.detect_cluster()
  assert distributed.initialize() is True
  assert calls == [_args()]


def test_cluster_edge_cases(calls, monkeypatch):
  monkeypatch.setenv("SLURM_NTASKS", "8")                  # an sbatch script outside srun: one process
  assert distributed.initialize() is False
  monkeypatch.setattr(distributed, "_gce_tpu_workers", lambda: 4)      # a Cloud TPU VM of a 4-host slice
  assert distributed.initialize() is True and calls == [_args()]
  calls.clear()
  monkeypatch.setattr(distributed, "_gce_tpu_workers", lambda: 0)
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-2]")   # in a cluster, what is given goes along
  assert distributed.initialize("10.0.0.1:1234") is True and calls == [_args("10.0.0.1:1234")]
  calls.clear()
  for v in ("SLURM_NTASKS", "SLURM_STEP_NODELIST"):
    monkeypatch.delenv(v)
  monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")          # Open MPI 5: no hnp uri, jax cannot find rank 0
  with pytest.raises(ValueError, match="--coordinator_address"):
    distributed.initialize()
  assert distributed.initialize("10.0.0.1:1234") is True and calls == [_args("10.0.0.1:1234")]


def test_launch_flags_partial_setup_is_one_error_line():
  r = subprocess.run([sys.executable, "-m", "launch.decode", "--config=tiny", "--coordinator_address=127.0.0.1:1"],
                     cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "num_processes" in lines[0], r.stderr


# ---- two processes x 2 CPU devices -------------------------------------------------------------------------

REFERENCE = textwrap.dedent("""
    import sys, jax, numpy as np
    from dsv4_jax import forward, init_params, load_config, load_params
    from dsv4_jax.generation import generate
    from launch.train import export_params
    ckpt, out = sys.argv[1], sys.argv[2]
    cfg = load_config("tiny")                                     # float32
    export_params(init_params(cfg, jax.random.key(3)), cfg, ckpt)
    params = load_params(ckpt, cfg)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    tokens = np.array([[5, 17, 300, 42, 7, 9, 11, 13], [0, 2, 3, 4, 5, 6, 7, 8]], np.int32)
    logits = jax.jit(forward, static_argnums=1)(params, cfg, tokens).logits
    ids = generate(params, cfg, [[5, 17, 300]], 4).tokens[0]          # greedy, as launch.decode's default
    paths = np.array([jax.tree_util.keystr(p) for p, _ in leaves])
    np.savez(out, tokens=tokens, logits=np.asarray(logits), ids=np.array(ids), paths=paths,
             **{f"leaf{i}": np.asarray(x) for i, (_, x) in enumerate(leaves)})
    print("ok")
""")

WORKER = textwrap.dedent("""
    import sys, jax, numpy as np
    from dsv4_jax import distributed
    address, pid, ckpt, ref_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    assert distributed.initialize(address, 2, pid) is True
    assert distributed.initialize(address, 2, pid) is True        # idempotent
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dsv4_jax import forward, load_config, load_params
    from dsv4_jax.sharding import make_mesh, use_mesh
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    assert distributed.is_primary() == (pid == 0)
    cfg = load_config("tiny")
    ref = np.load(ref_path)
    fwd = jax.jit(forward, static_argnums=1)
    for spec in ("data:2,expert:2", "expert:4"):
      mesh = make_mesh(spec, cfg)
      params = load_params(ckpt, cfg, mesh=mesh)
      leaves = jax.tree_util.tree_flatten_with_path(params)[0]
      assert [jax.tree_util.keystr(p) for p, _ in leaves] == list(ref["paths"])
      split = 0
      for i, (path, x) in enumerate(leaves):
        want = ref[f"leaf{i}"]
        assert isinstance(x, jax.Array) and x.shape == want.shape and x.dtype == want.dtype, path
        assert not x.is_fully_addressable, path                   # a global array over both processes
        shards = x.addressable_shards
        assert {s.device for s in shards} == set(jax.local_devices()), path
        for s in shards:
          np.testing.assert_array_equal(np.asarray(s.data), want[s.index], err_msg=jax.tree_util.keystr(path))
        held = {str(s.index): s.data.size for s in shards}
        split += sum(held.values()) < want.size                   # this process holds part of the leaf only
      print(f"process {pid} mesh {spec}: {len(leaves)} leaves, {split} held in part")
      if spec == "expert:4":
        assert split > 0                                          # experts split between the processes
        continue                                                  # (its forward: the launch.decode test)
      tokens = jax.device_put(ref["tokens"], NamedSharding(mesh, P()))
      with use_mesh(mesh):                                        # the batch split between the processes
        logits = fwd(params, cfg, tokens).logits
      got = np.asarray(multihost_utils.process_allgather(logits, tiled=True))
      diff = float(np.max(np.abs(got - ref["logits"])))
      print(f"process {pid} mesh {spec}: logits max abs diff {diff:.2e}")
      assert diff < 2e-5, diff
    print("ok")
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_processes(argvs: list[list[str]], env: dict, timeout: float = TIMEOUT) -> list[tuple[int, str, str]]:
  """Starts one process per argv, waits for all; on a timeout kills every one and fails.
  Returns (returncode, stdout, stderr) per process."""
  procs = [subprocess.Popen(a, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for a in argvs]
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    outs = [p.communicate() for p in procs]
    pytest.fail(f"processes did not finish in {timeout} s:\n" + "\n".join(o[1][-2000:] for o in outs))
  return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """(converted tiny checkpoint, reference npz of its single-process params, logits and greedy ids)."""
  root = tmp_path_factory.mktemp("multihost")
  ckpt, ref = str(root / "tiny"), str(root / "ref.npz")
  [(rc, out, err)] = _run_processes([[sys.executable, "-c", REFERENCE, ckpt, ref]], cpu_env(1))
  assert rc == 0 and out.strip().endswith("ok"), err[-3000:]
  return ckpt, ref


def test_two_processes_restore_their_shards_and_match_one(checkpoint):
  ckpt, ref = checkpoint
  address = f"127.0.0.1:{_free_port()}"
  results = _run_processes([[sys.executable, "-c", WORKER, address, str(i), ckpt, ref] for i in range(2)],
                           cpu_env(2))
  for i, (rc, out, err) in enumerate(results):
    print(out)
    assert rc == 0 and out.strip().endswith("ok"), f"process {i}:\n{out[-2000:]}\n{err[-4000:]}"


def test_decode_in_two_processes_prints_the_single_process_ids(checkpoint):
  # experts over both processes' devices, data across them: every output array spans both processes, so the
  # host copies go through distributed.to_host's all-gather
  import numpy as np
  ckpt, ref = checkpoint
  flags = ["--config=tiny", f"--checkpoint={ckpt}", "--mesh=data:2,expert:2", "--prompt_ids=5,17,300",
           "--max_new_tokens=4"]
  single = "[0] ids: " + ",".join(map(str, np.load(ref)["ids"])) + "\n"
  address = f"127.0.0.1:{_free_port()}"
  results = _run_processes([[sys.executable, "-m", "launch.decode", *flags, f"--coordinator_address={address}",
                             "--num_processes=2", f"--process_id={i}"] for i in range(2)], cpu_env(2))
  for i, (rc, out, err) in enumerate(results):
    assert rc == 0, f"process {i}:\n{out[-2000:]}\n{err[-4000:]}"
  ids = lambda text: [line for line in text.splitlines() if line.startswith("[0] ids:")]
  (_, out0, err0), (_, out1, err1) = results
  print(out0, err0)
  assert ids(out0) == ids(single) and len(ids(single)) == 1, (out0, single)
  assert "distributed: process 0 of 2" in err0
  assert not ids(out1) and "loading" not in err1                        # process 1 computes quietly


def test_convert_and_train_refuse_a_multi_host_job(tmp_path):
  for script in (["launch.convert", f"--input={ROOT}", f"--output={tmp_path / 'out'}"],
                 ["launch.train", "--config=tiny", f"--data={tmp_path}", f"--workdir={tmp_path / 'wd'}"]):
    r = subprocess.run([sys.executable, "-m", *script, "--coordinator_address=127.0.0.1:1", "--num_processes=2",
                        "--process_id=1"], cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: this is a multi-host job (coordinator 127.0.0.1:1): launch."), lines
