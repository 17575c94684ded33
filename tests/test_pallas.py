"""The Pallas kernels (pallas_kernels/) against their plain-jnp references in dsv4_jax.ops, in interpret mode
on the CPU: both backends' programs (TPU Mosaic, GPU Triton), every KV storage format, -1 anywhere in an
index row, duplicates, ragged visibility, bf16 and fp32, Flash's and Pro's head counts and dims at small
lengths; the TPU DMA kernels also under the TPU simulator with race detection; the Triton kernels lowered
for CUDA; and the model end to end with attn_impl="pallas_*" against "xla".

Real Mosaic compilation without a TPU is in test_pallas_aot.py."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax import (Sampling, decode_step, forward, generate, init_cache, init_params, kv_format, load_config,
                      ops, prefill)
from dsv4_jax.kv_format import Layout
from pallas_kernels import indexer as ix
from pallas_kernels import rowcodec
from pallas_kernels import sparse_attention as sa
from pallas_kernels.platform import KernelUnsupported

BACKENDS = ("tpu", "gpu")
# (heads, head dim, rope dim): tiny, Flash (64 heads), Pro (128 heads); all with K = 512 for the real ones
SHAPES = {"tiny": (4, 96, 32), "flash": (64, 512, 64), "pro": (128, 512, 64)}


def _formats(K, r, dtype):
  """The stores a model builds: its compute dtype, fp32, and the paper's fp8 + bf16 (or fp32) RoPE."""
  name = jnp.dtype(dtype).name
  return [Layout(name, K), Layout("float32", K), Layout("fp8", K, r, name)]


def _rand(key, shape, dtype=jnp.float32, scale=1.0):
  return (scale * jax.random.normal(jax.random.key(key), shape)).astype(dtype)


