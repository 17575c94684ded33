"""MTP speculative decoding (dsv4_jax/speculative.py): greedy output equals plain greedy, the cache rolls back
exactly, and the rejection rule samples the target's distribution."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax import init_params, load_config
from dsv4_jax import head
from dsv4_jax.cache import init_cache
from dsv4_jax.data import shipped_assets
from dsv4_jax.generation import generate
from dsv4_jax.inference import step_streams
from dsv4_jax.sampling import Sampling
from dsv4_jax.speculative import accept
from dsv4_jax.weights import load_params


@pytest.fixture(scope="module")
def demo():
  cfg = load_config("demo")               # window 32, CSA ratio 4, HCA ratio 16, a trained MTP head
  return cfg, load_params(shipped_assets("demo")[0], cfg)


def test_greedy_speculative_equals_plain_greedy(demo):
  """Prompts of 3, 11 and 29 tokens, 40 new tokens: verification crosses the window (32) and every
  compression boundary (4, 16) at each row's own position; the trained MTP head gets drafts accepted. With
  a stop id, each row stops where plain decoding's tokens first hold it. Two drafts per step: the drafting
  loop unrolls once per draft, so one draft runs a subset of this program (num_draft=1 is not a separate
  code path, and its compiles were about a quarter of this file's time)."""
  cfg, params = demo
  k = 2
  rng = np.random.default_rng(0)
  prompts = [[1] + rng.integers(3, cfg.vocab_size, n - 1).tolist() for n in (3, 11, 29)]
  plain = generate(params, cfg, prompts, 40, stop_on_eos=False)
  # generate pads the stop ids to a fixed count: the stop-id run below reuses this run's programs
  spec = generate(params, cfg, prompts, 40, stop_on_eos=False, speculative="mtp", num_draft=k)
  assert spec.tokens == plain.tokens
  t = spec.timings
  assert len(t["accepted"]) == len(t["steps"]) == 3
  assert sum(t["accepted"]) > 0, t                     # some drafts accepted, so both paths ran
  assert sum(t["accepted"]) < k * sum(t["steps"]), t   # and some rejected: roll-backs happened
  # every step emits its accepted drafts + 1 token (the last step's may overshoot max_new_tokens); the first
  # token comes from the prefill
  assert all(s <= 39 <= s + a for s, a in zip(t["steps"], t["accepted"])), t

  stop = plain.tokens[0][5]
  cut = [g[: g.index(stop) + 1] if stop in g else g for g in plain.tokens]
  got = generate(params, cfg, prompts, 40, stop_on_eos=False, stop_ids=[stop], speculative="mtp", num_draft=k)
  assert got.tokens == cut
  assert got.stop_reasons == ["stop_id" if stop in g else "max_new_tokens" for g in plain.tokens]


def test_speculative_sampling_runs_in_the_loop_and_is_seeded(demo):
  """The rejection rule inside the jitted loop (its distribution is checked on `accept` below): every row
  gets its tokens, the same key gives the same tokens, and the counts add up."""
  cfg, params = demo
  sampling = Sampling(temperature=0.8, top_k=50)
  run = lambda seed: generate(params, cfg, [[1, 40, 41], [1, 7]], 16, sampling=sampling, rng=jax.random.key(seed),
                              stop_on_eos=False, speculative="mtp", num_draft=2)
  a, b = run(3), run(3)
  assert a.tokens == b.tokens and [len(t) for t in a.tokens] == [16, 16]
  assert all(0 <= x < cfg.vocab_size for t in a.tokens for x in t)
  assert all(s <= 15 <= s + acc for s, acc in zip(a.timings["steps"], a.timings["accepted"])), a.timings


def test_rollback_leaves_no_trace():
  """Append the next token with k wrong ones after it, roll the wrong ones back, then append the real
  continuation: the logits equal a run that never saw the wrong tokens (the same call with the k slots
  padded). Row 0 rolls back across compression boundaries (4 and 8), row 1 across the window (16)."""
  cfg = dataclasses.replace(load_config("tiny"), dtype="float32")
  params = init_params(cfg, jax.random.key(0))
  k, L = 5, np.array([6, 13])
  rng = np.random.default_rng(1)
  prompt = rng.integers(3, cfg.vocab_size, (2, 13))
  verify = np.concatenate([rng.integers(3, cfg.vocab_size, (2, 1)), rng.integers(3, cfg.vocab_size, (2, k))], 1)
  real = rng.integers(3, cfg.vocab_size, (2, 9))
  # every call as wide as the prompt (padding: never read), all positions out: one compiled program
  verify = np.pad(verify, ((0, 0), (0, 13 - (k + 1))), constant_values=3)
  fn = jax.jit(step_streams, static_argnums=(1, 5, 6))

  def append(cache, toks, n):
    toks = np.pad(toks, ((0, 0), (0, 13 - toks.shape[1])), constant_values=3)
    X, cache = fn(params, cfg, jnp.asarray(toks, jnp.int32), jnp.asarray(n, jnp.int32), cache, 64, True)
    return head.logits(X[:, :9], params["hc_head"], params["norm"], params["head"], cfg), cache

  def run(n_verify, roll_back):
    cache = fn(params, cfg, jnp.asarray(prompt, jnp.int32), jnp.asarray(L, jnp.int32),
               init_cache(cfg, 2, 64, rollback=k), 64, True)[1]
    _, cache = append(cache, verify, np.full(2, n_verify))
    if roll_back:
      cache = dict(cache, length=jnp.asarray(L + 1, jnp.int32))
    return np.asarray(append(cache, real, np.full(2, 9))[0])

  want = run(1, False)                                  # the next token alone, in the same call shape
  np.testing.assert_allclose(run(k + 1, True), want, rtol=0, atol=1e-6)
  assert np.abs(run(k + 1, False) - want).max() > 1e-3            # the wrong tokens, kept, do show


def _accept_many(p_logits, q_logits, n, seed=0):
  """Runs the rejection rule on n independent rows: drafts drawn from q; fixed target logits per position."""
  k, V = q_logits.shape
  key_d, key_a = jax.random.split(jax.random.key(seed))
  drafts = jax.random.categorical(key_d, jnp.broadcast_to(q_logits, (n, k, V)), axis=-1).astype(jnp.int32)
  sampling = Sampling(temperature=1.0)
  a, nxt = accept(drafts, jnp.broadcast_to(q_logits, (n, k, V)), jnp.broadcast_to(p_logits, (n, k + 1, V)),
                  sampling, key_a)
  emitted = jnp.where(jnp.arange(k + 1)[None] < a[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), nxt[:, None])
  return np.asarray(a), np.asarray(emitted)


def test_rejection_sampling_reproduces_the_target_distribution():
  """With context-free targets p_j and drafts from a different q_j, the first emitted token is distributed
  as p_0 and, where a draft was accepted, the second as p_1. n = 200k rows, fixed seed: the standard error
  of each frequency is <= 0.0012, the tolerance 0.006 is 5 of them."""
  p = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05], [0.05, 0.05, 0.3, 0.3, 0.3], [0.2] * 5]))
  q = jnp.log(jnp.array([[0.1, 0.1, 0.2, 0.3, 0.3], [0.3, 0.3, 0.2, 0.1, 0.1]]))
  a, emitted = _accept_many(p, q, 200_000)
  freq0 = np.bincount(emitted[:, 0], minlength=5) / len(a)
  np.testing.assert_allclose(freq0, np.exp(p[0]), atol=6e-3)
  second = emitted[a >= 1, 1]
  np.testing.assert_allclose(np.bincount(second, minlength=5) / len(second), np.exp(p[1]), atol=6e-3)
  # acceptance of draft 1 is sum_x min(p, q) = 0.1 + 0.1 + 0.15 + 0.1 + 0.05
  assert np.mean(a >= 1) == pytest.approx(0.5, abs=6e-3)


def test_greedy_accept_takes_the_matching_prefix():
  V = 6
  target = jax.nn.one_hot(jnp.array([[1, 2, 3, 4], [1, 5, 3, 4], [0, 2, 3, 4]]), V)      # argmax per position
  drafts = jnp.array([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
  a, nxt = accept(drafts, jnp.zeros((3, 3, V)), target, Sampling(), jax.random.key(0))
  assert a.tolist() == [3, 1, 0] and nxt.tolist() == [4, 5, 0]


def test_speculative_arguments_are_checked(demo):
  cfg, params = demo
  with pytest.raises(ValueError, match="only drafter is 'mtp'"):
    generate(params, cfg, [[1, 2]], 4, speculative="ngram")
  with pytest.raises(ValueError, match="num_draft=0"):
    generate(params, cfg, [[1, 2]], 4, speculative="mtp", num_draft=0)
  with pytest.raises(ValueError, match="needs the MTP block"):
    generate(dict(params, mtp=[]), cfg, [[1, 2]], 4, speculative="mtp")
  with pytest.raises(ValueError, match="plus num_draft=3"):
    generate(params, cfg, [[1, 2]], 4, speculative="mtp", num_draft=3, max_seq_len=8)


def test_launch_decode_speculative_reports_acceptance(tmp_path):
  """`launch.decode --speculative=mtp` end to end on the shipped demo model: the same ids as plain decoding
  (the plain run is the library's, in this process) and the acceptance counts in the JSON and on stderr."""
  import json
  import os
  import subprocess
  import sys
  cfg, params = load_config("demo"), None
  out = tmp_path / "out.json"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, "-m", "launch.decode", "--config=demo", "--prompt_ids=1,40,41,42",
                      "--max_new_tokens=12", "--speculative=mtp", "--num_draft=2", f"--output_json={out}"],
                     cwd=root, capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  got = json.loads(out.read_text())
  t = got["timings"]
  assert t["speculative"] == "mtp" and t["num_draft"] == 2 and len(t["accepted"]) == len(t["steps"]) == 1
  assert "speculative mtp, 2 draft(s) per step: accepted" in r.stderr
  params = load_params(shipped_assets("demo")[0], cfg)
  assert got["generated_ids"] == generate(params, cfg, [[1, 40, 41, 42]], 12).tokens
