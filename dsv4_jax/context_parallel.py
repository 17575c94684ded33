"""Context-parallel attention: a long prompt split over the mesh's `sequence` axis (docs/architecture.md
§2.5-§2.9).

The prompt is cut into n contiguous blocks of L tokens, one per `sequence` shard, and one attention layer
runs inside `jax.shard_map` over that axis (the other mesh axes stay automatic). Shard i, holding positions
[iL, (i+1)L):
  * receives a halo, the attention input x of the previous shard's last H tokens (`ppermute`; H = the
    window or a compressor's state rows, whichever is longer: 128 for Flash and Pro);
  * compresses its own tokens (`compressor.compress` from position iL, with the halo's projections as the
    compressor state: CSA's 4x overlap pools the window before iL, which the previous shard holds);
  * all-gathers the compressed entries and the indexer keys, 4x (CSA) or 128x (HCA) fewer rows than the
    raw KV, so each query sees every entry visible to it;
  * attends its queries with `attention.attend`: the window reads the halo's KV as a ring of W slots
    (position p in slot p mod W) in front of the shard's own KV, as a cached chunk reads the cache's ring.
The ops and the rows they read are those of one device (only where the rows sit differs), so the result
equals one device's up to floating-point reassociation.

Every shard holds L tokens, L a multiple of `align` (the window and the compressors' state rows), so that
compressed windows and ring slots start aligned at iL; a prompt is right-padded to n*L tokens (attention is
causal: the pad changes no real position) and the pad is cut off the output.

For a prefill into an empty cache (`attention.attention` with `cache.fresh`), the layer also hands back
what the cache keeps of the prompt: the last `tail` tokens' KV and attention input of each row (a masked
local pick on the shard that holds them, summed over the axis), and the gathered entries.
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv4_jax import compressor, indexer, ops, sharding
from dsv4_jax.config import ModelConfig
from dsv4_jax.qarray import QArray, dense
from dsv4_jax.rope import rope_angles

SEQUENCE_AXIS = "sequence"


def shards() -> int:
  """Size of the active mesh's `sequence` axis (1 without a mesh, or inside a `sequence` shard_map)."""
  mesh = sharding.active_mesh()[0]
  if mesh is None or SEQUENCE_AXIS not in mesh.axis_names:
    return 1
  if SEQUENCE_AXIS in jax.sharding.get_abstract_mesh().manual_axes:
    return 1
  return int(mesh.shape[SEQUENCE_AXIS])


def halo(cfg: ModelConfig) -> int:
  """Tokens a shard needs from before its first position: the window's W - 1, and the compressors' state
  (CSA: the window before + the current one, 2m; HCA: m), rounded to the longest of them."""
  rows = [compressor.state_rows(r) for r in set(cfg.compress_ratios) if r]
  return max([cfg.window_size] + rows)


def align(cfg: ModelConfig) -> int:
  """Every shard's token count is a multiple of this: the ring and each compressor state then start at
  slot 0 and every compressed window lies in one shard."""
  rows = [compressor.state_rows(r) for r in set(cfg.compress_ratios) if r]
  return math.lcm(cfg.window_size, *rows)


