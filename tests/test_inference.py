"""Cached inference reproduces the uncached forward pass; generation; bad input (launch.decode end to end:
test_inference_launch.py)."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax import (Sampling, abstract_params, cache_size, decode_step, forward, generate, init_cache, init_params,
                      layer_plan, load_config, prefill, relayout_layers)
from dsv4_jax.cache import decoded

PROMPT_LENGTHS = [1, 3, 4, 5, 7, 8, 9, 127, 128, 129, 150]

CONFIGS = {
    # Flash-like recipe: window 16, HCA ratio 8, 3 hash layers, top-4 indexer.
    "tiny": load_config("tiny"),
    # Pro-like pattern (HCA first), the real 128-token window, HCA ratio 16, top-6.
    "tiny_pro": dataclasses.replace(load_config("tiny"), name="tiny_pro", window_size=128, index_topk=6,
                                    compress_ratios=(16, 16, 4, 16, 4, 16, 4, 0), n_hash_layers=2),
}
_fwd = jax.jit(forward, static_argnums=1)


def _rel(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
  cfg = CONFIGS[request.param]
  return cfg, init_params(cfg, jax.random.key(1))


def test_cached_decode_equals_forward(model):
  """A batch of prompts of lengths 1..150 (one padded prefill), then 12 decode steps: every step's logits
  equal `forward` on the whole sequence at that position."""
  cfg, params = model
  B, steps = len(PROMPT_LENGTHS), 12
  total = max(PROMPT_LENGTHS) + steps
  seqs = np.asarray(jax.random.randint(jax.random.key(2), (B, total), 0, cfg.vocab_size), np.int32)
  lengths = np.array(PROMPT_LENGTHS, np.int32)
  tokens = np.where(np.arange(total - steps)[None] < lengths[:, None], seqs[:, : total - steps], 0)
  # the forward oracle for each row: its prompt followed by its 12 decode tokens, left-aligned
  rows = np.stack([np.pad(seqs[b, : lengths[b] + steps], (0, total - lengths[b] - steps)) for b in range(B)])
  full = np.asarray(_fwd(params, cfg, rows).logits)

  cache = init_cache(cfg, B, total + 4)
  logits, cache = prefill(params, cfg, tokens, lengths, cache)
  errs = [_rel(np.asarray(logits), full[np.arange(B), lengths - 1])]
  for s in range(steps):
    nxt = seqs[np.arange(B), lengths + s]
    logits, cache = decode_step(params, cfg, nxt, cache)
    errs.append(_rel(np.asarray(logits), full[np.arange(B), lengths + s]))
  print(cfg.name, "max relative error per step", [f"{e:.1e}" for e in errs])
  assert max(errs) < 1e-5
  assert np.asarray(cache["length"]).tolist() == (lengths + steps).tolist()


def test_unrolled_layers_compute_what_the_scanned_group_does():
  """`scan_layers=False` unrolls every layer: parameters relaid out by `relayout_layers` give the scanned
  model's logits in `forward`, prefill and decode, and the same cache contents; the relayout round-trips
  exactly and refuses configs whose layers differ."""
  cfg = load_config("tiny")
  ucfg = dataclasses.replace(cfg, scan_layers=False)
  assert layer_plan(cfg).reps >= 2 and layer_plan(ucfg).reps == 0 and len(layer_plan(ucfg).prefix) == cfg.n_layers
  params = init_params(cfg, jax.random.key(1))
  uparams = {**params, "layers": relayout_layers(params["layers"], cfg, ucfg)}
  shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
  assert shapes(uparams) == shapes(abstract_params(ucfg))
  back = relayout_layers(uparams["layers"], ucfg, cfg)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params["layers"])))
  with pytest.raises(ValueError, match="different layers"):
    relayout_layers(params["layers"], cfg, dataclasses.replace(cfg, n_hash_layers=cfg.n_hash_layers + 1))

  tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, 40), 0, cfg.vocab_size), np.int32)
  np.testing.assert_allclose(np.asarray(_fwd(uparams, ucfg, tokens).logits),
                             np.asarray(_fwd(params, cfg, tokens).logits), rtol=1e-5, atol=1e-5)
  lengths = np.array([40, 29], np.int32)
  out = {}
  for c, p in ((cfg, params), (ucfg, uparams)):
    logits, cache = prefill(p, c, tokens, lengths, init_cache(c, 2, 64))
    steps = [np.asarray(logits)]
    for s in range(3):
      logits, cache = decode_step(p, c, tokens[:, s], cache)
      steps.append(np.asarray(logits))
    out[c.scan_layers] = steps, cache
  for a, b in zip(out[True][0], out[False][0]):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
  relaid = relayout_layers(out[True][1]["layers"], cfg, ucfg)
  assert jax.tree.structure(relaid) == jax.tree.structure(out[False][1]["layers"])
  diff = [int(np.sum(np.asarray(a) != np.asarray(b)))
          for a, b in zip(jax.tree.leaves(relaid), jax.tree.leaves(out[False][1]["layers"]))]
  print("differing cache elements per leaf", diff)
  assert sum(diff) == 0


def test_indexer_selects_fewer_than_visible_in_these_runs(model):
  cfg, _ = model
  assert (max(PROMPT_LENGTHS) + 1) // 4 > cfg.index_topk     # later queries see more entries than top-k


def test_chunked_prefill_equals_one_prefill_and_rows_alone(model):
  """Chunks of 5, 7 and 30 tokens (boundaries off the compression ratios) fill the same cache as one prefill
  of 42; rows of different lengths in one batch equal each row alone. Every chunk is passed right-padded to
  the 42 columns of the whole prompt with its real length in `lengths` (one compiled program for all the
  batch-2 calls)."""
  cfg, params = model
  toks = np.asarray(jax.random.randint(jax.random.key(3), (2, 42), 0, cfg.vocab_size), np.int32)
  one, c1 = prefill(params, cfg, toks, np.array([42, 42]), init_cache(cfg, 2, 64))
  c2 = init_cache(cfg, 2, 64)
  for a, b in [(0, 5), (5, 12), (12, 42)]:
    chunk = np.pad(toks[:, a:b], ((0, 0), (0, 42 - (b - a))), constant_values=7)   # padding: never read
    chunked, c2 = prefill(params, cfg, chunk, np.array([b - a, b - a]), c2)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(one), rtol=1e-5, atol=1e-5)
  for x, y in zip(jax.tree.leaves(decoded(c1)), jax.tree.leaves(decoded(c2))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)
  # different lengths in one batch == each row alone
  mixed, _ = prefill(params, cfg, toks, np.array([42, 17]), init_cache(cfg, 2, 64))
  alone, _ = prefill(params, cfg, toks[1:, :17], np.array([17]), init_cache(cfg, 1, 64))
  np.testing.assert_allclose(np.asarray(mixed[1]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(mixed[0]), np.asarray(one[0]), rtol=1e-5, atol=1e-5)


def test_new_prefill_after_short_prompt_does_not_leak_state():
  """The reference leaks compressor state into a fresh prompt shorter than 4 tokens; we reset per sequence.
  (The 3-token prompt is passed right-padded to the 9 columns of the other call: one compiled program.)"""
  cfg = CONFIGS["tiny"]
  params = init_params(cfg, jax.random.key(4))
  toks = np.asarray(jax.random.randint(jax.random.key(5), (1, 12), 0, cfg.vocab_size), np.int32)
  short = np.pad(toks[:, :3], ((0, 0), (0, 6)), constant_values=7)
  fresh, _ = prefill(params, cfg, short, np.array([3]), init_cache(cfg, 1, 32))
  used, cache = prefill(params, cfg, toks[:, 3:], np.array([9]), init_cache(cfg, 1, 32))
  cache = dict(cache, length=jnp.zeros_like(cache["length"]))           # reuse the buffers for a new prompt
  again, _ = prefill(params, cfg, short, np.array([3]), cache)
  np.testing.assert_allclose(np.asarray(again), np.asarray(fresh), rtol=1e-6, atol=1e-6)


def test_quant_sim_cached_equals_uncached():
  """quant_sim on every layer kind (a hash-routed sliding-window layer, HCA and CSA under scan; tiny cut to
  5 layers: its compiles, which are this test's time, are a third smaller): cached == uncached."""
  cfg = dataclasses.replace(CONFIGS["tiny"], quant_sim=True, n_layers=5, compress_ratios=(0, 8, 4, 8, 4, 0),
                            n_hash_layers=1)
  params = init_params(cfg, jax.random.key(6))
  seq = np.asarray(jax.random.randint(jax.random.key(7), (1, 40), 0, cfg.vocab_size), np.int32)
  full = np.asarray(_fwd(params, cfg, seq).logits)[0]
  logits, cache = prefill(params, cfg, seq[:, :30], np.array([30]), init_cache(cfg, 1, 48))
  errs = [_rel(np.asarray(logits)[0], full[29])]
  for t in range(30, 40):
    logits, cache = decode_step(params, cfg, seq[:, t], cache)
    errs.append(_rel(np.asarray(logits)[0], full[t]))
  assert max(errs) < 1e-5, errs


def test_cache_size_matches_performance_doc():
  flash, pro = load_config("flash"), load_config("pro")
  assert cache_size(flash, "bfloat16").bytes_per_token == 6880
  assert cache_size(pro, "bfloat16").bytes_per_token == 9848
  assert cache_size(flash, "paper").bytes_per_token == 3450
  assert cache_size(pro, "paper").bytes_per_token == 4939.5
  assert cache_size(flash, "paper").scale_bytes_per_token > 0
  # constant per sequence: windows (incl. MTP) 5.5 MiB + compressor states 11.6 MiB for Flash in bf16
  assert round(cache_size(flash, "bfloat16").bytes_per_sequence / 2 ** 20, 1) == 17.1


def test_generate_is_greedy_seeded_and_stops():
  """Every call has the same prompts and cache capacity, so all of them share one compiled prefill (the
  decode loops differ by sampling only: generate pads the stop ids to a fixed count, so the stop-id run below
  reuses the greedy run's programs)."""
  cfg = CONFIGS["tiny"]
  params = init_params(cfg, jax.random.key(8))
  prompts = [[5, 17, 300], [1, 2, 3, 4, 5, 6, 7]]
  r = generate(params, cfg, prompts, 10)
  # greedy = argmax of forward; both rows in one forward call, right-padded (causal: padding changes nothing)
  seqs = [p + g for p, g in zip(r.prompts, r.tokens)]
  lg = np.asarray(_fwd(params, cfg, np.array([q + [0] * (17 - len(q)) for q in seqs])).logits)
  for b, (p, g) in enumerate(zip(r.prompts, r.tokens)):
    assert lg[b, len(p) - 1:len(p) + len(g) - 1].argmax(-1).tolist() == g
  s = Sampling(temperature=0.9, top_k=20, top_p=0.9)
  a = generate(params, cfg, prompts, 10, sampling=s, rng=jax.random.key(3))
  b = generate(params, cfg, prompts, 10, sampling=s, rng=jax.random.key(3))
  c = generate(params, cfg, prompts, 10, sampling=s, rng=jax.random.key(4))
  assert a.tokens == b.tokens and a.tokens != c.tokens
  stop = r.tokens[0][3]
  st = generate(params, cfg, prompts, 10, stop_ids=[stop])
  assert st.tokens[0] == r.tokens[0][: r.tokens[0].index(stop) + 1] and st.stop_reasons[0] == "stop_id"
  assert st.tokens == [g[: g.index(stop) + 1] if stop in g else g for g in r.tokens]
  assert st.stop_reasons == ["stop_id" if stop in g else "max_new_tokens" for g in r.tokens]
  assert r.stop_reasons == ["max_new_tokens"] * 2
  assert {"compile_prefill_s", "prefill_s", "compile_decode_s", "decode_s", "decode_tokens_per_s"} <= set(r.timings)
  assert r.timings["prefill_tokens"] == 10


def test_sampling_filters():
  from dsv4_jax.sampling import sample
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.split(jax.random.key(0), 1)[0]
  top2 = np.asarray(sample(logits, keys, Sampling(1.0, top_k=2)))
  assert set(top2.tolist()) == {0, 1}
  nucleus = np.asarray(sample(logits, keys, Sampling(1.0, top_p=0.7)))     # 0.5 + 0.3 covers 0.7
  assert set(nucleus.tolist()) == {0, 1}
  full = np.asarray(sample(logits, keys, Sampling(1.0)))
  assert set(full.tolist()) == {0, 1, 2, 3} and abs((full == 0).mean() - 0.5) < 0.05
  with pytest.raises(ValueError, match="top_p"):
    Sampling(1.0, top_p=0.0)


def test_bad_input_stops_before_compute():
  cfg = CONFIGS["tiny"]
  params = init_params(cfg, jax.random.key(9))
  with pytest.raises(ValueError, match="outside the vocabulary"):
    generate(params, cfg, [[1, cfg.vocab_size]], 4)
  with pytest.raises(ValueError, match="empty"):
    generate(params, cfg, [[1, 2], []], 4)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(params, cfg, [[1, 2]], 0)
  with pytest.raises(ValueError, match="needs 12 positions but the cache holds 8"):
    generate(params, cfg, [[1, 2]], 10, max_seq_len=8)
  cache = init_cache(cfg, 1, 8)
  with pytest.raises(ValueError, match="exceed the cache's max_seq_len=8"):
    prefill(params, cfg, np.ones((1, 9), np.int32), np.array([9]), cache)
  with pytest.raises(ValueError, match="does not match the cache's batch of 1"):
    prefill(params, cfg, np.ones((2, 3), np.int32), np.array([3, 3]), cache)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    prefill(params, cfg, np.full((1, 3), -1, np.int32), np.array([3]), cache)


def test_checkpoint_config_mismatch_is_named(tmp_path):
  from dsv4_jax.runtime import check_checkpoint_config
  (tmp_path / "config.json").write_text(json.dumps({
      "model_type": "deepseek_v4", "vocab_size": 512, "hidden_size": 256, "num_hidden_layers": 7,
      "num_attention_heads": 4, "head_dim": 96, "qk_rope_head_dim": 32, "q_lora_rank": 64, "o_groups": 2,
      "o_lora_rank": 64, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
      "compress_ratios": [0, 0, 4, 8, 4, 8, 4, 0]}))
  with pytest.raises(ValueError, match="dim: config 128 vs checkpoint 256"):
    check_checkpoint_config(str(tmp_path), CONFIGS["tiny"])


def test_paper_cache_format_is_lossless_under_quant_sim_and_smaller():
  """The paper's storage (fp8 + scales, bf16 rope, fp4 indexer keys): with quant_sim, cached decode equals
  the uncached forward with the same simulation. (Same seeds as test_quant_sim_cached_equals_uncached: fp4
  indexer keys make exact score ties common, and a tie resolved differently by the two summation orders
  changes the top-k; those seeds have none.)"""
  cfg = dataclasses.replace(CONFIGS["tiny"], quant_sim=True)
  params = init_params(cfg, jax.random.key(6))
  seq = np.asarray(jax.random.randint(jax.random.key(7), (1, 40), 0, cfg.vocab_size), np.int32)
  full = np.asarray(_fwd(params, cfg, seq).logits)[0]
  for lane_dense in (True, False):                 # the XLA ops' default geometry, and the kernels' whole rows
    cache = init_cache(cfg, 1, 48, dtype="paper", lane_dense=lane_dense)
    assert cache["layers"]["prefix"][2]["comp"].layout.fmt == "fp8"
    assert cache["layers"]["prefix"][2]["idx"].layout.fmt == "fp4"
    logits, cache = prefill(params, cfg, seq[:, :30], np.array([30]), cache)
    errs = [_rel(np.asarray(logits)[0], full[29])]
    for t in range(30, 40):
      logits, cache = decode_step(params, cfg, seq[:, t], cache)
      errs.append(_rel(np.asarray(logits)[0], full[t]))
    assert max(errs) < 1e-5, (lane_dense, errs)
  # the entries that grow with context take what cache_size says (bf16 model: bf16 RoPE dims), up to the
  # rows that round a lane-dense store to whole (8, 128) tiles of all its planes (none for bf16 here)
  from dsv4_jax import kv_format
  from dsv4_jax.kv_format import Layout
  bf16 = dataclasses.replace(cfg, dtype="bfloat16")
  for storage in ("paper", "bfloat16"):
    for lane_dense in (False, True):
      c = init_cache(bf16, 1, 4096, dtype=storage, lane_dense=lane_dense)
      layers = jax.tree.leaves(c["layers"], is_leaf=lambda d: isinstance(d, dict) and "win" in d)
      stores = [layer[name] for layer in layers for name in ("comp", "idx") if name in layer]
      grown = sum(a.nbytes for s in stores for a in s.arrays)
      size = cache_size(bf16, storage, lane_dense)
      want = 4096 * (size.bytes_per_token + size.scale_bytes_per_token)
      rounding = sum(np.prod(s.words.shape[:-2]) * 8 * kv_format.align(s.geometry) *
                     kv_format.row_bytes(s.layout, s.planes) for s in stores)   # per (layer, sequence)
      assert want <= grown < want + rounding if storage == "paper" else grown == want
      if storage == "paper":
        assert [s.tail is not None for s in stores] == [s.layout.fmt == "fp8" and lane_dense for s in stores]
  flash = load_config("flash")
  assert cache_size(flash, "paper", lane_dense=True).bytes_per_token == cache_size(flash, "paper").bytes_per_token
  for lay, per_row in ((Layout("fp8", 512, 64), 512 + 128), (Layout("fp4", 128), 512 / 7)):
    assert lay.nbytes == {"fp8": 584, "fp4": 68}[lay.fmt]
    assert kv_format.row_bytes(lay, kv_format.lane_dense(lay)) == per_row
    assert all(p.line % 128 == 0 for p in kv_format.lane_dense(lay))


def test_kv_formats_round_trip_exactly_on_their_grids():
  """Every format is rows of 32-bit words; values on the format's grid come back bit for bit."""
  from dsv4_jax import quant
  from dsv4_jax.kv_format import Layout
  x = jax.random.normal(jax.random.key(12), (3, 5, 96)) * 4
  x8 = quant.kv_fp8_sim(x, 32)                         # what quant_sim stores: exactly representable
  fp8 = Layout("fp8", 96, 32, "float32")
  w = fp8.encode(x8)
  assert w.dtype == jnp.uint32 and w.shape == (3, 5, fp8.words) and fp8.words == (64 + 4 + 32 * 4) // 4
  np.testing.assert_array_equal(np.asarray(fp8.decode(w, jnp.float32)), np.asarray(x8))
  x4 = quant.fp4_act_quant(x[..., :64], 32)
  fp4 = Layout("fp4", 64)
  assert fp4.words == (32 + 4) // 4
  np.testing.assert_array_equal(np.asarray(fp4.decode(fp4.encode(x4), jnp.float32)), np.asarray(x4))
  for fmt in ("bfloat16", "float32"):
    lay = Layout(fmt, 96)
    xb = x.astype(fmt)
    np.testing.assert_array_equal(np.asarray(lay.decode(lay.encode(xb), fmt)), np.asarray(xb))
  flash = load_config("flash")
  from dsv4_jax.cache import layouts
  main, idx = layouts(flash, "paper")
  assert (main.nbytes, idx.nbytes) == (584, 68)        # 448 fp8 + 7 scales (+1 pad) + 64 bf16; 64 + 4


def test_config_too_big_fails_before_allocating():
  from dsv4_jax.runtime import check_fits
  with pytest.raises(MemoryError, match=r"config 'flash' in bfloat16 needs 5\d\d\.\d GB"):
    check_fits(load_config("flash"), batch=1, max_seq_len=4096)