def _index_rows(B, S, T, N, seed):
  """Random ids in [0, N) with -1 at the front, in the middle and everywhere, and duplicates."""
  idx = np.array(jax.random.randint(jax.random.key(seed), (B, S, T), 0, N))
  idx[0, 0, :] = -1                                          # all masked: the sink alone, output 0
  if S > 1:
    idx[0, 1, : T // 2] = -1                                 # front
  if S > 2:
    idx[-1, 2, T // 3: T // 3 + 2] = -1                      # middle
    idx[-1, 2, -1] = idx[-1, 2, 0]                           # a duplicate
  return jnp.asarray(idx, jnp.int32)


def _close(out, ref, dtype):
  """Equal up to summation order (fp32) or one bf16 rounding, relative to the largest value."""
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  tol = (2e-6 if dtype == jnp.float32 else 1e-2) * max(1.0, float(np.max(np.abs(ref))))
  np.testing.assert_allclose(out, ref, rtol=0, atol=tol)


# (shape, dtype, formats, sources, backends, q_blocks): each format, source and backend at the tiny shape; the
# real head counts and dims in the formats they are stored in. q_block 2 is the prefill kernel (blocks of
# queries; S = 3 leaves a padded query in the last block), 1 the per-query (decode) kernel. (Interpret-mode
# compiles dominate CI time.)
ATTENTION_CASES = [
    ("tiny", jnp.float32, ("fp8",), ("csa", "hca"), BACKENDS, (2, 1)),
    ("tiny", jnp.float32, ("float32",), ("values",), BACKENDS, (2,)),
    ("tiny", jnp.bfloat16, ("bfloat16",), ("csa", "hca"), BACKENDS, (2,)),
    ("flash", jnp.bfloat16, ("fp8",), ("csa", "hca"), BACKENDS, (2,)),
    ("pro", jnp.float32, ("fp8_rows", "float32"), ("csa",), ("tpu",), (2,)),
]
# "fp8": the cache's lane-dense geometry (kv_format.lane_dense: tiny's [values | scales] rows 7 to a line and
# RoPE rows 8 or 4 to a line; Flash's one 128-word line and RoPE rows 4 to a line); "fp8_rows": whole rows.


@pytest.mark.parametrize("shape,dtype,formats,sources,backends,q_blocks", ATTENTION_CASES)
def test_sparse_attention_equals_reference(shape, dtype, formats, sources, backends, q_blocks):
  H, K, r = SHAPES[shape]
  B, S, N, W, T, C = 2, 3, 45, 11, 37, 70                   # odd lengths, not multiples of any block
  q = _rand(1, (B, S, H, K), dtype)
  sink = _rand(2, (H,))
  win = ops.Rows(_rand(3, (B, N, K), dtype))
  widx = _index_rows(B, S, W, N, 4)
  entries = _rand(5, (B, C, K))
  cidx = _index_rows(B, S, T, C - 3, 6)
  vis = jnp.array([[0, 5, 67], [33, 1, 64]], jnp.int32)
  for fmt in formats:
    lay = Layout("fp8", K, r, jnp.dtype(dtype).name) if fmt.startswith("fp8") else Layout(fmt, K)
    stacked = jnp.stack([lay.encode(entries * 2), lay.encode(entries)])                   # a scanned group
    store = kv_format.from_rows(stacked, lay, kv_format.lane_dense(lay) if fmt == "fp8" else ())
    assert (store.tail is not None) == (fmt == "fp8")
    for source in sources:
      if source == "values":                                  # forward: entries as values, not a store
        comp, kw = ops.Rows(entries.astype(dtype)), dict(comp_idx=cidx)
      else:
        comp = ops.Rows.of(store, jnp.int32(1), C - 3)
        kw = dict(comp_idx=cidx) if source == "csa" else dict(comp_visible=vis)
      ref = ops.sparse_attention_ref(q, sink, 0.07, win, widx, comp, **kw)
      for backend in backends:
        for q_block in q_blocks:
          out = sa.sparse_attention(q, sink, 0.07, win, widx, comp, backend=backend, block_rows=16,
                                    q_block=q_block, **kw)
          _close(out, ref, dtype)
          assert np.asarray(out)[0, 0].tolist() == np.zeros((H, K)).tolist()     # nothing visible: exactly 0


def test_sparse_attention_all_masked_is_zero_not_nan():
  H, K = 8, 64
  q = _rand(1, (1, 2, H, K))
  win = ops.Rows(_rand(2, (1, 5, K)))
  widx = jnp.full((1, 2, 4), -1, jnp.int32)
  for backend in BACKENDS:
    out = sa.sparse_attention(q, _rand(3, (H,)), 0.1, win, widx, ops.Rows(_rand(4, (1, 6, K))),
                              comp_visible=jnp.zeros((1, 2), jnp.int32), backend=backend)
    assert np.asarray(out).tolist() == np.zeros((1, 2, H, K)).tolist()


@pytest.mark.parametrize("dtype,nI,cI,formats", [
    (jnp.float32, 16, 64, ("float32", "bfloat16", "fp4", "values")),     # tiny's indexer
    (jnp.bfloat16, 64, 128, ("fp4", "bfloat16")),                        # Flash's and Pro's
])
def test_indexer_equals_reference(dtype, nI, cI, formats):
  """Each format, and the element-wise ones also packed lane-dense (`kv_format.lane_pack`: 2 or 4 keys per
  line here), fp4 in the lane-dense geometry (7 or 14 keys of 17 or 9 words a 128-word line, the rest
  padding), with 61 of 72 rows scored (a partial last line): kernels == reference; the reference reads a
  packed store exactly as the unpacked one."""
  B, S, n_keys = 2, 3, 61
  qI, w = _rand(1, (B, S, nI, cI), dtype), _rand(2, (B, S, nI), dtype)
  keys = _rand(3, (B, 72, cI))
  vis = jnp.array([[0, 5, 61], [33, 1, 60]], jnp.int32)
  cases = []
  for fmt in formats:
    if fmt == "values":
      cases.append(ops.Rows(keys[:, :n_keys].astype(dtype)))
      continue
    lay = Layout(fmt, cI)
    words = jnp.stack([lay.encode(keys * 3), lay.encode(keys)])
    cases.append(ops.Rows(words, lay, jnp.int32(1), n_keys))
    as_rows = cases[-1]
    P = kv_format.lane_pack(lay)
    if P > 1:
      packed = ops.Rows(kv_format.pack_lines(words, P), lay, jnp.int32(1), n_keys, P)
      np.testing.assert_array_equal(ops.index_scores_ref(qI, w, packed), ops.index_scores_ref(qI, w, cases[-1]))
      cases.append(packed)
    if fmt == "fp4":                  # lane-dense: 14 (cI 64: 9 words) or 7 (cI 128: 17 words) keys a line
      dense = ops.Rows.of(kv_format.from_rows(words, lay, kv_format.lane_dense(lay)), jnp.int32(1), n_keys)
      assert dense.geometry[0].pack == 128 // lay.words and dense.data.shape[-1] == 128
      # (not bit-equal: it scores 70 keys, whole lines, where the rows store scores 61, and XLA:CPU's fp32
      # dot rounds by shape)
      _close(ops.index_scores_ref(qI, w, dense), ops.index_scores_ref(qI, w, cases[-1]), dtype)
      cases.append(dense)
    if kv_format.key_tiles(lay):      # the cache's geometry: tiles of 128 keys across the lanes, 1024 a block
      tiles = ops.Rows.of(kv_format.from_rows(words, lay, kv_format.key_tiles(lay)), jnp.int32(1), n_keys)
      assert tiles.capacity == 1024 and tiles.data.shape[-2:] == (8 * lay.words, 128)
      # the same decoded values (Layout.decode_tiles), keys minor: equal up to the fp32 dot's summation order
      _close(ops.index_scores_ref(qI, w, tiles), ops.index_scores_ref(qI, w, as_rows), dtype)
      cases.append(tiles)
  assert any(r.pack > 1 for r in cases) == any(f in ("float32", "bfloat16") for f in formats)
  assert any(r.tiled for r in cases)
  for rows in cases:
    ref_scores = ops.index_scores_ref(qI, w, rows)
    ref = ops.indexer_topk_ref(qI, w, rows, vis, 8)
    # a store of several keys a line: scored line by line (virtual heads, S < decode_from) or decoded once
    slots = rows.geometry[0].pack if rows.layout is not None and not rows.tiled else 1
    for backend in BACKENDS:
      for decode_from in (ix.DECODE_FROM, 1) if slots > 1 else (ix.DECODE_FROM,):
        kw = dict(backend=backend, block_keys=16, decode_from=decode_from)
        assert ix.slot_scores(qI, w, rows, **kw).shape[2] == (slots if decode_from > S else 1)
        _close(ix.index_scores(qI, w, rows, **kw), ref_scores, dtype)
        np.testing.assert_array_equal(ix.indexer_topk(qI, w, rows, vis, 8, **kw), ref)


def test_keys_decoded_once_equal_the_stores_decode(monkeypatch):
  """What a prefill call scores instead of lines (ix._decoded): the first 47 keys of a lane-dense fp4 store
  (9-word keys, 14 a line: 4 lines read) decoded in blocks of 3 lines, the second re-read from the end,
  equal the store's own decode in the compute dtype, bit for bit."""
  monkeypatch.setattr(ix, "KEY_BLOCK", 42)
  lay = Layout("fp4", 64)
  keys = _rand(3, (2, 60, 64))
  store = kv_format.from_rows(jnp.stack([lay.encode(keys * 3), lay.encode(keys)]), lay, kv_format.lane_dense(lay))
  for dtype in (jnp.float32, jnp.bfloat16):
    got = ix._decoded(ops.Rows.of(store, jnp.int32(1), 47), dtype)
    assert got.layout is None and got.data.shape == (2, 47, 64) and got.data.dtype == dtype
    np.testing.assert_array_equal(got.data, lay.decode(lay.encode(keys), dtype)[:, :47])


def test_slot_by_slot_selection_is_select_topk():
  """The Pallas indexer's top-k from slot-major scores (P keys a line) == ops.select_topk over key order, ids,
  order and ties: scores from 3 values (ties everywhere), a partial last line, few and no keys visible, k above
  and below the number of keys."""
  rng = np.random.default_rng(0)
  for P, rows, k in ((2, 61, 8), (7, 61, 8), (7, 20, 32), (4, 64, 64), (2, 9, 1)):
    L = -(-rows // P)
    scores = jnp.asarray(rng.integers(0, 3, (2, 3, P, L)).astype(np.float32)).astype(jnp.bfloat16)
    vis = jnp.array([[0, 5, rows], [rows - 1, 1, rows]], jnp.int32)
    key_order = scores.transpose(0, 1, 3, 2).reshape(2, 3, L * P)[..., :rows]
    np.testing.assert_array_equal(ix.select_topk_by_slot(scores, vis, k, rows), ops.select_topk(key_order, vis, k))


def test_rowcodec_parts_rebuild_every_format():
  """Every stored format decodes, part by part in the kernels' element-wise form, to what kv_format decodes,
  and q . k taken part by part equals the plain dot product."""
  for lay in (Layout("float32", 64), Layout("bfloat16", 64), Layout("fp8", 512, 64), Layout("fp8", 512, 64, "float32"),
              Layout("fp4", 128)):
    x = _rand(1, (5, lay.width), scale=3.0)
    words = lay.encode(x)
    c = rowcodec.codec(lay)
    parts = rowcodec.decode_parts(words, c)
    np.testing.assert_array_equal(rowcodec.merge_parts(jnp.stack(parts, 1), c, lay.words), lay.decode(words, jnp.float32))
    q = _rand(2, (3, lay.width))
    qs = rowcodec.split_query(q, c, lay.words)
    dot = sum(qs[:, i] @ parts[i].T for i in range(len(parts)))
    np.testing.assert_allclose(dot, q @ lay.decode(words, jnp.float32).T, rtol=1e-5, atol=1e-4)


def test_query_split_and_merge_are_the_element_map():
  """`rowcodec.split_query` (strided slices and zero padding) puts exactly the element `element_map` names in
  each part's lane, zeros elsewhere, and `merge_parts` (slices, interleaves) takes each element back from the
  lanes that hold it, summed in lane order: every format's row codec, its lane-dense planes (tiled when
  packed) and fp4's line codec (7 or 14 keys a line), at the stored width and the padded widths the kernels
  use."""
  rng = np.random.default_rng(0)
  codecs = []
  for lay in (Layout("float32", 64), Layout("bfloat16", 512), Layout("bfloat16", 64), Layout("fp8", 512, 64),
              Layout("fp8", 512, 64, "float32"), Layout("fp4", 128), Layout("fp4", 64)):
    planes = kv_format.lane_dense(lay)
    codecs += [(rowcodec.codec(lay), lay.words)] + list(zip(rowcodec.plane_codecs(lay, planes), [p.line for p in planes]))
    if lay.fmt == "fp4":
      codecs.append((rowcodec.line_codec(lay, 128 // lay.words, lay.words), 128))
  checked = 0
  for c, words in codecs:
    for lanes in sorted({words, 1 << (words - 1).bit_length(), 128 * -(-words // 128)}):
      m = rowcodec.element_map(c, lanes)
      q = rng.standard_normal((2, 3, c.width)).astype(np.float32)
      np.testing.assert_array_equal(rowcodec.split_query(jnp.asarray(q), c, lanes),
                                    np.where(m >= 0, q[..., np.maximum(m, 0)], 0.0))
      o = rng.standard_normal((2, 3) + m.shape).astype(np.float32)
      want = np.zeros((2, 3, c.width), np.float32)
      for i, j in zip(*np.nonzero(m >= 0)):
        want[..., m[i, j]] += o[..., i, j]
      np.testing.assert_array_equal(rowcodec.merge_parts(jnp.asarray(o), c, lanes), want)
      checked += 1
  assert checked >= 20


def _model_window(B, S, W, start, ring):
  """Window index rows as the model builds them (dsv4_jax.attention.window_indices): consecutive positions
  from `start`, older ones in a ring of `ring` slots, -1 before position 0."""
  from dsv4_jax.attention import window_indices
  start = np.asarray(start, np.int32)
  positions = start[:, None] + np.arange(S, dtype=np.int32)
  return jax.jit(window_indices, static_argnums=(2, 3))(positions, start, W, ring)


def test_tpu_dma_kernels_have_no_races():
  """The manual-DMA sparse attention (row gathers and contiguous HCA chunks), the per-query (decode) kernel
  and the prefill kernel (blocks of queries, S not a multiple of the block; the model's windows, with -1 at
  the front, as each block's set of rows), under the TPU simulator with eager DMAs and race detection: no
  race, no out-of-bounds DMA (-1 rows are clamped), same result."""
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret  # races_found lives here
  from jax.experimental.pallas import tpu as pltpu
  H, K, S = 8, 128, 3
  q = _rand(1, (1, S, H, K))
  win = ops.Rows(_rand(2, (1, 20, K)))
  lay = Layout("fp8", K, 64, "float32")
  entries = _rand(4, (1, 40, K))
  comp = ops.Rows(jnp.stack([lay.encode(entries)] * 2), lay, jnp.int32(1), 40)
  params = pltpu.InterpretParams(dma_execution_mode="eager", detect_races=True)
  cases = [(1, _index_rows(1, S, 9, 20, 3), dict(comp_idx=_index_rows(1, S, 20, 40, 5))),
           (1, _index_rows(1, S, 9, 20, 3), dict(comp_visible=jnp.array([[17, 40, 3]], jnp.int32))),
           (2, _model_window(1, S, 9, [1], 9), dict(comp_idx=_index_rows(1, S, 20, 40, 5))),
           (2, _model_window(1, S, 9, [1], 9), dict(comp_visible=jnp.array([[17, 40, 3]], jnp.int32)))]
  for q_block, widx, kw in cases:
    ref = ops.sparse_attention_ref(q, _rand(6, (H,)), 0.1, win, widx, comp, **kw)
    try:
      out = sa.sparse_attention(q, _rand(6, (H,)), 0.1, win, widx, comp, backend="tpu", interpret=params,
                                block_rows=16, q_block=q_block, **kw)
      jax.block_until_ready(out)
      assert not tpu_interpret.races.races_found
    finally:
      pltpu.reset_tpu_interpret_mode_state()
    _close(out, ref, jnp.float32)


def test_window_union_counts_each_listed_row():
  """The prefill kernel's window per block of queries: the block's distinct rows, and per query how often it
  lists each (duplicates twice, -1 never); the model's consecutive windows need W + q_block - 1 rows."""
  idx = _index_rows(2, 6, 11, 30, 7)
  union = jax.jit(sa.window_union, static_argnums=(1, 2, 3))
  uids, n_u, count = map(np.asarray, union(idx, 2, 30, 16))
  idx = np.asarray(idx)
  assert uids.shape == (6, 32) and count.shape == (6, 2, 32)
  for blk in range(6):
    rows = idx[blk // 3, 2 * (blk % 3): 2 * (blk % 3) + 2]                                  # [2, 11]
    want = sorted(set(rows.ravel().tolist()) - {-1})
    assert uids[blk, :len(want)].tolist() == want and n_u[blk] == len(want)
    for t in range(2):
      listed = rows[t].tolist()
      assert count[blk, t, :len(want)].tolist() == [listed.count(u) for u in want]
      assert not count[blk, t, len(want):].any()
  W, Tq = 128, 16
  widx = _model_window(1, 64, W, [300], W)                                        # ring + this call's rows
  n_u = union(widx, Tq, W + 64, 128)[1]
  assert np.asarray(n_u).tolist() == [W + Tq - 1] * 4


def test_triton_kernels_lower_for_cuda():
  """The GPU programs at Flash's decode and prefill (blocks of queries; CSA and HCA) shapes go through the
  Triton lowering (power-of-two arrays, dot sizes) on this CPU host."""
  H, K = 64, 512
  lay, klay = Layout("fp8", K, 64), Layout("fp4", 128)
  S = jax.ShapeDtypeStruct

  def attend(q, sink, win, widx, words, cidx):
    return sa.sparse_attention(q, sink, 0.04, ops.Rows(win), widx, ops.Rows(words, lay, jnp.int32(0), 1024),
                               comp_idx=cidx, backend="gpu", interpret=False)

  def index(qI, w, words):
    return ix.index_scores(qI, w, ops.Rows(words, klay, jnp.int32(0), 1024), backend="gpu", interpret=False)

  def attend_hca(q, sink, win, widx, words, vis):
    return sa.sparse_attention(q, sink, 0.04, ops.Rows(win), widx, ops.Rows(words, lay, jnp.int32(0), 1024),
                               comp_visible=vis, backend="gpu", interpret=False)

  for f, args in ((attend, (S((2, 1, H, K), jnp.bfloat16), S((H,), jnp.float32), S((2, 129, K), jnp.bfloat16),
                            S((2, 1, 128), jnp.int32), S((1, 2, 1024, lay.words), jnp.uint32),
                            S((2, 1, 512), jnp.int32))),
                  (attend, (S((1, 6, H, K), jnp.bfloat16), S((H,), jnp.float32), S((1, 134, K), jnp.bfloat16),
                            S((1, 6, 128), jnp.int32), S((1, 1, 1024, lay.words), jnp.uint32),
                            S((1, 6, 512), jnp.int32))),                       # prefill: blocks of queries
                  (attend_hca, (S((1, 6, H, K), jnp.bfloat16), S((H,), jnp.float32),
                                S((1, 134, K), jnp.bfloat16), S((1, 6, 128), jnp.int32),
                                S((1, 1, 1024, lay.words), jnp.uint32), S((1, 6), jnp.int32))),
                  (index, (S((2, 1, 64, 128), jnp.bfloat16), S((2, 1, 64), jnp.bfloat16),
                           S((1, 2, 1024, klay.words), jnp.uint32)))):
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text


def test_unsupported_shapes_are_named():
  q = _rand(1, (1, 1, 16, 64))
  win = ops.Rows(_rand(2, (1, 5, 64)))
  with pytest.raises(KernelUnsupported, match="block_rows=24 must be a power of two"):
    sa.sparse_attention(q, jnp.zeros(16), 0.1, win, jnp.zeros((1, 1, 4), jnp.int32), backend="gpu", block_rows=24)
  with pytest.raises(KernelUnsupported, match="q_block=3 must be a power of two"):
    sa.sparse_attention(q, jnp.zeros(16), 0.1, win, jnp.zeros((1, 1, 4), jnp.int32), backend="gpu", q_block=3)
  with pytest.raises(KernelUnsupported, match="unknown Pallas backend 'cuda'"):
    sa.sparse_attention(q, jnp.zeros(16), 0.1, win, jnp.zeros((1, 1, 4), jnp.int32), backend="cuda")


# ---- the model end to end ------------------------------------------------------------------------------

PROMPT = [5, 17, 300, 2, 9, 11, 40, 41, 42]


def _run(params, cfg, toks, full: bool):
  """forward logits; with `full`, also prefill + one decode step's logits and 6 greedy tokens."""
  out = [np.asarray(jax.jit(forward, static_argnums=1)(params, cfg, toks).logits)]
  if full:
    logits, cache = prefill(params, cfg, toks, np.array([40, 29]), init_cache(cfg, 2, 64))
    out += [np.asarray(logits), np.asarray(decode_step(params, cfg, np.array([7, 9]), cache)[0])]
    out.append(generate(params, cfg, [PROMPT], max_new_tokens=6, sampling=Sampling()).tokens)
  return out


@pytest.fixture(scope="module")
def tiny():
  cfg = load_config("tiny")
  params = init_params(cfg, jax.random.key(1))
  toks = np.asarray(jax.random.randint(jax.random.key(2), (2, 40), 2, cfg.vocab_size), np.int32)
  return cfg, params, toks, _run(params, cfg, toks, full=True)


@pytest.mark.parametrize("impl,full", [("pallas_tpu", True), ("pallas_gpu", False)])
def test_model_with_pallas_equals_xla(tiny, impl, full):
  """forward, prefill + decode and greedy generation with the kernels (interpreted) equal attn_impl='xla'
  (the GPU programs: forward only, to keep CI short; the cached path shares every kernel call)."""
  cfg, params, toks, ref = tiny
  out = _run(params, dataclasses.replace(cfg, attn_impl=impl), toks, full)
  for a, b in zip(out[:3], ref[:3]):
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b))
  if full:
    assert out[3] == ref[3]
