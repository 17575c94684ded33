"""The training step (dsv4_jax/train.py, dsv4_jax/muon.py): the loss and its gradients against HF transformers
and torch autograd, the MTP and balance terms, the optimizer table, Muon against NumPy, the bias update,
and a loss that goes down."""
import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax import config, moe, muon, qarray, train, transformer
from dsv4_jax.train import TrainConfig, init_train_state, loss_fn, make_optimizer, train_step

# 3 layers (hash SWA, then 2 CSA scanned) + an MTP block: scan, hash and score routing, all small.
SMALL = dict(n_layers=3, compress_ratios=(0, 4, 4, 0), n_hash_layers=1, dim=64, vocab_size=128, n_heads=2,
             head_dim=64, rope_head_dim=32, q_lora_rank=32, o_lora_rank=32, o_groups=2, index_n_heads=4,
             index_head_dim=64, index_topk=4, n_routed_experts=8, n_activated_experts=2, moe_inter_dim=32,
             window_size=8, max_seq_len=64)


@pytest.fixture(scope="module")
def small():
  cfg = config.load_config("tiny", **SMALL)
  assert transformer.layer_plan(cfg).reps == 2
  return cfg, transformer.init_params(cfg, jax.random.key(0))


def _batch(rng, B, S, V, p_mask=0.7):
  mask = (rng.random((B, S)) < p_mask).astype(np.float32)
  return {"tokens": rng.integers(2, V, (B, S)).astype(np.int32), "loss_mask": mask}


def _np_ce(logits, targets, mask):
  """Mean masked cross-entropy in float64."""
  lg = np.asarray(logits, np.float64)
  lse = np.log(np.sum(np.exp(lg - lg.max(-1, keepdims=True)), -1)) + lg.max(-1)
  nll = lse - np.take_along_axis(lg, targets[..., None], -1)[..., 0]
  return float(np.sum(nll * mask) / np.sum(mask))


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = np.max(np.abs(b))
  return float(np.max(np.abs(a - b)) / scale) if scale > 0 else float(np.max(np.abs(a)))


# ---- against HF transformers / torch autograd -----------------------------------------------------

def test_loss_and_grads_match_hf(tmp_path):
  """mtp_weight = balance_weight = 0: the loss is HF's mean masked next-token CE, and the gradient of every
  main-model parameter is torch's (micro-batches of 1 accumulated, so accumulation is checked too)."""
  import torch
  import hf_oracle
  spec = hf_oracle.SPEC_A
  model, hf_cfg = hf_oracle.make_hf_model(spec, hf_oracle.MODEL_SEED)
  hf_oracle.save_official(model, hf_cfg, str(tmp_path / "w"), spec)
  cfg = dataclasses.replace(config.ModelConfig.from_hf_config(tmp_path / "w"), dtype="float32",
                            quant_sim=False)
  from dsv4_jax import load_params
  params = load_params(tmp_path / "w", cfg)

  tokens = hf_oracle.make_tokens(spec, hf_oracle.TOKEN_SEEDS[("A", 37)], B=2, S=37)
  mask = (np.random.default_rng(1).random(tokens.shape) < 0.7).astype(np.float32)
  ids = torch.as_tensor(tokens)
  logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
  nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
  m = torch.as_tensor(mask[:, 1:])
  loss = (nll * m).sum() / m.sum()
  model.zero_grad()
  loss.backward()
  ref_loss = loss.item()
  grad_model = copy.deepcopy(model)          # torch's gradients, written as a checkpoint in official format
  with torch.no_grad():
    for (name, p), (_, g) in zip(model.named_parameters(), grad_model.named_parameters()):
      g.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
  hf_oracle.save_official(grad_model, hf_cfg, str(tmp_path / "g"), spec)
  ref_grads = load_params(tmp_path / "g", cfg)

  tc = TrainConfig(mtp_weight=0.0, balance_weight=0.0, compute_dtype="float32", remat="none", loss_chunk=16,
                   batch_size=2, grad_accum_steps=2)
  batch = {"tokens": tokens.astype(np.int32), "loss_mask": mask}
  state = init_train_state(params, make_optimizer(tc, params), cfg, tc)
  grads, metrics, _ = jax.jit(train.compute_grads)(state, batch)     # loss_fn's loss, per micro-batch
  assert abs(float(metrics["loss"]) - ref_loss) <= 1e-5 * abs(ref_loss)
  assert float(metrics["ce"]) == float(metrics["loss"])
  flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref_grads)[0])
  labels = dict(jax.tree_util.tree_flatten_with_path(train.param_labels(params))[0])
  errs = {jax.tree_util.keystr(path): rel_err(g, flat_ref[path])
          for path, g in jax.tree_util.tree_flatten_with_path(grads)[0] if labels[path] != "frozen"}
  worst = max(errs, key=errs.get)
  print(f"{len(errs)} gradients, worst relative error {errs[worst]:.1e} ({worst})")
  assert errs[worst] <= 1e-4
  assert len(errs) == sum(lab != "frozen" for lab in labels.values()) > 50