def padded_length(cfg: ModelConfig, S: int, n: int) -> int:
  """S rounded up to n shards of a multiple of `align(cfg)` tokens, each at least `halo(cfg)` long."""
  a = align(cfg)
  L = max(-(-S // (n * a)) * a, -(-halo(cfg) // a) * a)
  return n * L


def _pick_tail(a: jnp.ndarray, t: jnp.ndarray, first: jnp.ndarray) -> jnp.ndarray:
  """a: [B, L, ...] this shard's rows (positions first..first+L-1), t: [B, T] positions -> [B, T, ...] the
  rows at t that this shard holds, zeros elsewhere (summed over the axis, each row comes from its shard)."""
  L = a.shape[1]
  local = t - first
  mine = (local >= 0) & (local < L)
  got = jnp.take_along_axis(a, jnp.clip(local, 0, L - 1).reshape(t.shape + (1,) * (a.ndim - 2)), axis=1)
  return jnp.where(mine.reshape(mine.shape + (1,) * (a.ndim - 2)), got, 0)


def _shard_body(p, x, lengths, *, cfg: ModelConfig, ratio: int, n: int, tail: int, cpu_wire: bool) -> dict:
  """One shard: x [B, L, D] at positions iL.. -> {"out": [B, L, D], "comp": [B, nL/m, c] (compressed
  layers), "keys": [B, nL/4, cI] (CSA), "tail_kv": [B, tail, K], "tail_x": [B, tail, D]} (tails: the `tail`
  positions before lengths[b], each picked on the shard that holds it and summed over the axis)."""
  from dsv4_jax import attention                 # attention.py dispatches here
  B, L, _ = x.shape
  i = jax.lax.axis_index(SEQUENCE_AXIS)
  first = i * L
  H, W = halo(cfg), cfg.window_size
  x_halo = jax.lax.ppermute(x[:, L - H:], SEQUENCE_AXIS, [(j, j + 1) for j in range(n - 1)])   # shard 0: zeros
  halo_pos = jnp.broadcast_to(first - H + jnp.arange(H, dtype=jnp.int32), (B, H))
  positions = jnp.broadcast_to(first + jnp.arange(L, dtype=jnp.int32), (B, L))
  start = jnp.full((B,), first, jnp.int32)

  kv = attention.project_kv(p, cfg, x, *rope_angles(cfg, ratio > 0, positions))
  kv_halo = attention.project_kv(p, cfg, x_halo[:, H - W:], *rope_angles(cfg, ratio > 0, halo_pos[:, H - W:]))
  b = jnp.arange(B)[:, None]
  ring = jnp.zeros((B, W, kv.shape[-1]), kv.dtype).at[b, halo_pos[:, H - W:] % W].set(kv_halo)
  window = ops.Rows(jnp.concatenate([ring, kv], axis=1))

  wire = jnp.float32 if cpu_wire else cfg.dtype                  # see _bf16_weights_as_f32

  def gathered_entries(pc, is_indexer: bool):
    state = compressor.state_from_tokens(pc, x_halo, ratio, halo_pos)
    E = compressor.compress(pc, cfg, x, ratio, indexer=is_indexer, start=first, state=state)[:, : L // ratio]
    return jax.lax.all_gather(E.astype(wire), SEQUENCE_AXIS, axis=1, tiled=True).astype(E.dtype)   # [B, nL/m, c]

  got = {}
  if ratio:
    got["comp"] = gathered_entries(p["compressor"], False)
  if ratio == indexer.CSA_RATIO:
    got["keys"] = gathered_entries(p["indexer"]["compressor"], True)
  rows = {k: ops.Rows(v) for k, v in got.items()}
  got["out"] = attention.map_query_chunks(
      lambda xc, pc: attention.attend(p, cfg, ratio, xc, pc, start, W, window, rows.get("comp"), rows.get("keys")),
      cfg.query_chunk, (x, positions))
  if tail:
    t = lengths[:, None] - tail + jnp.arange(tail, dtype=jnp.int32)
    got["tail_kv"], got["tail_x"] = jax.lax.psum((_pick_tail(kv, t, first), _pick_tail(x, t, first)),
                                                 SEQUENCE_AXIS)
  return got


def _bf16_weights_as_f32(p, body):
  """XLA:CPU only: the weights enter the shard_map in fp32 and are cast back inside (and the entries are
  all-gathered in fp32). Their gradients are all-reduces over `sequence` (the weights') and reduce-scatters
  (the entries'), and XLA:CPU's AllReducePromotion pass aborts on those in bf16 ("Invalid binary instruction
  opcode copy", jax 0.10.2); TPU and GPU reduce bf16 natively."""
  dtypes = jax.tree.map(lambda a: a.dtype, p)
  wide = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, p)
  return wide, lambda w, *args: body(jax.tree.map(lambda a, d: a.astype(d), w, dtypes), *args)


def attention(p: dict, cfg: ModelConfig, ratio: int, x: jnp.ndarray, lengths: jnp.ndarray | None = None,
              tail: int = 0):
  """One attention layer over a prompt from position 0, its tokens split over the `sequence` axis.

  x: [B, S, D] (attn_norm output), lengths: [B] real tokens per row (default S; only the tails use it),
  `tail` (static): how many final positions per row to hand back -> (out [B, S, D], comp [B, n*L/m, c] or
  None, keys or None (all entries of the padded prompt, replicated over `sequence`), tail_kv [B, tail, K],
  tail_x [B, tail, D] (position lengths[b] - tail + j at row j; zeros before position 0; None for tail 0)).
  """
  mesh = sharding.active_mesh()[0]
  n = shards()
  B, S, _ = x.shape
  Sp = padded_length(cfg, S, n)
  if lengths is None:
    lengths = jnp.full((B,), S, jnp.int32)
  xp = jnp.pad(x, ((0, 0), (0, Sp - S), (0, 0))) if Sp != S else x
  seq = P(None, SEQUENCE_AXIS)
  out_specs = {"out": seq}
  if tail:
    out_specs.update(tail_kv=P(), tail_x=P())
  if ratio:
    out_specs["comp"] = P()
  if ratio == indexer.CSA_RATIO:
    out_specs["keys"] = P()
  # quantised weights enter dequantised (exact: fp8/fp4 times a power of two is a bf16 value): libtpu 0.0.42
  # aborts on the fp8 -> f32 convert of a QArray inside a partially manual shard_map ("Cannot find a valid
  # window"); one layer's attention weights, ~160 MB in bf16 for Flash, exist for the layer's duration
  p = jax.tree.map(lambda a: dense(a, cfg.dtype) if isinstance(a, QArray) else a, p,
                   is_leaf=lambda a: isinstance(a, QArray))
  cpu = mesh.devices.flat[0].platform == "cpu"
  body = partial(_shard_body, cfg=cfg, ratio=ratio, n=n, tail=tail, cpu_wire=cpu)
  if cpu:
    p, body = _bf16_weights_as_f32(p, body)
  f = jax.shard_map(body, mesh=mesh, in_specs=(P(), seq, P()), out_specs=out_specs, axis_names={SEQUENCE_AXIS},
                    check_vma=False)
  got = f(p, xp, lengths.astype(jnp.int32))
  return got["out"][:, :S], got.get("comp"), got.get("keys"), got.get("tail_kv"), got.get("tail_x")
