"""The Pallas kernels declare their cost to XLA (pallas_kernels/cost.py), and what they declare follows the
rows they read, not the size of the stores those rows sit in.

The kernels are lowered for TPU from this CPU (`lower(lowering_platforms=("tpu",))`: no libtpu, no compile);
each Mosaic call carries its `cost_estimate` in its backend config, which XLA:TPU's cost model uses as the
kernel's cost (without one it counts the kernel as free)."""
import re

import jax
import jax.numpy as jnp
import pytest

from dsv4_jax import kv_format
from dsv4_jax.ops import Rows
from pallas_kernels import compressor, encode, indexer, sparse_attention

sds = jax.ShapeDtypeStruct


def declared(fn, *args) -> list[tuple[int, int]]:
  """[(bytes_accessed, flops)] of every Mosaic kernel in fn's TPU lowering, in program order."""
  txt = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  calls = txt.count("@tpu_custom_call(")
  found = [(int(b), int(f)) for b, f in re.findall(r"bytes_accessed\\22:(\d+),\\0A\\22flops\\22:(\d+)", txt)]
  assert len(found) == calls, f"{calls} kernels, {len(found)} cost estimates"
  return found


@pytest.mark.parametrize("module", [sparse_attention, indexer, compressor, encode])
def test_every_kernel_declares_a_cost(module):
  """The first AOT case of each kernel module (and every prefill/decode variant of the attention kernel)."""
  cases = module.AOT_CASES[:1] + [c for c in module.AOT_CASES[1:] if module is sparse_attention and "b1" in c[0]]
  for name, fn, args in cases:
    costs = declared(fn, *args)
    assert costs and all(b > 0 for b, _ in costs), (name, costs)


def _attention(fmt: str, source: str, capacity: int, rows: int, selected: int = 0):
  """A decode query of 8 heads x 512 over a 128-row window and a compressed store of `capacity` rows of which
  the first `rows` are considered: CSA gathers `selected` of them, HCA reads them all."""
  lay = kv_format.Layout(fmt, 512, 64) if fmt == "fp8" else kv_format.Layout(fmt, 512)
  planes = kv_format.lane_dense(lay)
  store = jax.eval_shape(lambda: kv_format.empty((2, 1), capacity, lay, planes))
  args = [sds((1, 1, 8, 512), jnp.bfloat16), sds((8,), jnp.float32), sds((1, 129, 512), jnp.bfloat16),
          sds((1, 1, 128), jnp.int32), store.words, store.tail if store.tail is not None else store.words,
          sds((1, 1, selected), jnp.int32) if source == "csa" else sds((1, 1), jnp.int32)]

  def fn(q, sink, win, widx, words, tail, sel):
    comp = Rows(words, lay, jnp.int32(1), rows, tail=tail if len(planes) > 1 else None, planes=planes)
    kw = dict(comp_idx=sel) if source == "csa" else dict(comp_visible=sel)
    return sparse_attention.sparse_attention(q, sink, 0.04, Rows(win), widx, comp, backend="tpu",
                                             interpret=False, **kw)
  row_bytes = 4 * sum(p.line for p in planes)          # a row's fetch: its line of every plane
  return declared(fn, *args), row_bytes


def test_attention_declares_the_rows_it_reads():
  # CSA: the selected rows, whatever the store holds; 128 more selected = 128 more rows fetched
  (small,), row_bytes = _attention("fp8", "csa", 4096, 4096, selected=512)
  (large,), _ = _attention("fp8", "csa", 65536, 65536, selected=512)
  (more,), _ = _attention("fp8", "csa", 4096, 4096, selected=640)
  assert row_bytes == 1024                             # [values | scales] line + the RoPE plane's line
  assert large == small
  ids = 2 * 128 * 4                                    # the extra ids, in SMEM and VMEM
  assert more[0] - small[0] == 128 * row_bytes + ids
  # HCA: every considered row (a decode step's live bucket), not the capacity
  (hca,), _ = _attention("fp8", "hca", 65536, 1024)
  (hca2,), _ = _attention("fp8", "hca", 65536, 2048)
  (hca_cap,), _ = _attention("fp8", "hca", 262144, 1024)
  assert hca_cap == hca
  assert hca2[0] - hca[0] == 1024 * row_bytes


def _indexer(capacity: int, keys: int):
  lay = kv_format.Layout("fp4", 128)
  (plane,) = kv_format.lane_dense(lay)
  store = jax.eval_shape(lambda: kv_format.empty((2, 1), capacity, lay, (plane,)))

  def fn(qI, w, words):
    return indexer.index_scores(qI, w, Rows(words, lay, jnp.int32(0), keys, planes=(plane,)), backend="tpu",
                                interpret=False, block_keys=128)
  return declared(fn, sds((1, 1, 16, 128), jnp.bfloat16), sds((1, 1, 16), jnp.bfloat16), store.words), plane


def test_indexer_declares_the_live_keys():
  (base,), plane = _indexer(65536, 7 * 128 * 4)         # 4 blocks of 128 lines, 7 fp4 keys a line
  (cap,), _ = _indexer(262144, 7 * 128 * 4)
  (more,), _ = _indexer(65536, 7 * 128 * 8)
  assert cap == base
  scores = 7 * 128 * 4 * 2                              # 4 more blocks' bf16 scores, 7 slots a line
  assert more[0] - base[0] == 4 * 128 * plane.line * 4 + scores


def _tiled_indexer(capacity: int, keys: int):
  lay = kv_format.Layout("fp4", 128)
  geo = kv_format.key_tiles(lay)
  store = jax.eval_shape(lambda: kv_format.empty((2, 1), capacity, lay, geo))

  def fn(qI, w, words):
    return indexer.index_scores(qI, w, Rows(words, lay, jnp.int32(0), keys, planes=geo), backend="tpu",
                                interpret=False)
  return declared(fn, sds((1, 1, 16, 128), jnp.bfloat16), sds((1, 1, 16), jnp.bfloat16), store.words)


def test_tiled_indexer_declares_the_live_keys_and_the_maths_flops():
  """Keys as the cache stores them (kv_format.Tiles: 128 keys across the lanes): the declared bytes follow
  the live keys (68 B each: 17 words, no padding) and the FLOPs are the math's (no virtual heads)."""
  (base,) = _tiled_indexer(65536, 4096)
  (cap,) = _tiled_indexer(262144, 4096)
  (more,) = _tiled_indexer(65536, 8192)
  assert cap == base
  assert more[0] - base[0] == 4096 * 68 + 4096 * 2                  # the keys' words and their bf16 scores
  assert more[1] - base[1] == 2 * 4096 * 16 * 128                   # 16 heads x 128 dims a key, no more