# ---- the MTP and balance terms --------------------------------------------------------------------

def test_loss_terms_against_forward(small):
  """ce and mtp_ce from forward()'s logits / mtp_logits (position t predicts t+2), in chunks that do not
  divide the sequence; the total is ce + mtp_weight * mtp_ce + balance_weight * balance."""
  cfg, params = small
  batch = _batch(np.random.default_rng(0), 2, 21, cfg.vocab_size)
  tc = TrainConfig(mtp_weight=0.5, balance_weight=0.01, compute_dtype="float32", remat="none", loss_chunk=8)
  loss, m = jax.jit(loss_fn, static_argnums=(1, 3))(params, cfg, batch, tc)
  out = jax.jit(transformer.forward, static_argnums=1)(params, cfg, batch["tokens"])
  t, mask = batch["tokens"], batch["loss_mask"]
  np.testing.assert_allclose(float(m["ce"]), _np_ce(out.logits[:, :-1], t[:, 1:], mask[:, 1:]), rtol=1e-5)
  np.testing.assert_allclose(float(m["mtp_ce"]), _np_ce(out.mtp_logits[:, :-1], t[:, 2:], mask[:, 2:]),
                             rtol=1e-5)
  assert float(m["tokens"]) == mask[:, 1:].sum()
  # 3 score-routed layers (2 scanned + MTP); a uniform router gives sum_i f_i P_i = 1 per layer
  assert 3.0 <= float(m["balance"]) < 6.0
  np.testing.assert_allclose(float(loss), float(m["ce"] + 0.5 * m["mtp_ce"] + 0.01 * m["balance"]), rtol=1e-6)


def test_balance_statistic_by_hand():
  """MoEStats of one layer against NumPy: f_i = E/(k T) #chosen, P_i = mean_t s_ti / sum_j s_tj over each
  sequence's valid tokens; the load counts every valid (token, slot) pair."""
  cfg = config.load_config("tiny", **SMALL)
  rng = np.random.default_rng(3)
  E, k, D = cfg.n_routed_experts, cfg.n_activated_experts, cfg.dim
  p = {"gate": {"weight": jnp.asarray(rng.standard_normal((E, D)) / 8, jnp.float32),
                "bias": jnp.asarray(rng.standard_normal(E) / 10, jnp.float32)},
       "experts": {w: jnp.asarray(rng.standard_normal(s) / 8, jnp.float32) for w, s in
                   (("w1", (E, 32, D)), ("w2", (E, D, 32)), ("w3", (E, 32, D)))}}
  x = rng.standard_normal((2, 5, D)).astype(np.float32)
  valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  _, st = moe.moe(p, cfg, jnp.asarray(x), jnp.zeros((2, 5), jnp.int32), jnp.asarray(valid), stats=True)

  logits = x.astype(np.float64) @ np.asarray(p["gate"]["weight"], np.float64).T
  s = np.sqrt(np.log1p(np.exp(logits)))
  idx = np.argsort(-(s + np.asarray(p["gate"]["bias"])), -1)[..., :k]
  load, bal = np.zeros(E), []
  for b in range(2):
    T = valid[b].sum()
    counts = np.zeros(E)
    for t in range(T):
      counts[idx[b, t]] += 1
    f = counts * E / (k * T)
    P = (s[b, :T] / s[b, :T].sum(-1, keepdims=True)).mean(0)
    bal.append((f * P).sum())
    load += counts
  np.testing.assert_allclose(np.asarray(st.load), load)
  np.testing.assert_allclose(np.asarray(st.balance), bal, rtol=1e-5)


# ---- the optimizer --------------------------------------------------------------------------------

ADAMW = {"embed", "head", "norm", "attn_norm", "ffn_norm", "q_norm", "kv_norm", "enorm", "hnorm",
         "compressor/norm", "base", "scale", "attn_sink", "ape"}
MUON = {"wq_a", "wq_b", "wkv", "wo_a", "wo_b", "compressor/wkv", "compressor/wgate", "indexer/wq_b",
        "indexer/weights_proj", "gate/weight", "experts/w1", "experts/w2", "experts/w3", "shared_experts/w1",
        "shared_experts/w2", "shared_experts/w3", "e_proj", "h_proj", "fn"}
FROZEN = {"tid2eid", "gate/bias"}


