"""The engine's ops and cache: visibility, the indexer's selection (independent of how many keys a call
holds), sparse attention against a dense computation, the live bucket, in-place decode memory, the
implementation switch, the cache's logical axes."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax import (abstract_params, decode_step, init_cache, init_params, load_config, ops,
                      prefill, quant)
from dsv4_jax.cache import cache_axes, live_bucket
from dsv4_jax.kv_format import Layout


def test_select_topk_ties_go_to_the_lower_id():
  scores = jnp.array([[[1.0, 3.0, 3.0, 2.0, 3.0, 0.0]]])
  assert ops.select_topk(scores, jnp.array([[6]]), 2).tolist() == [[[1, 2]]]
  assert ops.select_topk(scores, jnp.array([[4]]), 3).tolist() == [[[1, 2, 3]]]
  assert ops.select_topk(scores, jnp.array([[1]]), 3).tolist() == [[[0, -1, -1]]]


def test_blockwise_topk_is_the_global_top_k_order_and_ties_included(monkeypatch):
  """`select_topk` over more than `block` scores (or TOPK_WHOLE by default) merges a running best with each
  block; the result, order included (score descending, the lower id first among ties), is the global top-k
  of the visible entries (a NumPy sort), for blocks that do and do not divide n and fewer visible entries
  than k. The indexer's streaming selection (no [B,S,n] scores) equals one `lax.top_k` over its scores."""
  rng = np.random.default_rng(0)
  scores = jnp.asarray(rng.integers(0, 5, (2, 3, 1000)).astype(np.float32))       # many ties
  n_vis = jnp.array([[1000, 517, 3], [0, 999, 700]])

  def oracle(k):
    out = np.full((2, 3, k), -1)
    for b in range(2):
      for t in range(3):
        ids = sorted(range(int(n_vis[b, t])), key=lambda i: (-float(scores[b, t, i]), i))[:k]
        out[b, t, : len(ids)] = ids
    return out

  for k in (6, 40):
    want = oracle(k)
    for block in (64, 100, 333, 4096):
      np.testing.assert_array_equal(np.asarray(ops.select_topk(scores, n_vis, k, block=block)), want)
    monkeypatch.setattr(ops, "TOPK_WHOLE", 0)              # by default too: KEY_BLOCK at a time past TOPK_WHOLE
    monkeypatch.setattr(ops, "KEY_BLOCK", 128)
    np.testing.assert_array_equal(np.asarray(ops.select_topk(scores, n_vis, k)), want)
    monkeypatch.undo()
  qI, w, keys = _indexer_inputs(3000)
  vis = jnp.array([[3, 700, 1999, 2500, 3000]])
  monkeypatch.setattr(ops, "KEY_BLOCK", 512)
  whole = ops.indexer_topk_ref(qI, w, ops.Rows(keys), vis, 40)          # 15000 scores: one top_k
  monkeypatch.setattr(ops, "TOPK_WHOLE", 0)
  streamed = ops.indexer_topk_ref(qI, w, ops.Rows(keys), vis, 40)       # merged as the blocks are scored
  np.testing.assert_array_equal(np.asarray(streamed), np.asarray(whole))
  np.testing.assert_array_equal(np.asarray(whole), np.asarray(
      ops.select_topk(ops.index_scores_ref(qI, w, ops.Rows(keys)), vis, 40, block=1 << 20)))


def _indexer_inputs(n_keys, S=5, nI=4, cI=32, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(k1, (1, S, nI, cI)), jax.random.normal(k2, (1, S, nI)),
          jax.random.normal(k3, (1, n_keys, cI)))


