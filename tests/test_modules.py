"""Unit tests of what the HF comparison cannot check: visibility, Sinkhorn, the indexer's selection,
the quantisation round-trips, causality of the main and MTP logits, and the sharding plumbing."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsv4_jax import abstract_params, forward, init_params, load_config, param_specs
from dsv4_jax import attention, compressor, mhc, ops, quant, sharding
from dsv4_jax import params as params_lib


@pytest.fixture(scope="module")
def tiny():
  cfg = load_config("tiny")
  return cfg, init_params(cfg, jax.random.key(0))


@pytest.mark.parametrize("m", [4, 128])
def test_visibility_rule(m):
  t = np.arange(301)
  n = np.asarray(compressor.visible_count(jnp.asarray(t), m))             # entries 0..n-1 are visible
  for ti in t:
    expected = [i for i in range(301 // m + 1) if (i + 1) * m - 1 <= ti]     # window i complete at t
    assert list(range(n[ti])) == expected
  # examples of docs/architecture.md §2.9
  if m == 4:
    assert compressor.visible_count(jnp.array([2, 3, 7]), 4).tolist() == [0, 1, 2]


def test_window_indices():
  idx = np.asarray(attention.window_indices(jnp.arange(6)[None], jnp.zeros(1, jnp.int32), 4, 0))[0]
  assert idx[0].tolist() == [-1, -1, -1, 0]
  assert idx[5].tolist() == [2, 3, 4, 5]
  # a cached call starting at position 4 with a 4-slot ring: positions 2, 3 from ring slots 2, 3, then rows
  # 4 + (p - 4) of this call's KV
  idx = np.asarray(attention.window_indices(jnp.array([[4, 5]]), jnp.array([4]), 4, 4))[0]
  assert idx[1].tolist() == [2, 3, 4, 5] and idx[0].tolist() == [1, 2, 3, 4]


def test_sinkhorn_is_doubly_stochastic():
  logits = jax.random.normal(jax.random.key(1), (64, 4, 4)) * 3
  m = np.asarray(mhc.sinkhorn(logits, 20, 1e-6))
  np.testing.assert_allclose(m.sum(-2), 1.0, atol=1e-5)     # ends on a column normalisation
  np.testing.assert_allclose(m.sum(-1), 1.0, atol=5e-2)     # rows: 20 iterations, not fully converged
  assert (m > 0).all()
  # the reference's loop, written out in numpy float64
  x = np.exp(np.asarray(logits, np.float64) - np.asarray(logits, np.float64).max(-1, keepdims=True))
  r = x / x.sum(-1, keepdims=True) + 1e-6
  r = r / (r.sum(-2, keepdims=True) + 1e-6)
  for _ in range(19):
    r = r / (r.sum(-1, keepdims=True) + 1e-6)
    r = r / (r.sum(-2, keepdims=True) + 1e-6)
  np.testing.assert_allclose(m, r, atol=1e-5)


def test_indexer_selects_exactly_the_visible_set_when_it_fits():
  B, S, C, k = 2, 40, 10, 12                     # at most 10 visible entries <= k
  scores = jax.random.normal(jax.random.key(2), (B, S, C))
  pos = jnp.broadcast_to(jnp.arange(S), (B, S))
  sel = np.asarray(ops.select_topk(scores, compressor.visible_count(pos, 4), k))
  for t in range(S):
    chosen = sorted(i for i in sel[0, t] if i >= 0)
    assert chosen == list(range(min((t + 1) // 4, C)))


def test_indexer_picks_the_largest_visible_scores():
  B, S, C, k = 1, 64, 16, 3
  scores = jax.random.normal(jax.random.key(3), (B, S, C))
  sel = np.asarray(ops.select_topk(scores, compressor.visible_count(jnp.arange(S)[None], 4), k))
  s = np.asarray(scores)
  for t in range(S):
    n_vis = (t + 1) // 4
    want = set(np.argsort(-s[0, t, :n_vis])[:k].tolist())
    assert set(i for i in sel[0, t] if i >= 0) == want


def test_pow2_ceil_exact():
  v = jnp.array([1.0, 2.0, 3.0, 0.75, 2.0 ** -20, 448.0, 449.0])
  assert quant.pow2_ceil(v).tolist() == [1.0, 2.0, 4.0, 1.0, 2.0 ** -20, 512.0, 512.0]
  # the ends of the normal range; below it (denormals), the smallest normal power of two
  v = jnp.array([2.0 ** -126, 1.5 * 2.0 ** -126, 1.5 * 2.0 ** 126, 2.0 ** 127, 2.0 ** -130], jnp.float32)
  assert quant.pow2_ceil(v).tolist() == [2.0 ** -126, 2.0 ** -125, 2.0 ** 127, 2.0 ** 127, 2.0 ** -126]
  # against log2 on many values, under jit as the callers run it
  x = np.abs(np.random.default_rng(0).standard_normal(4096)).astype(np.float32) * np.float32(2.0) ** np.arange(-60, 68, 1 / 32, dtype=np.float32)
  np.testing.assert_array_equal(jax.jit(quant.pow2_ceil)(jnp.asarray(x)), 2.0 ** np.ceil(np.log2(x.astype(np.float64))))


def test_act_quant_hand_values():
  # block amax 896 -> scale pow2ceil(896/448) = 2; 3.3/2 = 1.65 -> e4m3 1.625 -> 3.25; 0.01/2 = .005 -> e4m3
  x = jnp.array([[896.0, 3.3, -0.01, 0.0]])
  y = np.asarray(quant.act_quant(x, block=4))
  e4m3_005 = float(np.float32(0.005).astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
  np.testing.assert_array_equal(y, [[896.0, 3.25, -2 * e4m3_005, 0.0]])
  # two blocks get independent scales. [1000, 1.1]: scale pow2ceil(1000/448) = 4; 1000/4 = 250 -> e4m3 256
  # (step 16 in [128, 256)) -> 1024; 1.1/4 = .275 -> e4m3 .28125 (step 1/32 in [.25, .5)) -> 1.125.
  # [1.1, 1.1]: scale pow2ceil(1.1/448) = 2^-8; 281.6 -> 288 (step 32 in [256, 448]) -> 1.125.
  y2 = np.asarray(quant.act_quant(jnp.array([[1000.0, 1.1, 1.1, 1.1]]), block=2))
  np.testing.assert_array_equal(y2, [[1024.0, 1.125, 1.125, 1.125]])


def test_fp4_hand_values():
  # amax 24 -> scale 4: 5/4 = 1.25 ties to even (1.0) -> 4; 1.3/4 = .325 -> .5 -> 2; 7/4 = 1.75 ties to 2 -> 8
  x = jnp.array([[24.0, 5.0, 1.3, 7.0, -0.9, 0.2, 14.0, -10.0]])
  y = np.asarray(quant.fp4_act_quant(x, block=8))
  np.testing.assert_array_equal(y, [[24.0, 4.0, 2.0, 8.0, -0.0, 0.0, 16.0, -8.0]])
  grid = np.array([0, .5, 1, 1.5, 2, 3, 4, 6], np.float32)
  r = np.random.default_rng(0).uniform(-6, 6, 1000).astype(np.float32)
  got = np.asarray(quant.round_e2m1(jnp.asarray(r)))
  nearest = np.sign(r) * grid[np.argmin(np.abs(np.abs(r)[:, None] - grid), axis=1)]
  np.testing.assert_array_equal(got, nearest)          # no exact ties in random draws


def test_e2m1_decode_is_the_table_bit_for_bit():
  got = np.asarray(quant.e2m1_to_f32(jnp.arange(16, dtype=jnp.uint8)))
  np.testing.assert_array_equal(got.view(np.uint32), np.array(quant.E2M1_VALUES, np.float32).view(np.uint32))


def test_bf16_dequantisation_equals_fp32_rounded_for_every_byte_and_scale():
  """QArray.dequantize in bf16 computes in bf16 (no fp32 copy of the weight); it must equal the fp32
  dequantisation (bit-exact against the released checkpoint's, test_checkpoint_convert) rounded to bf16, for
  every fp8 byte and every fp4 byte against every e8m0 scale byte, underflow included (a NaN may differ in its
  sign bit)."""
  from dsv4_jax.qarray import QArray
  scales = jnp.asarray(np.arange(256, dtype=np.uint8)[:, None])
  every_byte = np.tile(np.arange(256, dtype=np.uint8)[None, :], (256, 1))
  for w in (QArray(jnp.asarray(every_byte.view(ml_dtypes.float8_e4m3fn)), scales, (1, 256), "fp8"),
            QArray(jnp.asarray(every_byte), scales, (1, 512), "fp4")):
    got = np.asarray(w.dequantize(jnp.bfloat16))
    want = np.asarray(w.dequantize(jnp.float32)).astype(ml_dtypes.bfloat16)
    assert got.dtype == want.dtype and got.shape == want.shape == (256, 256 if w.fmt == "fp8" else 512)
    nan = np.isnan(want.astype(np.float32))
    np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan, err_msg=w.fmt)
    np.testing.assert_array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan], err_msg=w.fmt)  # -0 too
    if w.fmt == "fp4":      # the planar operands (moe's expert matmuls): the same weights, nibble-major order
      from dsv4_jax.qarray import planar_operands
      xp, planar = planar_operands(jnp.arange(512.0)[None], w, jnp.bfloat16)
      assert np.asarray(xp)[0].tolist() == list(range(0, 512, 2)) + list(range(1, 512, 2))
      perm = np.concatenate([got[:, 0::2], got[:, 1::2]], -1)
      pn = np.isnan(perm.astype(np.float32))
      np.testing.assert_array_equal(np.isnan(np.asarray(planar).astype(np.float32)), pn)
      np.testing.assert_array_equal(np.asarray(planar).view(np.uint16)[~pn], perm.view(np.uint16)[~pn])


def test_hadamard_is_orthonormal_and_sylvester():
  h = quant.hadamard_matrix(128)
  np.testing.assert_allclose(h @ h.T, np.eye(128), atol=1e-6)
  signs = np.sign(h)
  assert (signs[0] == 1).all() and signs[1, :4].tolist() == [1, -1, 1, -1]      # Sylvester order
  assert signs[2, :4].tolist() == [1, 1, -1, -1]
  np.testing.assert_allclose(np.abs(h), 128 ** -0.5, rtol=1e-7)


def test_kv_fp8_sim_leaves_rope_dims():
  kv = jax.random.normal(jax.random.key(4), (2, 3, 128)).astype(jnp.bfloat16)
  out = quant.kv_fp8_sim(kv, 64)
  np.testing.assert_array_equal(np.asarray(out[..., 64:]), np.asarray(kv[..., 64:]))
  assert not np.array_equal(np.asarray(out[..., :64]), np.asarray(kv[..., :64]))


def test_compressed_entries_are_causal(tiny):
  cfg, params = tiny
  p = params["layers"]["prefix"][2]["attn"]["compressor"]       # layer 2: CSA
  x = jax.random.normal(jax.random.key(5), (1, 24, cfg.dim))
  e1 = compressor.compress(p, cfg, x, 4)
  x2 = x.at[:, 13].add(1.0)                                     # token 13 lies in window 3
  e2 = compressor.compress(p, cfg, x2, 4)
  diff = np.abs(np.asarray(e1 - e2)).max(-1)[0]
  assert (diff[:3] == 0).all() and diff[3] > 0 and diff[4] > 0  # window 3, and window 4 via the overlap
  assert (diff[5:] == 0).all()


def test_logits_are_causal_and_mtp_shapes(tiny):
  cfg, params = tiny
  S, j = 30, 17
  tokens = jax.random.randint(jax.random.key(6), (2, S), 0, cfg.vocab_size)
  f = jax.jit(forward, static_argnums=1)
  a = f(params, cfg, tokens)
  b = f(params, cfg, tokens.at[:, j].set((tokens[:, j] + 1) % cfg.vocab_size))
  assert a.logits.shape == (2, S, cfg.vocab_size) and a.mtp_logits.shape == (2, S - 1, cfg.vocab_size)
  assert a.logits.dtype == jnp.float32 and a.mtp_logits.dtype == jnp.float32
  d_main = np.abs(np.asarray(a.logits - b.logits)).max((0, 2))
  d_mtp = np.abs(np.asarray(a.mtp_logits - b.mtp_logits)).max((0, 2))
  assert (d_main[:j] == 0).all() and d_main[j] > 0
  assert (d_mtp[: j - 1] == 0).all() and d_mtp[j - 1] > 0       # MTP position i sees token i+1


# A float64 numpy model of the reference's quantisation-aware rounding for one CSA attention sublayer: the
# per-128 fp8 activation round trip before every fp8 linear, fp8 KV simulation of the window and compressed
# entries, Hadamard + fp4 of the indexer queries and keys. Written from the spec, not from dsv4_jax.quant:
# e4m3 from frexp, e2m1 by nearest grid point with ties to the even code.

_E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _np_pow2ceil(v):
  m, e = np.frexp(v)                                     # v = m 2^e, m in [0.5, 1)
  return np.ldexp(1.0, np.where(m == 0.5, e - 1, e))


def _np_e4m3(v):
  """Round to nearest even onto float8 e4m3fn (|v| <= 448): 3 mantissa bits, subnormals below 2^-6."""
  a = np.abs(v)
  step = np.ldexp(1.0, np.maximum(np.frexp(a)[1] - 1, -6) - 3)
  return np.sign(v) * np.round(a / step) * step


def _np_e2m1(v):
  """The nearest of {0, .5, 1, 1.5, 2, 3, 4, 6} (sign kept); a tie goes to the even code (mantissa bit 0)."""
  d = np.abs(np.abs(v)[..., None] - _E2M1_GRID)
  near = d == d.min(-1, keepdims=True)
  code = np.where(near.sum(-1) > 1, np.argmax(near & (np.arange(8) % 2 == 0), -1), np.argmax(near, -1))
  return np.sign(v) * _E2M1_GRID[code]


def _np_blockwise(x, block, fmt):
  """Per `block` values of the last dim: power-of-two scale pow2ceil(amax / max), round, rescale."""
  n = x.shape[-1]
  xb = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, (-n) % block)]).reshape(*x.shape[:-1], -1, block)
  amax = np.abs(xb).max(-1, keepdims=True)
  if fmt == "e4m3":
    s = _np_pow2ceil(np.maximum(amax, 1e-4) / 448.0)
    q = _np_e4m3(np.clip(xb / s, -448, 448))
  else:
    s = _np_pow2ceil(np.maximum(amax, 6.0 * 2.0 ** -126) / 6.0)
    q = _np_e2m1(np.clip(xb / s, -6, 6))
  return (q * s).reshape(*x.shape[:-1], -1)[..., :n]


def _np_hadamard_fp4(x):
  h = np.ones((1, 1))
  while h.shape[0] < x.shape[-1]:
    h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)              # Sylvester order
  return _np_blockwise(x @ (h / np.sqrt(h.shape[0])), 32, "e2m1")


def _np_kv_fp8(x, r):
  return np.concatenate([_np_blockwise(x[..., :-r], 64, "e4m3"), x[..., -r:]], -1)


def _np_fp8_linear(x, w):
  return _np_blockwise(x, 128, "e4m3") @ w.T


def _np_rms(x, w, eps):
  return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def _np_rope(x, pos, cfg, inverse=False):
  """Interleaved RoPE of the last r dims with the compressed-layer table; pos [S] -> x [B,S,(H,)K]."""
  from dsv4_jax.rope import inv_freq
  f = inv_freq(cfg, True)
  ang = (np.asarray(pos, np.float32)[:, None] * f).astype(np.float64)       # fp32 angles, as the reference
  cos, sin = np.cos(ang), np.sin(ang) * (-1.0 if inverse else 1.0)
  for _ in range(x.ndim - 3):
    cos, sin = cos[:, None], sin[:, None]
  r = 2 * f.shape[0]
  re, im = x[..., -r::2], x[..., -r + 1::2]
  rot = np.stack([re * cos - im * sin, re * sin + im * cos], -1).reshape(*x.shape[:-1], r)
  return np.concatenate([x[..., :-r], rot], -1)


def _np_compress(p, cfg, x, is_indexer):
  """Overlapping (m = 4) gated pooling of the complete windows, norm, RoPE at i*m, quantisation."""
  m, n = 4, x.shape[1] // 4
  C = x[:, :n * m] @ p["wkv"].T
  Z = x[:, :n * m] @ p["wgate"].T + p["ape"][np.arange(n * m) % m]
  c = C.shape[-1] // 2
  entries = []
  for i in range(n):
    cur = slice(i * m, i * m + m)
    Cs, Zs = C[:, cur, c:], Z[:, cur, c:]
    if i:                                                              # first halves of the previous window
      Cs = np.concatenate([C[:, cur.start - m:cur.start, :c], Cs], 1)
      Zs = np.concatenate([Z[:, cur.start - m:cur.start, :c], Zs], 1)
    e = np.exp(Zs - Zs.max(1, keepdims=True))
    entries.append((e / e.sum(1, keepdims=True) * Cs).sum(1))
  E = _np_rope(_np_rms(np.stack(entries, 1), p["norm"], cfg.norm_eps), np.arange(n) * m, cfg)
  return _np_hadamard_fp4(E) if is_indexer else _np_kv_fp8(E, cfg.rope_head_dim)


def _np_csa_attention(p, cfg, x):
  """x [B,S,D] float64 -> (output [B,S,D], the smallest relative gap between the indexer's k-th and
  k+1-th score)."""
  B, S, _ = x.shape
  H, K, r, eps, nI, cI = (cfg.n_heads, cfg.head_dim, cfg.rope_head_dim, cfg.norm_eps, cfg.index_n_heads,
                          cfg.index_head_dim)
  pos = np.arange(S)
  qr = _np_rms(_np_fp8_linear(x, p["wq_a"]), p["q_norm"], eps)
  q = _np_fp8_linear(qr, p["wq_b"]).reshape(B, S, H, K)
  q = _np_rope(q / np.sqrt(np.mean(q * q, -1, keepdims=True) + eps), pos, cfg)
  kv = _np_kv_fp8(_np_rope(_np_rms(_np_fp8_linear(x, p["wkv"]), p["kv_norm"], eps), pos, cfg), r)
  comp = _np_compress(p["compressor"], cfg, x, False)
  keys = _np_compress(p["indexer"]["compressor"], cfg, x, True)
  qI = _np_hadamard_fp4(_np_rope(_np_fp8_linear(qr, p["indexer"]["wq_b"]).reshape(B, S, nI, cI), pos, cfg))
  wI = x @ p["indexer"]["weights_proj"].T * cI ** -0.5 * nI ** -0.5
  scores = np.einsum("bshc,bsh->bsc", np.maximum(np.einsum("bshd,bcd->bshc", qI, keys), 0), wI)
  o, gap, k = np.zeros((B, S, H, K)), np.inf, cfg.index_topk
  for b in range(B):
    for t in range(S):
      vis = scores[b, t, :(t + 1) // 4]
      top = np.argsort(-vis, kind="stable")[:k]
      if len(vis) > k:
        srt = np.sort(vis)[::-1]
        gap = min(gap, (srt[k - 1] - srt[k]) / np.abs(srt).max())
      rows = np.concatenate([kv[b, max(0, t - cfg.window_size + 1):t + 1], comp[b, top]])
      z = q[b, t] @ rows.T * cfg.softmax_scale                        # [H, n]
      mx = z.max(-1, keepdims=True)
      e = np.exp(z - mx)
      o[b, t] = e @ rows / (e.sum(-1, keepdims=True) + np.exp(p["attn_sink"][:, None] - mx))
  o = _np_rope(o, pos, cfg, inverse=True).reshape(B, S, cfg.o_groups, -1)
  o = np.einsum("bsgi,gri->bsgr", o, p["wo_a"].reshape(cfg.o_groups, cfg.o_lora_rank, -1)).reshape(B, S, -1)
  return _np_fp8_linear(o, p["wo_b"]), gap


def test_quant_sim_matches_a_numpy_model_of_the_reference_rounding():
  """HF's DeepseekV4 has no quantisation simulation (docs/architecture.md §7), so the fp32 quant_sim numerics
  of a CSA attention sublayer are checked against the float64 numpy model above. Widths are chosen so that
  blocks are split and partial (x: 2 x 128, qr: 1.5 x 128, KV: 2 x 64 non-RoPE dims, indexer: 2 x 32), and
  every other 64-channel block of x, q_norm, kv_norm and the compressor norm is scaled by 2^-12, so that
  per-block scales (and e4m3 subnormals) matter: a wrong block size shows as a 1e-4..1e-2 error. The
  simulation itself moves the output by ~25%; the two implementations agree to fp32 rounding (seed chosen
  with no rounding boundary or indexer top-k boundary within fp32 noise; the top-k margin is checked)."""
  cfg = dataclasses.replace(load_config("tiny"), dim=256, head_dim=160, q_lora_rank=192, o_lora_rank=96,
                            quant_sim=True)
  p = init_params(cfg, jax.random.key(0))["layers"]["prefix"][2]["attn"]                # layer 2: CSA
  split = lambda n: np.where(np.arange(n) // 64 % 2, 2.0 ** -12, 1.0).astype(np.float32)
  p = dict(p, q_norm=p["q_norm"] * split(cfg.q_lora_rank), kv_norm=p["kv_norm"] * split(cfg.head_dim),
           compressor=dict(p["compressor"], norm=p["compressor"]["norm"] * split(cfg.head_dim)))
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 40, cfg.dim)), np.float32) * split(cfg.dim)
  f = jax.jit(attention.attention, static_argnums=(1, 2))
  got = np.asarray(f(p, cfg, 4, jnp.asarray(x))[0], np.float64)          # (out, cache) without a cache
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  want, gap = _np_csa_attention(p64, cfg, x.astype(np.float64))
  assert gap > 1e-3                                                      # the indexer's choice is unambiguous
  scale = np.abs(want).max()
  assert np.abs(got - want).max() < 5e-6 * scale
  plain = np.asarray(f(p, dataclasses.replace(cfg, quant_sim=False), 4, jnp.asarray(x))[0], np.float64)
  assert np.abs(plain - want).max() > 0.05 * scale                       # the simulation does change it


def test_bad_tokens_raise(tiny):
  cfg, params = tiny
  with pytest.raises(ValueError, match="outside the vocabulary"):
    forward(params, cfg, np.array([[1, cfg.vocab_size]]))
  with pytest.raises(ValueError, match="outside the vocabulary"):
    forward(params, cfg, np.array([[-1, 2]]))
  with pytest.raises(ValueError, match="batch, seq"):
    forward(params, cfg, np.array([1, 2]))


def test_every_parameter_has_logical_axes_and_init_matches_specs(tiny):
  cfg, params = tiny
  specs = param_specs(cfg)
  params_lib.check_tree(params, specs)
  rules = dict(sharding.AXIS_RULES)
  for spec in jax.tree.leaves(specs, is_leaf=params_lib.is_spec):
    assert all(a is None or a in rules or a == "embed_out" for a in spec.axes), spec
  abstract = abstract_params(cfg)
  assert jax.tree.structure(abstract) == jax.tree.structure(params)


def test_forward_under_a_mesh(tiny):
  cfg, params = tiny
  mesh = sharding.make_mesh()
  # the shape of test_logits_are_causal_and_mtp_shapes: `ref` is its compiled program
  tokens = jax.random.randint(jax.random.key(8), (2, 30), 0, cfg.vocab_size)
  ref = jax.jit(forward, static_argnums=1)(params, cfg, tokens).logits
  with sharding.use_mesh(mesh):
    got = jax.jit(forward, static_argnums=1)(params, cfg, tokens).logits
    spec = sharding.logical_to_spec(("batch", "seq", "act_heads", None), mesh)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
  assert spec == jax.sharding.PartitionSpec(None, None, None, None)    # size-1 axes are dropped


def test_query_chunking_changes_nothing(tiny):
  """Attention and the indexer run `query_chunk` queries at a time (bounded memory); results are the same.
  (30 tokens, chunks of 7: the last one ragged; the unchunked forward is test_logits_are_causal's program.)"""
  from dsv4_jax import init_cache, prefill
  cfg, params = tiny
  small = dataclasses.replace(cfg, query_chunk=7)
  tokens = np.asarray(jax.random.randint(jax.random.key(9), (2, 30), 0, cfg.vocab_size), np.int32)
  f = jax.jit(forward, static_argnums=1)
  a, b = f(params, cfg, tokens), f(params, small, tokens)
  np.testing.assert_allclose(np.asarray(b.logits), np.asarray(a.logits), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(b.mtp_logits), np.asarray(a.mtp_logits), rtol=1e-5, atol=1e-5)
  lens = np.array([30, 23])
  la, _ = prefill(params, cfg, tokens, lens, init_cache(cfg, 2, 48))
  lb, _ = prefill(params, small, tokens, lens, init_cache(small, 2, 48))
  np.testing.assert_allclose(np.asarray(lb), np.asarray(la), rtol=1e-5, atol=1e-5)


def test_moe_gathered_and_grouped_paths_agree(tiny):
  """Decode-sized batches read only the chosen experts; larger ones use grouped matmuls: same outputs."""
  from dsv4_jax import moe
  cfg, params = tiny
  p = params["layers"]["prefix"][0]["ffn"]
  x = jax.random.normal(jax.random.key(10), (3, cfg.dim))             # 3 tokens x 2 slots < 8 experts
  idx, w = moe.route(p["gate"], cfg, x, jnp.array([1, 2, 3]))
  few = moe.routed_experts(p["experts"], cfg, x, idx, w)
  many = moe.routed_experts(p["experts"], cfg, jnp.tile(x, (4, 1)), jnp.tile(idx, (4, 1)), jnp.tile(w, (4, 1)))
  np.testing.assert_allclose(np.asarray(many[:3]), np.asarray(few), rtol=1e-5, atol=1e-5)


def test_stacked_experts_read_one_repetition():
  """`moe.Stacked` (a scanned group's experts under expert parallelism): `get()` is the repetition's slice, and
  `moe.take_experts(tree, ids, rep)` its experts ids, bit for bit, for wide leaves (read expert by expert)
  and narrow ones (the e8m0 scales, gathered), under jit with a traced repetition."""
  from dsv4_jax import moe, qarray
  rng = np.random.default_rng(1)
  tree = {"w1": qarray.QArray(values=jnp.asarray(rng.integers(0, 256, (3, 5, 4, 128), dtype=np.uint8)),
                              scales=jnp.asarray(rng.integers(0, 256, (3, 5, 4, 8), dtype=np.uint8)),
                              block=qarray.FP4_BLOCK, fmt="fp4"),
          "w2": jnp.asarray(rng.standard_normal((3, 5, 2, 130)), jnp.float32)}
  ids = jnp.array([4, 0, 4, 1], jnp.int32)
  got = jax.jit(lambda t, r, i: (moe.Stacked(t, r).get(), moe.take_experts(t, i, r)))(tree, jnp.int32(2), ids)
  want = (jax.tree.map(lambda a: a[2], tree), jax.tree.map(lambda a: a[2][ids], tree))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def test_moe_paths_on_a_stacked_repetition_equal_its_slice(tiny, monkeypatch):
  """Both MoE paths given a scanned group's experts as `moe.Stacked` (the decode path taking each group of
  chosen experts from the stack inside its loop, the grouped path slicing each group of experts from it) give
  the outputs of the repetition's slice, bit for bit: plain and packed fp4 experts."""
  from dsv4_jax import moe, qarray
  cfg, params = tiny
  monkeypatch.setattr(moe, "DECODE_GROUP", 2)                          # 6 chosen experts: 3 groups
  ffn = params["layers"]["stack"][0]["ffn"]
  reps, E, F, D = ffn["experts"]["w1"].shape
  rng = np.random.default_rng(3)
  fp4 = lambda *shape: qarray.QArray(
      values=jnp.asarray(rng.integers(0, 256, shape[:-1] + (shape[-1] // 2,), dtype=np.uint8)),
      scales=jnp.asarray(rng.integers(120, 127, shape[:-1] + (shape[-1] // 32,), dtype=np.uint8)),
      block=qarray.FP4_BLOCK, fmt="fp4")
  packed = {"w1": fp4(reps, E, F, D), "w3": fp4(reps, E, F, D), "w2": fp4(reps, E, D, F)}
  run = jax.jit(lambda e, x, i, w: moe.routed_experts(e, cfg, x, i, w))
  for T in (3, 40):                                                    # 3 x 2 slots < 8 experts: decode path
    x = jax.random.normal(jax.random.key(T), (T, cfg.dim))
    idx, w = moe.route(jax.tree.map(lambda a: a[1], ffn["gate"]), cfg, x, jnp.arange(T))
    assert len(np.unique(np.asarray(idx))) > 2
    for experts in (ffn["experts"], packed):
      got = run(moe.Stacked(experts, jnp.int32(1)), x, idx, w)
      want = run(jax.tree.map(lambda a: a[1], experts), x, idx, w)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_moe_paths_on_quantised_fp4_experts(tiny):
  """Routed experts held as packed fp4 QArrays give the same outputs as their exact dequantisation, on
  both the gathered (decode) and the grouped path (to fp32 rounding of the largest output: the QArray
  path sums each dot product in planar order, qarray.planar_operands)."""
  from dsv4_jax import moe, qarray
  cfg, params = tiny
  p = params["layers"]["prefix"][0]["ffn"]
  rng = np.random.default_rng(0)

  def fp4(shape):
    E, O, I = shape
    return qarray.QArray(values=jnp.asarray(rng.integers(0, 256, (E, O, I // 2), dtype=np.uint8)),
                         scales=jnp.asarray(rng.integers(120, 127, (E, O, I // 32), dtype=np.uint8)),
                         block=qarray.FP4_BLOCK, fmt="fp4")

  q = {name: fp4(p["experts"][name].shape) for name in ("w1", "w2", "w3")}
  d = {name: qarray.dense(v, jnp.float32) for name, v in q.items()}
  for T in (3, 40):                                                    # 3 x 2 slots < 8 experts: gathered
    x = jax.random.normal(jax.random.key(T), (T, cfg.dim))
    idx, w = moe.route(p["gate"], cfg, x, jnp.arange(T))
    got, want = np.asarray(moe.routed_experts(q, cfg, x, idx, w)), np.asarray(moe.routed_experts(d, cfg, x, idx, w))
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max(), (T, np.abs(got - want).max(), np.abs(want).max())