def test_optimizer_table(small):
  """Every parameter of the small model (stacked, hash, MTP) goes where docs/architecture.md §6 says."""
  cfg, params = small
  labels = train.param_labels(params)
  seen = {"muon": set(), "adamw": set(), "frozen": set()}
  for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]:
    parts = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    names = {parts[-1], "/".join(parts[-2:])}
    expect = [lab for lab, table in (("adamw", ADAMW), ("muon", MUON), ("frozen", FROZEN)) if names & table]
    assert expect == [label], ("/".join(parts), label, expect)
    seen[label] |= names & (ADAMW | MUON | FROZEN)
  assert seen == {"adamw": ADAMW, "muon": MUON, "frozen": FROZEN}
  frozen = train.param_labels(params, freeze=("^embed$", "^layers/stack/"))
  assert frozen["embed"] == "frozen" and frozen["head"] == "adamw"
  assert set(jax.tree.leaves(frozen["layers"]["stack"])) == {"frozen"}


def _np_newton_schulz(G):
  X = G / np.linalg.norm(G)
  tall = X.shape[0] > X.shape[1]
  X = X.T if tall else X
  for a, b, c in [(3.4445, -4.7750, 2.0315)] * 8 + [(2.0, -1.5, 0.5)] * 2:
    A = X @ X.T
    X = a * X + (b * A + c * A @ A) @ X
  return X.T if tall else X


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_muon_matches_numpy(shape):
  """Two Muon steps on one matrix: Nesterov on M_t = mu M_{t-1} + G_t, the report's 8 + 2 Newton-Schulz steps,
  RMS 0.18 * sqrt(max(n, m)), W <- W (1 - lr wd) - lr O."""
  rng = np.random.default_rng(0)
  W = rng.standard_normal(shape)
  G1, G2 = rng.standard_normal(shape), rng.standard_normal(shape)
  lr, wd, mu = 0.01, 0.1, 0.95
  tx = muon.muon(lr, mu, wd)
  w = jnp.asarray(W, jnp.float32)
  state = tx.init(w)
  for G in (G1, G2):
    u, state = tx.update(jnp.asarray(G, jnp.float32), state, w)
    w = w + u
  ref = W.copy()
  M = np.zeros(shape)
  for G in (G1, G2):
    M = mu * M + G
    O = _np_newton_schulz(mu * M + G) * np.sqrt(max(shape)) * 0.18
    ref = ref * (1 - lr * wd) - lr * O
  assert rel_err(np.asarray(w) - W, ref - W) < 1e-4
  s = np.linalg.svd(_np_newton_schulz(G1), compute_uv=False)
  assert 0.6 < s.min() and s.max() < 1.25                        # the hybrid schedule's spread


def test_muon_per_expert():
  """A [layers, experts, n, m] stack is layers * experts matrices, each orthogonalised alone."""
  rng = np.random.default_rng(1)
  G = jnp.asarray(rng.standard_normal((2, 3, 6, 10)), jnp.float32)
  G = G * jnp.asarray([1.0, 10.0, 0.1])[None, :, None, None]     # scales differ per expert
  tx = muon.scale_by_muon()
  stacked, _ = tx.update(G, tx.init(G))
  for i in range(2):
    for e in range(3):
      one, _ = tx.update(G[i, e], tx.init(G[i, e]))
      np.testing.assert_allclose(np.asarray(stacked[i, e]), np.asarray(one), rtol=1e-5, atol=1e-6)
  rms = np.sqrt(np.mean(np.square(np.asarray(stacked)), axis=(-2, -1)))
  np.testing.assert_allclose(rms, 0.18, rtol=0.05)               # each matrix's update has RMS 0.18


def test_bias_update_sign():
  """bias += gamma * sign(mean(load) - load): over-loaded experts' bias falls, under-loaded rises, per layer
  of a scanned stack; other leaves (hash tables, weights) do not move."""
  gate = {"bias": jnp.zeros((2, 4)), "weight": jnp.ones((2, 4, 3))}
  params = {"layers": {"stack": [{"ffn": {"gate": gate}}]},
            "mtp": [{"ffn": {"gate": {"bias": jnp.ones(4)}}}],
            "prefix": [{"ffn": {"gate": {"tid2eid": jnp.ones((5, 2), jnp.int32)}}}]}
  loads = {"layers/stack/0": jnp.asarray([[9.0, 1.0, 3.0, 3.0], [0.0, 0.0, 0.0, 8.0]]),
           "mtp/0": jnp.asarray([1.0, 2.0, 3.0, 6.0])}
  new = train.update_router_bias(params, loads, 0.001)
  np.testing.assert_allclose(new["layers"]["stack"][0]["ffn"]["gate"]["bias"],
                             [[-0.001, 0.001, 0.001, 0.001], [0.001, 0.001, 0.001, -0.001]])
  np.testing.assert_allclose(new["mtp"][0]["ffn"]["gate"]["bias"], 1 + np.array([0.001, 0.001, 0.0, -0.001]))
  assert new["layers"]["stack"][0]["ffn"]["gate"]["weight"] is gate["weight"]
  assert new["prefix"][0]["ffn"]["gate"]["tid2eid"] is params["prefix"][0]["ffn"]["gate"]["tid2eid"]


