"""launch.train end to end, as subprocesses on a 2-layer V4 (SWA + hash MoE, CSA + routed MoE, MTP):

- an uninterrupted run's loss goes down on Botchan, and it writes metrics.jsonl, TensorBoard events, Orbax
  checkpoints and an exported checkpoint that load_params reads;
- a second run of the same command killed with SIGKILL after a checkpoint, then started again, logs the same
  losses as the uninterrupted run, step for step, bit for bit;
- bad input fails before any compute with one `error:` line and exit code 2 (the data checks themselves are
  in test_data.py).

The three training processes share a persistent compilation cache, so only the first compiles.
"""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOTCHAN = os.path.join(ROOT, "tests", "assets", "botchan.txt")
SP_MODEL = os.path.join(ROOT, "tests", "assets", "botchan_en_bpe_1000.model")
STEPS, KILL_AFTER = 24, 8

SMALL_CONFIG = '''
import ml_collections

def get_config():
  return ml_collections.ConfigDict(dict(
      name="small", vocab_size=1000, dim=64, n_layers=2, n_mtp_layers=1,
      n_heads=2, head_dim=32, rope_head_dim=16, q_lora_rank=32, o_groups=2, o_lora_rank=32, window_size=8,
      compress_ratios=(0, 4, 0), index_n_heads=4, index_head_dim=16, index_topk=4,
      n_routed_experts=4, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=32, n_hash_layers=1,
      original_seq_len=64, max_seq_len=64, bos_token_id=1, eos_token_id=2,
      expert_dtype=None, dtype="float32", quant_sim=False))

def get_train_config():
  return dict(learning_rate=1e-2, warmup_steps=4, batch_size=4, seq_len=32, loss_chunk=32, remat="none",
              compute_dtype="float32")
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("train")
  (tmp / "small.py").write_text(SMALL_CONFIG)
  e = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
           PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return tmp, e


def _args(tmp, workdir, *extra):
  return [sys.executable, "-m", "launch.train", f"--config={tmp / 'small.py'}", f"--data={BOTCHAN}",
          f"--tokenizer={SP_MODEL}", f"--workdir={workdir}", f"--steps={STEPS}", "--log_every=2", "--save_every=4",
          "--eval_every=12", "--eval_batches=2", *extra]


def _run(args, e, timeout=400):
  return subprocess.run(args, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def uninterrupted(env):
  tmp, e = env
  workdir = tmp / "run_a"
  r = _run(_args(tmp, workdir, f"--export={tmp / 'export'}"), e)
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir, _metrics(workdir)


def test_loss_goes_down_and_outputs_are_written(env, uninterrupted):
  tmp, _ = env
  workdir, lines = uninterrupted
  train = [m for m in lines if "loss" in m]
  assert [m["step"] for m in train] == list(range(2, STEPS + 1, 2))
  assert train[-1]["ce"] < train[0]["ce"] - 0.4, [round(m["ce"], 3) for m in train]
  assert {"loss", "ce", "mtp_ce", "balance", "grad_norm", "learning_rate", "tokens_per_s", "mfu"} <= set(train[-1])
  evals = [m for m in lines if "eval_loss" in m]
  assert [m["step"] for m in evals] == [12, STEPS] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
  assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert steps == [16, 20, 24]                                               # --keep=3

  import numpy as np
  from dsv4_jax.config import load_config
  from dsv4_jax.weights import load_params
  cfg = load_config(str(tmp / "small.py"))
  params = load_params(str(tmp / "export"), cfg)
  assert params["embed"].shape == (1000, 64) and len(params["mtp"]) == 1
  assert np.isfinite(np.asarray(params["head"])).all()


def test_kill_and_resume_equals_uninterrupted(env, uninterrupted):
  tmp, e = env
  _, reference = uninterrupted
  workdir = tmp / "run_b"
  proc = subprocess.Popen(_args(tmp, workdir), cwd=ROOT, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 300
  while not os.path.isdir(workdir / "checkpoints" / str(KILL_AFTER)):     # orbax renames a finished save into place
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(m["step"] for m in _metrics(workdir))
  assert killed_at < STEPS, "the run finished before it could be killed"
  r = _run(_args(tmp, workdir), e)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resuming" in r.stderr
  assert _metrics(workdir) and [(m["step"], m.get("loss"), m.get("eval_loss")) for m in _metrics(workdir)] == \
      [(m["step"], m.get("loss"), m.get("eval_loss")) for m in reference]


def _error(r):
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  lines = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, r.stderr[-3000:]
  return lines[0]


def test_bad_input_fails_before_compute(env, uninterrupted, tmp_path):
  tmp, e = env
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n'
                 '{"messages": "nope"}\n')

  def args(workdir, **flags):
    out = [a for a in _args(tmp, workdir) if a.split("=")[0][2:] not in flags]
    return out + [f"--{k}={v}" for k, v in flags.items()]

  cases = [
      (args(tmp_path / "w1", data=tmp_path / "missing.txt"), "data file .*missing.txt' does not exist"),
      (args(tmp_path / "w2", data=bad, format="chat", tokenizer="", **{"config.vocab_size": 129280}),
       "bad.jsonl:2: expected an object with a non-empty 'messages' list"),
      (args(uninterrupted[0], **{"config.dim": 32}), "holds a run of a different model .*dim: 32 vs 64"),
      (args(tmp_path / "w4", config="demo", checkpoint=tmp / "export"), "does not match config 'demo'"),
  ]
  for a, match in cases:
    line = _error(_run(a, e, timeout=120))
    assert re.search(match, line), line