def test_indexer_selection_does_not_depend_on_the_keys_a_call_holds(monkeypatch):
  """The same visible keys give the same top-k whether the call holds 40 keys, 3000 (scored in blocks, the
  last one re-read from n - block), or reads them from a stacked word store through its layer index."""
  qI, w, keys = _indexer_inputs(3000)
  n_vis = jnp.array([[3, 10, 17, 40, 40]])
  few = ops.indexer_topk_ref(qI, w, ops.Rows(keys[:, :40]), n_vis, 6)
  monkeypatch.setattr(ops, "KEY_BLOCK", 512)
  many = ops.indexer_topk_ref(qI, w, ops.Rows(keys), n_vis, 6)
  lay = Layout("float32", 32)
  stacked = jnp.stack([jnp.zeros_like(lay.encode(keys)), lay.encode(keys)])            # [2, 1, 3000, words]
  stored = ops.indexer_topk_ref(qI, w, ops.Rows(stacked, lay, jnp.int32(1), 3000), n_vis, 6)
  np.testing.assert_array_equal(np.asarray(many), np.asarray(few))
  np.testing.assert_array_equal(np.asarray(stored), np.asarray(few))
  assert (np.asarray(few)[0, 0, 3:] == -1).all() and (np.asarray(few)[0, 0, :3] >= 0).all()
  # the blocked scores equal one einsum over all keys
  ref = jnp.sum(jax.nn.relu(jnp.einsum("bshd,bcd->bshc", qI, keys)) * w[..., None], axis=2)
  np.testing.assert_allclose(np.asarray(ops.index_scores_ref(qI, w, ops.Rows(keys))), np.asarray(ref),
                             rtol=1e-5, atol=1e-4)


def _dense_attention(q, kv_rows, sink, scale):
  """numpy: q [H,K], kv_rows [T,K] (duplicates count twice), sink [H] -> [H,K]."""
  if len(kv_rows) == 0:
    return np.zeros_like(q)
  z = q @ kv_rows.T * scale
  m = z.max(-1, keepdims=True)
  e = np.exp(z - m)
  return (e @ kv_rows) / (e.sum(-1, keepdims=True) + np.exp(sink[:, None] - m))


def test_sparse_attention_masks_duplicates_sink_and_all_masked_rows():
  H, K, N, C = 4, 16, 12, 6
  ks = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(ks[0], (1, 4, H, K))
  kv = jax.random.normal(ks[1], (1, N, K))
  comp = jax.random.normal(ks[2], (1, C, K))
  sink = jax.random.normal(ks[3], (H,))
  widx = jnp.array([[[-1, -1, -1], [0, -1, 2], [3, 3, 5], [-1, -1, -1]]])            # front, middle, dupes
  cidx = jnp.array([[[-1, -1], [1, -1], [-1, 4], [-1, -1]]])                        # last row: all masked
  out = ops.sparse_attention_ref(q, sink, 0.25, ops.Rows(kv), widx, ops.Rows(comp), cidx)
  vis = jnp.array([[0, 2, 6, 0]])
  out_hca = ops.sparse_attention_ref(q, sink, 0.25, ops.Rows(kv), widx, ops.Rows(comp), comp_visible=vis)
  qn, kvn, cn, sn = map(np.asarray, (q, kv, comp, sink))
  for t in range(4):
    rows = [kvn[0, i] for i in np.asarray(widx)[0, t] if i >= 0]
    sel = rows + [cn[0, i] for i in np.asarray(cidx)[0, t] if i >= 0]
    np.testing.assert_allclose(np.asarray(out)[0, t], _dense_attention(qn[0, t], np.array(sel).reshape(-1, K), sn,
                                                                       0.25), rtol=2e-5, atol=2e-6)
    allv = rows + [cn[0, i] for i in range(int(vis[0, t]))]
    np.testing.assert_allclose(np.asarray(out_hca)[0, t], _dense_attention(qn[0, t], np.array(allv).reshape(-1, K),
                                                                           sn, 0.25), rtol=2e-5, atol=2e-6)
  assert np.asarray(out)[0, 3].tolist() == np.zeros((H, K)).tolist()               # no NaN: exactly 0


def test_unknown_attn_impl_or_missing_op_is_a_clear_error(monkeypatch):
  with pytest.raises(ValueError, match="attn_impl"):
    dataclasses.replace(load_config("tiny"), attn_impl="cuda")
  cfg = dataclasses.replace(load_config("tiny"), attn_impl="pallas_gpu")
  ops.implementation(cfg, "indexer_topk")                                  # imports and registers the kernels
  monkeypatch.setitem(ops._IMPLS, "pallas_gpu", {"indexer_topk": ops.indexer_topk_ref})
  with pytest.raises(NotImplementedError, match="attn_impl='pallas_gpu' has no 'sparse_attention' op"):
    ops.implementation(cfg, "sparse_attention")
  with pytest.raises(ValueError, match="unknown ops"):
    ops.register("mine", topk=ops.select_topk)


def test_the_window_reaches_sparse_attention_in_the_order_its_implementation_reads(monkeypatch):
  """The XLA ops read the cached window in its layout's planar order, the Pallas kernels in natural order
  (`ops.register(planar_reads=)`): `attention` builds it so, and the logits do not depend on it. The "pallas"
  ops here are the references, with a spy on sparse attention."""
  seen = {"xla": [], "pallas": []}

  def spy(name):
    def sparse_attention(*args, **kw):
      seen[name].append(args[3].order)                  # (q, attn_sink, scale, window, ...)
      return ops.sparse_attention_ref(*args, **kw)
    return sparse_attention

  monkeypatch.setitem(ops._IMPLS, "xla", dict(ops._IMPLS["xla"], sparse_attention=spy("xla")))
  monkeypatch.setitem(ops._IMPLS, "pallas", dict(ops._IMPLS["xla"], sparse_attention=spy("pallas")))
  monkeypatch.setitem(ops._PLANAR_READS, "pallas", False)
  base = load_config("tiny")
  params = init_params(base, jax.random.key(1))
  toks = np.asarray(jax.random.randint(jax.random.key(2), (2, 20), 0, base.vocab_size), np.int32)
  outs = {}
  for impl in ("xla", "pallas"):
    cfg = dataclasses.replace(base, attn_impl=impl)
    _, cache = prefill(params, cfg, toks, np.array([20, 13]), init_cache(cfg, 2, 64))
    outs[impl] = np.asarray(decode_step(params, cfg, np.array([5, 6]), cache)[0])
  assert seen["xla"] and all(isinstance(o, Layout) for o in seen["xla"])
  assert seen["pallas"] and all(o is None for o in seen["pallas"])
  np.testing.assert_allclose(outs["pallas"], outs["xla"], rtol=1e-5, atol=1e-5)


def test_cache_shorter_than_a_compression_ratio():
  """max_seq_len 6 < the HCA ratio 8: the compressed stores keep one (never visible) row, and the step runs."""
  cfg = load_config("tiny")
  params = init_params(cfg, jax.random.key(1))
  cache = init_cache(cfg, 1, 6)
  logits, cache = prefill(params, cfg, np.array([[5, 17]], np.int32), np.array([2]), cache)
  logits2, _ = decode_step(params, cfg, np.array([3]), cache)
  assert np.isfinite(np.asarray(logits)).all() and np.isfinite(np.asarray(logits2)).all()


def test_live_bucket():
  assert [live_bucket(n, 1 << 20) for n in (1, 1024, 1025, 5000)] == [1024, 1024, 2048, 8192]
  assert live_bucket(5000, 4096) == 4096


def test_decode_reads_only_the_live_rows_and_gives_the_same_logits():
  """A cache of capacity 8192 holding 40 tokens: the step compiled for the 1024-token bucket equals the
  step compiled for the whole capacity (same selections; the sums differ at most by rounding)."""
  cfg = load_config("tiny")
  params = init_params(cfg, jax.random.key(1))
  toks = np.asarray(jax.random.randint(jax.random.key(2), (2, 40), 0, cfg.vocab_size), np.int32)
  outs = []
  for live in (1024, 8192):
    _, cache = prefill(params, cfg, toks, np.array([40, 31]), init_cache(cfg, 2, 8192))
    logits, cache = decode_step(params, cfg, np.array([5, 6]), cache, live=live)
    outs.append(np.asarray(logits))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)


def test_decode_step_temporaries_do_not_grow_with_the_cache():
  """Compiled (not run): one decode step at 16K and at 256K capacity, live bucket 1K. The cache grows 16x,
  the step's temporaries not at all: stores are updated in place and read up to the live rows, never
  copied whole."""
  from dsv4_jax.inference import step
  cfg = load_config("tiny")
  params = abstract_params(cfg)
  tok, one = jax.ShapeDtypeStruct((1, 1), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32)
  temps, sizes = [], []
  for capacity in (16384, 262144):
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, capacity))
    compiled = jax.jit(step, static_argnums=(1, 5), donate_argnums=4).lower(params, cfg, tok, one, cache,
                                                                             1024).compile()
    sizes.append(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)))
    temps.append(compiled.memory_analysis().temp_size_in_bytes)
  print(f"cache {[s / 2**20 for s in sizes]} MiB, step temporaries {[t / 2**20 for t in temps]} MiB")
  assert sizes[1] > 15 * sizes[0]
  assert temps[1] <= temps[0] * 1.01


def test_cache_leaves_have_logical_axes_and_follow_a_mesh():
  from dsv4_jax import sharding
  cfg = load_config("tiny")
  cache = init_cache(cfg, 2, 64)
  axes = cache_axes(cache)
  is_axes = lambda x: isinstance(x, tuple)
  for leaf, ax in zip(jax.tree.leaves(cache), jax.tree.leaves(axes, is_leaf=is_axes)):
    assert len(ax) == leaf.ndim, (ax, leaf.shape)
  assert jax.tree.leaves(axes["layers"]["stack"][0]["comp"], is_leaf=is_axes)[0] == ("layers", "cache_batch",
                                                                                       "cache_seq", None)
  mesh = sharding.make_mesh({"data": 1})
  placed = init_cache(cfg, 2, 64, mesh=mesh)
  assert all(isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == mesh
             for x in jax.tree.leaves(placed))


def test_packed_store_writes_and_reads_rows_like_an_unpacked_one():
  """A lane-dense store (8 rows of 16 words per 128-word line): rows written anywhere (line starts and ends,
  the last row, out of range dropped), in a stacked group's layer or not, decode, gather and block-read
  exactly as in an unpacked store, and the other layers stay untouched."""
  from dsv4_jax import kv_format
  from dsv4_jax.cache import LayerCache
  from dsv4_jax.kv_format import Layout
  lay = Layout("float32", 16)
  P = kv_format.lane_pack(lay)
  assert P == 8 and kv_format.lane_pack(Layout("bfloat16", 128)) == 2 and kv_format.lane_pack(Layout("fp4", 128)) == 1
  vals = jax.random.normal(jax.random.key(0), (2, 5, 16))
  rows = jnp.array([[0, 7, 8, 23, -1], [3, 15, 2**31 - 1, 9, 10]])
  for rep in (None, jnp.int32(1)):
    lead = (2,) if rep is None else (3, 2)
    packed = LayerCache({"s": kv_format.empty(lead, 20, lay, kv_format.rows_geometry(lay, P))}, rep, 24).write(
        "s", rows, vals).tree["s"]
    plain = LayerCache({"s": kv_format.empty(lead, 24, lay)}, rep, 24).write("s", rows, vals).tree["s"]
    assert packed.words.shape[-2:] == (8, 128) and packed.n_rows == 64          # whole (8, 128) tiles
    np.testing.assert_array_equal(packed.decode(jnp.float32)[..., :24, :], plain.decode(jnp.float32))
    assert not np.asarray(packed.decode(jnp.float32)[..., 24:, :]).any()
    assert np.asarray(plain.decode(jnp.float32)).any()
    a, b = (ops.Rows.of(s, rep, 19) for s in (packed, plain))
    idx = jnp.array([[[0, 7, 8, 23, -1]], [[15, 9, 3, 3, 100]]])
    np.testing.assert_array_equal(a.gather(idx, jnp.float32), b.gather(idx, jnp.float32))
    np.testing.assert_array_equal(a.all(jnp.float32), b.all(jnp.float32))
    np.testing.assert_array_equal(a.block(8, 16, jnp.float32), b.block(8, 16, jnp.float32))


def test_lane_dense_planes_read_and_write_like_whole_rows():
  """The lane-dense geometry (kv_format.lane_dense): every plane 128 words wide; the paper's fp8 row cut
  into [values | scales] and RoPE planes (Flash: one line + 4 RoPE rows a line; tiny widths: 7 and 8 or 4
  rows a line), fp4 keys packed 7 a line. Rows written anywhere (out of range dropped), in a stacked group's
  layer, decode, gather and block-read exactly as whole rows do, and the other layer stays zero."""
  from dsv4_jax import kv_format
  from dsv4_jax.cache import LayerCache
  from dsv4_jax.kv_format import Layout
  cases = {Layout("fp8", 512, 64): [(0, 114, 1, 128), (114, 146, 4, 128)],
           Layout("fp8", 96, 32, "float32"): [(0, 17, 7, 128), (17, 49, 4, 128)],
           Layout("fp4", 128): [(0, 17, 7, 128)]}
  rows = jnp.array([[0, 6, 7, 27, -1], [3, 13, 2**31 - 1, 9, 10]])
  rep = jnp.int32(1)
  for lay, want in cases.items():
    planes = kv_format.lane_dense(lay)
    assert [(p.lo, p.hi, p.pack, p.line) for p in planes] == want
    vals = jax.random.normal(jax.random.key(1), (2, 5, lay.width)) * 3
    dense = LayerCache({"s": kv_format.empty((2, 2), 28, lay, planes)}, rep, 28).write("s", rows, vals).tree["s"]
    whole = LayerCache({"s": kv_format.empty((2, 2), 28, lay)}, rep, 28).write("s", rows, vals).tree["s"]
    assert all(a.shape[-1] == 128 and a.shape[-2] % 8 == 0 for a in dense.arrays) and dense.n_rows >= 28
    got, ref = dense.decode(jnp.float32), whole.decode(jnp.float32)
    np.testing.assert_array_equal(got[..., :28, :], ref)
    assert np.asarray(ref[1]).any() and not np.asarray(got[0]).any() and not np.asarray(got[:, :, 28:]).any()
    a, b = ops.Rows.of(dense, rep, 27), ops.Rows.of(whole, rep, 27)
    idx = jnp.array([[[0, 6, 7, 27, -1]], [[13, 9, 3, 3, 100]]])
    np.testing.assert_array_equal(a.gather(idx, jnp.float32), b.gather(idx, jnp.float32))
    np.testing.assert_array_equal(a.all(jnp.float32), b.all(jnp.float32))
    blk = a.align                                          # whole lines of every plane: 4, 28 or 7 rows
    for start in range(0, 28 - blk + 1, blk):
      np.testing.assert_array_equal(a.block(start, blk, jnp.float32), b.block(start, blk, jnp.float32))


def test_key_tiles_read_and_write_like_whole_rows():
  """Indexer keys as the cache stores them (kv_format.key_tiles: fp4 keys 16 + 1 words, 8 + 1 at width 64,
  bf16 64 words; 128 keys across the lanes, 1024 a block, 68 B an fp4 key of 128 values): rows written
  anywhere (out of range dropped) in a stacked group's layer read back, block by block and keys-minor
  (`Rows.tile_block`, `Layout.decode_tiles`), exactly as whole rows; f32 keys and widths whose body is not
  whole tiles get none."""
  from dsv4_jax import kv_format
  from dsv4_jax.cache import LayerCache
  want = {Layout("fp4", 128): (17, 16, 136), Layout("fp4", 64): (9, 8, 72), Layout("bfloat16", 128): (64, 64, 512)}
  assert kv_format.key_tiles(Layout("float32", 128)) is None and kv_format.key_tiles(Layout("fp4", 32)) is None
  assert kv_format.row_bytes(Layout("fp4", 128), kv_format.key_tiles(Layout("fp4", 128))) == 68
  rows = jnp.array([[0, 127, 128, 1500, -1], [3, 1023, 2**31 - 1, 1024, 2047]])
  rep = jnp.int32(1)
  for lay, (words, body, lines) in want.items():
    (t,) = geo = kv_format.key_tiles(lay)
    assert (t.words, t.body, t.block_lines) == (words, body, lines)
    vals = jax.random.normal(jax.random.key(1), (2, 5, lay.width)) * 3
    tiled = LayerCache({"s": kv_format.empty((2, 2), 2000, lay, geo)}, rep, 2048).write("s", rows, vals).tree["s"]
    whole = LayerCache({"s": kv_format.empty((2, 2), 2048, lay)}, rep, 2048).write("s", rows, vals).tree["s"]
    assert tiled.words.shape == (2, 2, 2 * lines, 128) and tiled.n_rows == 2048
    got, ref = tiled.decode(jnp.float32), whole.decode(jnp.float32)
    np.testing.assert_array_equal(got, ref)
    assert np.asarray(ref[1]).any() and not np.asarray(got[0]).any()
    a, b = ops.Rows.of(tiled, rep, 2000), ops.Rows.of(whole, rep, 2000)
    np.testing.assert_array_equal(a.all(jnp.float32), b.all(jnp.float32))
    for start in (0, 1024):
      np.testing.assert_array_equal(a.block(start, 1024, jnp.float32), b.block(start, 1024, jnp.float32))
      minor = a.tile_block(start, 1024, jnp.float32)                          # [B, 8, K planar, 128]
      np.testing.assert_array_equal(jnp.swapaxes(minor, -1, -2).reshape(2, 1024, lay.width),
                                    b.block(start, 1024, jnp.float32, lay))
    with pytest.raises(ValueError, match="not gathered"):
      a.gather(jnp.zeros((2, 1, 1), jnp.int32), jnp.float32)