# ---- state, step, errors --------------------------------------------------------------------------

def test_init_state_dequantises_and_keeps_int_tables(small):
  cfg, params = small
  rng = np.random.default_rng(0)
  E, F, D = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim
  q = qarray.QArray(values=jnp.asarray(rng.integers(0, 256, (E, F, D // 2), dtype=np.uint8)),
                    scales=jnp.asarray(rng.integers(120, 124, (E, F, D // 32), dtype=np.uint8)),
                    block=qarray.FP4_BLOCK, fmt="fp4")
  p = jax.tree.map(lambda x: x, params)
  p["layers"]["prefix"][0]["ffn"]["experts"]["w1"] = q
  tc = TrainConfig(mtp_weight=0.3)
  tx = make_optimizer(tc, p)
  state = init_train_state(p, tx, cfg, tc)
  w1 = state.params["layers"]["prefix"][0]["ffn"]["experts"]["w1"]
  assert w1.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(w1), np.asarray(q.dequantize(jnp.float32)))
  assert state.params["layers"]["prefix"][0]["ffn"]["gate"]["tid2eid"].dtype == jnp.int32
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}
  assert int(state.step) == 0


def test_bad_input_is_a_clear_error(small):
  cfg, params = small
  tc = TrainConfig(compute_dtype="float32")
  good = _batch(np.random.default_rng(0), 2, 8, cfg.vocab_size)
  with pytest.raises(ValueError, match="'tokens' and 'loss_mask'"):
    loss_fn(params, cfg, {"tokens": good["tokens"]}, tc)
  with pytest.raises(ValueError, match="same shape"):
    loss_fn(params, cfg, {"tokens": good["tokens"], "loss_mask": good["loss_mask"][:, :4]}, tc)
  with pytest.raises(ValueError, match="max_seq_len=64"):
    loss_fn(params, cfg, _batch(np.random.default_rng(0), 1, 65, cfg.vocab_size), tc)
  with pytest.raises(ValueError, match="at least 2"):
    loss_fn(params, cfg, _batch(np.random.default_rng(0), 1, 1, cfg.vocab_size), tc)
  with pytest.raises(ValueError, match="grad_accum_steps"):
    TrainConfig(batch_size=3, grad_accum_steps=2)
  with pytest.raises(ValueError, match="remat"):
    TrainConfig(remat="some")
  with pytest.raises(ValueError, match="Unknown TrainConfig field"):
    TrainConfig.from_dict({"learning_rat": 1.0})
  assert TrainConfig.from_dict(train.train_config_dict(seq_len=64)) == TrainConfig(seq_len=64)
  with pytest.raises(ValueError, match="no MTP block"):
    init_train_state(dict(params, mtp=[]), None, cfg, TrainConfig(mtp_weight=0.3))


def test_train_step_loss_goes_down(small):
  """Default bf16 compute, fp32 master, remat: 20 steps on one small batch more than halve the loss; the
  routers' bias moves by exactly +-gamma (or 0) per step, the hash layer has none."""
  cfg, params = small
  tc = TrainConfig(learning_rate=3e-3, warmup_steps=2, total_steps=20, batch_size=4, seq_len=32,
                   loss_chunk=16)
  state = init_train_state(params, make_optimizer(tc, params), cfg, tc)
  batch = _batch(np.random.default_rng(0), 4, 32, cfg.vocab_size, p_mask=0.9)
  bias0 = np.asarray(state.params["layers"]["stack"][0]["ffn"]["gate"]["bias"])
  assert "bias" not in state.params["layers"]["prefix"][0]["ffn"]["gate"]
  losses = []
  for i in range(tc.total_steps):
    state, m = train_step(state, batch)
    losses.append(float(m["loss"]))
    if i == 0:
      delta = np.asarray(state.params["layers"]["stack"][0]["ffn"]["gate"]["bias"]) - bias0
      assert np.all(np.isin(np.round(delta / tc.bias_update_gamma, 3), [-1.0, 0.0, 1.0])) and np.any(delta)
  assert int(state.step) == tc.total_steps
  assert all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses
