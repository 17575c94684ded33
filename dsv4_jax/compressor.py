"""KV compressor: gated softmax pooling of m tokens into one entry (docs/architecture.md §2.6).

Per token t (fp32):  C_t = wkv(x_t),  Z_t = wgate(x_t) + ape[t mod m].
HCA (no overlap): entry i = sum over its window's m tokens of softmax_t(Z)[ch] * C[ch], per channel.
CSA (m = 4, overlap): projections have 2c channels; entry i pools 2m slots: the first-half channels of
window i-1 (zeros / -inf for i = 0) and the second-half channels of window i.
Each entry is then normalised, rotated at position i*m and quantisation-simulated.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax import ops, quant
from dsv4_jax.config import ModelConfig
from dsv4_jax.linear import f32_linear
from dsv4_jax.norm import rms_norm
from dsv4_jax.params import ParamSpec
from dsv4_jax.rope import apply_rope, rope_angles

F32 = jnp.float32


def overlaps(ratio: int) -> bool:
  return ratio == 4


def compressor_specs(cfg: ModelConfig, ratio: int, c: int) -> dict:
  """wkv/wgate [coff*c, D] (bf16 in checkpoints, run in fp32), ape [m, coff*c] fp32, norm [c]."""
  cc = (2 if overlaps(ratio) else 1) * c
  return {
      "wkv": ParamSpec((cc, cfg.dim), ("comp_dim", "embed")),
      "wgate": ParamSpec((cc, cfg.dim), ("comp_dim", "embed")),
      "ape": ParamSpec((ratio, cc), ("ratio", "comp_dim"), "f32", ("normal", 0.5)),
      "norm": ParamSpec((c,), ("kv",), "f32", ("normal_plus_one", 0.1)),
  }


def project(p: dict, x: jnp.ndarray, ratio: int, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """x: [B,S,D], positions: [B,S] -> C, Z: [B,S,coff*c] fp32 (Z includes the ape bias)."""
  C = f32_linear(x, p["wkv"])
  Z = f32_linear(x, p["wgate"]) + p["ape"].astype(F32)[positions % ratio]
  return C, Z


def pool(C: jnp.ndarray, Z: jnp.ndarray, ratio: int, prev: tuple[jnp.ndarray, jnp.ndarray] | None = None):
  """Pools complete windows. C, Z: [B, n*m, coff*c], window-aligned -> entries [B, n, c] fp32.

  `prev` = (C, Z) [B, m, 2c] of the window before the first one (CSA only; default: none, i.e. 0 / -inf).
  """
  B, L, cc = C.shape
  n = L // ratio
  Cw, Zw = C.reshape(B, n, ratio, cc), Z.reshape(B, n, ratio, cc)
  if overlaps(ratio):
    c = cc // 2
    if prev is None:
      prev = (jnp.zeros((B, ratio, cc), F32), jnp.full((B, ratio, cc), -jnp.inf, F32))
    Cp = jnp.concatenate([prev[0][:, None], Cw[:, :-1]], axis=1)[..., :c]     # window i-1, first half
    Zp = jnp.concatenate([prev[1][:, None], Zw[:, :-1]], axis=1)[..., :c]
    Cw = jnp.concatenate([Cp, Cw[..., c:]], axis=2)                           # [B, n, 2m, c]
    Zw = jnp.concatenate([Zp, Zw[..., c:]], axis=2)
  w = jax.nn.softmax(Zw, axis=2)
  return jnp.sum(w * Cw, axis=2)


def finish(E: jnp.ndarray, p: dict, cfg: ModelConfig, ratio: int, entry_ids: jnp.ndarray, indexer: bool):
  """Normalise, rotate at the window's first position, quantisation-simulate.

  E: [B, n, c] fp32; entry_ids: [B, n] -> [B, n, c] in the compute dtype.
  """
  E = rms_norm(E.astype(cfg.dtype), p["norm"], cfg.norm_eps)
  cos, sin = rope_angles(cfg, True, entry_ids * ratio)
  E = apply_rope(E, cos, sin)
  if cfg.quant_sim:
    E = quant.indexer_fp4_sim(E) if indexer else quant.kv_fp8_sim(E, cfg.rope_head_dim)
  return E


def visible_count(t: jnp.ndarray, ratio: int) -> jnp.ndarray:
  """Number of compressed entries visible to query position t: entry i is visible iff i < (t+1)//m."""
  return (t + 1) // ratio


def state_rows(ratio: int, rollback: int = 0) -> int:
  """Rows of the compressor's ring of per-token projections: the incomplete window (< m tokens) and, with
  overlap (CSA), the complete window before it (m), plus `rollback` tokens that a later call may discard
  (speculative verification, dsv4_jax/speculative.py). A call starting at position L reads positions
  >= L - 2m + 1 (CSA) or >= L - m + 1 (HCA); a ring of R rows keeps them as long as no call wrote past
  L - 1 + rollback, so rolling the length back by up to `rollback` tokens is exact."""
  return (2 * ratio if overlaps(ratio) else ratio) + rollback


def state_shapes(ratio: int, c: int, rollback: int = 0) -> dict:
  """Per sequence: the ring of the last `state_rows` tokens' projections C and Z (ape bias included), each
  fp32 [R, coff*c]; token at position t sits in row t mod R."""
  cc = (2 if overlaps(ratio) else 1) * c
  R = state_rows(ratio, rollback)
  return {"C": (R, cc), "Z": (R, cc)}


def empty_state(ratio: int, c: int, lead: tuple, rollback: int = 0) -> dict:
  """The state (`state_shapes`, with leading axes `lead`) of a sequence that has seen no token. Rows are
  only read for positions the sequence holds, so the fill value is never used."""
  return {k: jnp.zeros(lead + s, F32) for k, s in state_shapes(ratio, c, rollback).items()}


def state_from_tokens(p: dict, x: jnp.ndarray, ratio: int, positions: jnp.ndarray, rollback: int = 0) -> dict:
  """The state (`state_shapes`) a sequence has after the tokens x [B, T, D] at `positions` [B, T] (its last
  ones, ascending; positions < 0 are none): their projections in the ring rows t mod R. What
  `compress_chunk` leaves after feeding the sequence up to positions[:, -1] from an empty state."""
  R = state_rows(ratio, rollback)
  x, positions = x[:, -R:], positions[:, -R:]
  C, Z = project(p, x, ratio, positions)
  state = empty_state(ratio, C.shape[-1] // (2 if overlaps(ratio) else 1), (x.shape[0],), rollback)
  b = jnp.arange(x.shape[0])[:, None]
  slot = jnp.where(positions >= 0, positions % R, R)                 # R: out of range, dropped
  return {"C": state["C"].at[b, slot].set(C, mode="drop"), "Z": state["Z"].at[b, slot].set(Z, mode="drop")}


def _take_rows(a: jnp.ndarray, rows: jnp.ndarray) -> jnp.ndarray:
  """a: [B, N, ...], rows: [B, M] (clipped into range) -> [B, M, ...]."""
  rows = jnp.clip(rows, 0, a.shape[1] - 1)
  return jnp.take_along_axis(a, rows.reshape(rows.shape + (1,) * (a.ndim - 2)), axis=1)


def compress_chunk(p: dict, cfg: ModelConfig, x: jnp.ndarray, ratio: int, start: jnp.ndarray,
                   lengths: jnp.ndarray, state: dict, indexer: bool = False):
  """Feeds `lengths[b]` tokens at positions start[b].. to a sequence's compressor: the one compression
  function of the model (whole prompts run it chunk by chunk, decoding one token at a time).

  x: [B,S,D] (rows right-padded), start/lengths: [B], state: the ring of earlier tokens' projections (see
  `state_shapes`; a row's positions < start[b] are read from it) -> (E [B, n_win, c] finished entries in the
  compute dtype, entry_ids [B, n_win], n_done [B] entries complete after the call, new state).
  E[:, j] is entry entry_ids[:, j]; only those with entry_ids < n_done are complete (the rest are partial
  windows, never to be stored). The state depends only on the positions written, so a caller may roll a
  sequence back (restart at a smaller `start`) by up to the ring's `rollback` rows. Memory: the
  projections of S + m tokens, fp32.
  """
  m, S = ratio, x.shape[1]
  R = state["C"].shape[1]
  positions = start[:, None] + jnp.arange(S)
  C, Z = project(p, x, m, positions)                                  # [B,S,cc]
  r = (start % m)[:, None]                                           # tokens of this window already seen
  w0 = start[:, None] - r                                            # first position of that window
  n_win = -(-(S + m - 1) // m)
  j = jnp.arange(n_win * m)[None]                                    # position w0 + j
  old = j < r                                                        # earlier tokens: from the ring
  valid = old | (j - r < lengths[:, None])

  i = jnp.arange(S)[None]                                            # the last min(len, R) new tokens
  keep = (i < lengths[:, None]) & (i >= lengths[:, None] - R)
  slot = jnp.where(keep, positions % R, R)                           # R: out of range, dropped
  b = jnp.arange(x.shape[0])[:, None]
  new_state = {"C": state["C"].at[b, slot].set(C, mode="drop"), "Z": state["Z"].at[b, slot].set(Z, mode="drop")}

  def take(ring, new):
    got = jnp.where(old[..., None], _take_rows(ring, (w0 + j) % R), _take_rows(new, j - r))
    return jnp.where(valid[..., None], got, 0.0)

  if S == 1 and R == m:      # one token, a ring of exactly one window (HCA decode): row j is position w0 + j,
    bufC, bufZ = (jnp.where(valid[..., None], new_state[k], 0.0) for k in ("C", "Z"))   # this token's just written
  else:
    bufC, bufZ = take(state["C"], C), take(state["Z"], Z)            # [B, n_win*m, cc], window-aligned
  prev = None
  if overlaps(m):                                                    # the complete window before w0
    rows = (w0 - m + jnp.arange(m)[None]) % R
    has = (w0 >= m)[..., None]
    prev = (jnp.where(has, _take_rows(state["C"], rows), 0.0), jnp.where(has, _take_rows(state["Z"], rows), -jnp.inf))
  E = ops.compress_pool(cfg, bufC, bufZ, m, prev)                    # [B, n_win, c]
  entry_ids = w0 // m + jnp.arange(n_win)[None]                      # [B, n_win]
  n_done = (start + lengths) // m                                    # entries complete after the call
  E = finish(E, p, cfg, m, entry_ids, indexer)
  return E, entry_ids, n_done, new_state


def compress(p: dict, cfg: ModelConfig, x: jnp.ndarray, ratio: int, indexer: bool = False,
             chunk: int | None = None, start=0, state: dict | None = None) -> jnp.ndarray:
  """All entries of x [B,S,D] -> [B, n, c], entry start/m + i at row i; rows i < S // m are the complete
  windows (the rest are partial, and never visible).

  x starts at position `start` (a multiple of m; may be traced) after the tokens whose projections `state`
  holds (default: a sequence from position 0, no state). Runs `compress_chunk` over chunks of `chunk`
  tokens (default cfg.query_chunk, rounded up to a multiple of m) carrying the state, so the fp32
  projections exist for one chunk at a time.
  """
  B, S, _ = x.shape
  Q = -(-(chunk or cfg.query_chunk) // ratio) * ratio
  c = p["norm"].shape[0]
  state = empty_state(ratio, c, (B,)) if state is None else state
  first = jnp.full((B,), start, jnp.int32)
  if S <= Q:
    return compress_chunk(p, cfg, x, ratio, first, jnp.full((B,), S, jnp.int32), state, indexer)[0]
  n = -(-S // Q)
  xs = jnp.moveaxis(jnp.pad(x, ((0, 0), (0, n * Q - S), (0, 0))).reshape(B, n, Q, -1), 1, 0)

  def body(state, ic):
    i, xc = ic
    n_c = jnp.full((B,), jnp.clip(S - i * Q, 0, Q), jnp.int32)              # tokens of x in this chunk
    E, _, _, state = compress_chunk(p, cfg, xc, ratio, first + i * Q, n_c, state, indexer)
    return state, E[:, : Q // ratio]

  _, E = jax.lax.scan(body, state, (jnp.arange(n), xs))                # [n, B, Q/m, c]
  return jnp.moveaxis(E, 0, 1).reshape(B, n * Q // ratio, c)