def test_planar_decode_is_the_stored_values_slot_by_slot():
  """`Layout.decode_planar` (what the ops read) gives the values of each format, read here from the words'
  bytes with NumPy, in the planar order (`to_planar`: slot 0 of every word, then slot 1, ...), bit for bit;
  `decode` is the natural order; `from_planar` inverts `to_planar`; and ops.Rows reads a store in it."""
  import ml_dtypes
  assert Layout("bfloat16", 8).to_planar(jnp.arange(8)).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
  assert Layout("fp4", 16).to_planar(jnp.arange(16)).tolist() == [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]
  for per in (1, 2, 4, 8):                     # quant.interleave: slots_last, RoPE's pairs, merge_parts
    parts = [jnp.arange(6.0).reshape(2, 3) + 10 * j for j in range(per)]
    np.testing.assert_array_equal(quant.interleave(parts), np.stack(parts, -1).reshape(2, 3 * per))

  def oracle(lay, words):                     # natural order, from the row's bytes (little-endian words)
    b = np.asarray(words).view(np.uint8).reshape(*words.shape[:-1], -1)
    K, r = lay.width, lay.rope_dim
    if lay.fmt in ("bfloat16", "float32"):
      return b.view(ml_dtypes.bfloat16 if lay.fmt == "bfloat16" else np.float32).astype(np.float32)
    if lay.fmt == "fp8":
      n = K - r
      s = np.repeat(2.0 ** (b[..., n: n + n // 64].astype(np.float32) - 127), 64, -1)
      o = lay.rope_word * 4
      rope = b[..., o: o + r * np.dtype(lay.rope_dtype).itemsize].copy().view(
          ml_dtypes.bfloat16 if lay.rope_dtype == "bfloat16" else np.float32)
      return np.concatenate([b[..., :n].view(ml_dtypes.float8_e4m3fn).astype(np.float32) * s,
                             rope.astype(np.float32)], -1)
    codes = np.stack([b[..., : K // 2] & 15, b[..., : K // 2] >> 4], -1).reshape(*b.shape[:-1], K)
    e2m1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
    s = np.repeat(2.0 ** (b[..., K // 2: K // 2 + K // 32].astype(np.float32) - 127), 32, -1)
    return np.where(codes >= 8, -1.0, 1.0) * e2m1[codes & 7] * s

  for lay in (Layout("bfloat16", 512), Layout("float32", 64), Layout("fp8", 512, 64),
              Layout("fp8", 128, 64, "float32"), Layout("fp4", 128)):
    x = jax.random.normal(jax.random.key(2), (2, 3, lay.width)) * 3
    words = lay.encode(x)
    natural = oracle(lay, words)
    np.testing.assert_array_equal(lay.decode(words, jnp.float32), natural)
    if lay.fmt in ("bfloat16", "float32"):                     # stored exactly, value 2i in word i's low half
      np.testing.assert_array_equal(natural, np.asarray(x.astype(lay.fmt).astype(jnp.float32)))
    np.testing.assert_array_equal(lay.decode_planar(words, jnp.float32), lay.to_planar(jnp.asarray(natural)))
    np.testing.assert_array_equal(lay.from_planar(lay.to_planar(x)), x)
    rows = ops.Rows(words, lay)
    np.testing.assert_array_equal(rows.all(jnp.float32, lay), lay.decode_planar(words, jnp.float32))
    np.testing.assert_array_equal(ops.Rows(x).all(jnp.float32, lay), lay.to_planar(x))


def test_a_decode_step_reads_its_own_kv_from_the_ring_only_where_the_ring_holds_it_exactly():
  """attention._ring_is_exact (which lets a Pallas decode step write its KV first and read the ring in place)
  is True exactly where a KV row as project_kv makes it survives the store: fp32 rows; bf16 rows of a bf16
  model; the paper's fp8 rows under quant_sim. Elsewhere the step attends its raw KV (the concat path)."""
  from dsv4_jax import attention, quant
  from dsv4_jax.cache import layouts
  for dtype in ("float32", "bfloat16"):
    for quant_sim in (False, True):
      cfg = dataclasses.replace(load_config("tiny"), dtype=dtype, quant_sim=quant_sim)
      kv = (jax.random.normal(jax.random.key(0), (2, 5, cfg.head_dim)) * 3).astype(dtype)
      if quant_sim:
        kv = quant.kv_fp8_sim(kv, cfg.rope_head_dim)
      for storage in ("float32", "bfloat16", "paper"):
        main, _ = layouts(cfg, storage)
        exact = bool(jnp.all(main.decode(main.encode(kv), dtype) == kv))
        assert attention._ring_is_exact(cfg, main) == exact, (dtype, quant_sim, storage)
        assert exact == (storage == "float32" or storage == dtype or (storage == "paper" and quant_sim))


def test_hca_decode_pools_the_ring_it_just_wrote():
  """A one-token call on a ring of exactly one window (HCA decode, no rollback rows) pools the ring after
  writing its token's row, instead of gathering the window from the old ring and this call's row: the
  entries, the completed counts and the state equal those of the general path (the same compressor with 3
  rollback rows), bit for bit, token by token over 2.5 windows, with a padded row (length 0) on some steps."""
  from dsv4_jax import compressor
  cfg = load_config("tiny")
  m = 8
  layers = init_params(cfg, jax.random.key(0))["layers"]
  p = next(q["attn"]["compressor"] for q in [*layers["prefix"], *[jax.tree.map(lambda a: a[0], s) for s in layers["stack"]]]
           if "compressor" in q["attn"] and q["attn"]["compressor"]["ape"].shape[0] == m)
  c = p["norm"].shape[0]
  x = jax.random.normal(jax.random.key(1), (2, 20, cfg.dim), jnp.float32)
  step = jax.jit(lambda s, xt, start, n: compressor.compress_chunk(p, cfg, xt, m, start, n, s))
  direct, general = compressor.empty_state(m, c, (2,)), compressor.empty_state(m, c, (2,), rollback=3)
  assert direct["C"].shape[1] == m and general["C"].shape[1] == m + 3
  start = np.zeros(2, np.int32)
  completed = 0
  for t in range(20):
    n = np.array([1, 0 if t % 3 == 2 else 1], np.int32)               # row 1 skips every third step
    xt = x[:, t:t + 1]
    E1, ids1, done1, direct = step(direct, xt, jnp.asarray(start), jnp.asarray(n))
    E2, ids2, done2, general = step(general, xt, jnp.asarray(start), jnp.asarray(n))
    np.testing.assert_array_equal(ids1, ids2)
    np.testing.assert_array_equal(done1, done2)
    np.testing.assert_array_equal(E1, E2)
    completed += int(np.sum(np.asarray(ids1)[:, 0] < np.asarray(done1)))
    w = np.nonzero(n)[0]                                                 # this token's row, where written
    for k in ("C", "Z"):
      np.testing.assert_array_equal(np.asarray(direct[k])[w, start[w] % m],
                                    np.asarray(general[k])[w, start[w] % (m + 3)])
    start = start + n
  assert completed >= 3                                                 # entries completed on the way
