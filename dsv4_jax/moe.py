"""Mixture of experts: sqrt-softplus router, hash routing, clamped SwiGLU experts, one shared expert
(docs/architecture.md §2.10).

    s   = sqrt(softplus(x @ gate^T))                         [T, E] fp32
    idx = tid2eid[token]  (hash layers)  |  top-k(s + bias)  (bias only chooses)
    w   = s[idx] / sum(s[idx]) * route_scale
    y   = sum_k w_k * expert_{idx_k}(x) + shared(x)          (weight applied before w2, in fp32)

Routed experts (`routed_experts`):
* Order: a token's k expert outputs (each rounded to the compute dtype, as the reference's bf16 GEMM output)
  are added in fp32 one after the other in ascending expert id, then the shared expert: the reference's
  `for e in 0..E-1: y[tokens of e] += y_e; y += shared(x)` (§2.10, §4.4). The result does not depend on the
  order in which the slots come.
* Padding: rows with `valid` False (padded positions of a batch) are not routed at all: they are not
  hash-routed (their token id is replaced by 0 before the tid2eid lookup), take no row of any expert's
  grouped matmul and read no expert in the decode path; their output is 0.
* Many (token, slot) pairs (prefill): the N = T*k pairs are sorted by expert and run as grouped matmuls
  (`jax.lax.ragged_dot`). A stored weight stack the matmul cannot use as it is (a quantised `QArray`, or
  another dtype) is dequantised G = EXPERT_GROUP experts at a time inside a `lax.scan`, never as a whole:
  the temp memory of one MoE layer is one group's dense weight, G*F*D values of the compute dtype (up to
  2*G*F*D fp32 more where XLA does not fuse the dequantisation), plus O(N*max(F, D)) fp32 activations
  (on CPU, where ragged_dot is a masked dense dot, also N*G*max(F, D)); it does not grow with E.
* Fewer pairs than experts (decode): each distinct expert the batch chose is read once (in place where the
  stack is stored in the compute dtype) and dequantised once, however many tokens chose it, DECODE_GROUP at
  a time: at most DECODE_GROUP experts' stored bytes copied (a packed stack) and dense weights
  (3*DECODE_GROUP*F*D values), and [N, T, max(F, D)] fp32 activations; groups of slots that no expert
  fills read nothing.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flax import struct

from dsv4_jax import quant, sharding
from dsv4_jax.config import ModelConfig
from dsv4_jax.linear import f32_linear, fp8_linear
from dsv4_jax.params import ParamSpec
from dsv4_jax.qarray import QArray, planar_operands

F32 = jnp.float32
EXPERT_GROUP = 16      # experts dequantised together in the grouped path (G)
DECODE_GROUP = 4       # chosen experts dequantised together in the decode path


def moe_specs(cfg: ModelConfig, hash_routed: bool) -> dict:
  E, F, D, k = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim, cfg.n_activated_experts
  gate = {"weight": ParamSpec((E, D), ("experts", "embed"))}
  if hash_routed:
    gate["tid2eid"] = ParamSpec((cfg.vocab_size, k), ("vocab", "topk"), "int", ("hash", E))
  else:
    gate["bias"] = ParamSpec((E,), ("experts",), "f32", ("normal", 0.1))
  specs = {
      "gate": gate,
      "experts": {
          "w1": ParamSpec((E, F, D), ("experts", "expert_mlp", "embed")),
          "w2": ParamSpec((E, D, F), ("experts", "embed", "expert_mlp")),
          "w3": ParamSpec((E, F, D), ("experts", "expert_mlp", "embed")),
      },
  }
  if cfg.n_shared_experts:
    Fs = F * cfg.n_shared_experts
    specs["shared_experts"] = {
        "w1": ParamSpec((Fs, D), ("mlp", "embed")),
        "w2": ParamSpec((D, Fs), ("embed", "mlp")),
        "w3": ParamSpec((Fs, D), ("mlp", "embed")),
    }
  return specs


def affinity(p: dict, x: jnp.ndarray) -> jnp.ndarray:
  """x: [T,D] -> s = sqrt(softplus(x @ gate^T)): [T,E] fp32."""
  return jnp.sqrt(jax.nn.softplus(f32_linear(x, p["weight"])))


def route(p: dict, cfg: ModelConfig, x: jnp.ndarray, token_ids: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """x: [T,D], token_ids: [T] -> expert ids [T,k] int32, combination weights [T,k] fp32."""
  s = affinity(p, x)
  if "tid2eid" in p:
    idx = p["tid2eid"][token_ids].astype(jnp.int32)
  else:
    _, idx = jax.lax.top_k(s + p["bias"].astype(F32), cfg.n_activated_experts)
  w = jnp.take_along_axis(s, idx, axis=-1)
  w = w / jnp.sum(w, axis=-1, keepdims=True) * cfg.route_scale
  return idx, w


@jax.custom_jvp
def sort_slots(idx: jnp.ndarray, w: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """idx/w: [T, k] -> both with each token's slots in ascending expert id (stable): one sort of the pair, no
  gather (XLA:TPU's small gathers cost ~0.5 MB each by its count). The weights' derivative moves their
  tangent by a one-hot select over the k slots (`_sort_slots_jvp`), not the sort's own rule, whose gradient
  is a scatter that XLA:CPU's SPMD partitioner crashed on (sequence:4,expert:2, tests/test_sharded_context.py)."""
  return jax.lax.sort((idx, w), dimension=-1, num_keys=1, is_stable=True)


@sort_slots.defjvp
def _sort_slots_jvp(primals, tangents):
  idx, w = primals
  k = idx.shape[-1]
  idx_s, w_s, perm = jax.lax.sort((idx, w, jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), idx.shape)),
                                  dimension=-1, num_keys=1, is_stable=True)
  w_dot = jnp.sum(jnp.where(perm[..., None] == jnp.arange(k), tangents[1][..., None, :], 0), axis=-1)
  return (idx_s, w_s), (np.zeros(idx_s.shape, jax.dtypes.float0), w_dot.astype(w_s.dtype))


def swiglu(g: jnp.ndarray, u: jnp.ndarray, limit: float) -> jnp.ndarray:
  """silu(min(g, limit)) * clip(u, -limit, limit) in fp32; limit 0 = no clamp (as the reference)."""
  g, u = g.astype(F32), u.astype(F32)
  if limit > 0:
    u = jnp.clip(u, -limit, limit)
    g = jnp.minimum(g, limit)
  return jax.nn.silu(g) * u


def shared_expert(p: dict, cfg: ModelConfig, x: jnp.ndarray) -> jnp.ndarray:
  h = swiglu(fp8_linear(x, p["w1"], cfg.quant_sim), fp8_linear(x, p["w3"], cfg.quant_sim), cfg.swiglu_limit)
  return fp8_linear(h.astype(x.dtype), p["w2"], cfg.quant_sim)


@struct.dataclass
class Stacked:
  """A scanned layer group's routed experts at one repetition (inference under expert parallelism, see
  dsv4_jax/expert_parallel.py): `tree` [reps, E, ...] as stored, `rep` the int32 index. `get()` is tree[rep];
  the decode path reads the experts it chose from the stack (`_gathered_experts`), never copying the
  repetition's whole stack (which `get()` may: the grouped path uses it; slicing each group of experts from
  the stack inside its loop asked XLA:TPU for 42.6 G of temporaries for Flash's 1M prefill on v6e-8)."""
  tree: dict
  rep: jax.Array

  def get(self) -> dict:
    return jax.tree.map(lambda a: a[self.rep], self.tree)


def _expert_at(a: jax.Array, e: jax.Array, rep: jax.Array | None) -> jax.Array:
  """Expert e of a stacked leaf ([E, ...], or [reps, E, ...] at repetition rep): a dynamic slice."""
  return a[e] if rep is None else a[rep, e]


def take_experts(tree: dict, ids: jnp.ndarray, rep: jax.Array | None = None) -> dict:
  """Experts `ids` [G] of a stack (leaves [E, ...], or [reps, E, ...] with `rep`), copied out as stored:
  [G, ...] leaves. Expert by expert (a loop of dynamic slices of the stack): XLA:TPU lowers a gather of such
  rows (an fp4 expert is [F, D/2] bytes) by copying its operand in column pieces, the (repetition's) whole
  local expert stack every time. Leaves whose rows are not whole 128-lane tiles (e8m0 scales: Flash's 32,
  Pro's 224 per row) are gathered: in a loop XLA:TPU relays their whole stack out (it lays such arrays out
  differently)."""
  wide = lambda a: a.shape[-1] % 128 == 0
  looped = jax.lax.map(lambda u: jax.tree.map(lambda a: _expert_at(a, u, rep) if wide(a) else None, tree), ids)
  return jax.tree.map(lambda a, v: v if wide(a) else (a if rep is None else a[rep])[ids], tree, looped,
                      is_leaf=lambda x: x is None)


def _expert_mlp(p: dict, cfg: ModelConfig, xs: jnp.ndarray, wts: jnp.ndarray, matmul, reduce=None) -> jnp.ndarray:
  """Clamped SwiGLU, one expert application per row: xs [..., D], wts [...] routing weights,
  matmul(a, w) applies each row's expert weight w [E, out, in] -> [..., D] in xs.dtype. reduce (optional) sums
  w2's fp32 output over the shards of a split F (tensor-parallel experts, dsv4_jax/expert_parallel.py), before
  the cast: each shard then holds F/n of the inner dimension and everything before w2 is per element of F."""
  if cfg.quant_sim:
    xs = quant.act_quant(xs, 128)
  h = swiglu(matmul(xs, p["w1"]), matmul(xs, p["w3"]), cfg.swiglu_limit)
  h = (h * wts[..., None]).astype(xs.dtype)
  if cfg.quant_sim:
    h = quant.act_quant(h, 128)
  y = matmul(h, p["w2"])
  return (y if reduce is None else reduce(y)).astype(xs.dtype)


def _group_size(n_experts: int, group: int) -> int:
  """The largest divisor of n_experts that is at most `group`."""
  return max(g for g in range(1, max(1, min(group, n_experts)) + 1) if n_experts % g == 0)


def _grouped(x: jnp.ndarray, w, group_sizes: jnp.ndarray, group: int = EXPERT_GROUP) -> jnp.ndarray:
  """Grouped matmul. x: [N, in], rows sorted by expert, the first sum(group_sizes) rows used; w: [E, out, in]
  -> [N, out] fp32, 0 on the unused rows.

  A plain stack already in x.dtype is one `ragged_dot` on the stored weights. Any other stack (a QArray, or
  another dtype) is dequantised G = `_group_size(E, group)` experts at a time in a `lax.scan` over the E/G
  groups; each step rotates its group's rows to the top, runs `ragged_dot` on them and rotates back. Memory
  beyond x and the result: one group's operand G*out*in in x.dtype (at most 2*G*out*in fp32 more where XLA
  does not fuse the dequantisation), plus [N, in] and [N, out] fp32 working copies (on CPU, where ragged_dot
  is a masked dense dot, also its [N, G*in] masked input); never [E, out, in].
  """
  if not isinstance(w, QArray) and w.dtype == x.dtype:
    return jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2), group_sizes, preferred_element_type=F32)
  E, out = group_sizes.shape[0], w.shape[1]
  G = _group_size(E, group)
  wg = jax.tree.map(lambda a: a.reshape(E // G, G, *a.shape[1:]), w)      # QArray: values and scales
  sizes = group_sizes.reshape(E // G, G)
  rows = jnp.sum(sizes, axis=1)
  starts = jnp.cumsum(rows) - rows                                         # first row of each group

  def step(acc, xs):
    wi, si, start = xs
    xi, wd = planar_operands(jnp.roll(x, -start, axis=0), wi, x.dtype)
    yi = jax.lax.ragged_dot(xi, jnp.swapaxes(wd, 1, 2), si, preferred_element_type=F32)   # rows past sum(si): 0
    return acc + jnp.roll(yi, start, axis=0), None                         # each row is in one group

  acc, _ = jax.lax.scan(step, jnp.zeros((x.shape[0], out), F32), (wg, sizes, starts))
  return acc


def _expert_key(idx: jnp.ndarray, valid: jnp.ndarray, n_experts: int) -> jnp.ndarray:
  """[T*k] expert id of each (token, slot) pair; n_experts (no expert) for the pairs of invalid tokens."""
  return jnp.where(valid[:, None], idx, n_experts).reshape(-1)


def dispatch(idx: jnp.ndarray, valid: jnp.ndarray, n_experts: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Sorting of the (token, slot) pairs for the grouped matmuls. idx: [T,k], valid: [T] ->
  order [T*k] (pair t*k+j; by ascending expert, stable; pairs of invalid tokens last) and
  group_sizes [E] int32 (valid pairs per expert: the invalid ones are in no group)."""
  key = _expert_key(idx, valid, n_experts)
  order = jnp.argsort(key, stable=True)
  group_sizes = jnp.zeros((n_experts,), jnp.int32).at[key].add(1, mode="drop")
  return order, group_sizes


def chosen_experts(idx: jnp.ndarray, valid: jnp.ndarray, n_experts: int
                   ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """The distinct experts the valid tokens chose. idx: [T,k], valid: [T] -> ids [U] int32 ascending, real [U]
  bool, and slot [T,k] int32 (the position in ids of each pair's expert; an invalid pair's is >= the number of
  real ids), U = min(T*k, n_experts) (no more can be distinct; the expert-parallel decode path all-gathers n*T
  tokens, so T*k can exceed a shard's n_experts). The spare slots repeat the largest chosen id (real False),
  so that reading `ids` touches no other expert.
  By comparisons of the N = T*k pairs with each other ([N, N], decode sizes), not `jnp.unique`: its sort,
  cumulative sum and scatter are each an op of their own (1.08 MB by XLA:TPU's `cost_analysis` at N = 2)."""
  key = _expert_key(idx, valid, n_experts)                                      # [N]
  N, U = key.shape[0], min(key.shape[0], n_experts)
  before = jnp.arange(N)[None, :] < jnp.arange(N)[:, None]                      # [i, j]: pair j before pair i
  first = (key < n_experts) & ~jnp.any((key[None, :] == key[:, None]) & before, axis=1)   # [N]
  slot = jnp.sum((key[None, :] < key[:, None]) & first[None, :], axis=1, dtype=jnp.int32)  # distinct ids below
  ids = jnp.sum(jnp.where(first[None, :] & (slot[None, :] == jnp.arange(U)[:, None]), key[None, :], 0), axis=1)
  real = jnp.arange(U) < jnp.sum(first)
  ids = jnp.where(real, ids, jnp.max(jnp.where(real, ids, 0))).astype(jnp.int32)
  return ids, real, slot.reshape(idx.shape)


def _in_place(tree, dtype) -> bool:
  """Whether the decode path reads each chosen expert in place in its stack: every leaf a plain array stored in
  the matmul's dtype, so that the dynamic slice of one expert is the matmul's operand (XLA fuses it: the
  expert is read once, where it lies). A stack that is decoded first (a QArray, fp8) has its chosen experts'
  stored bytes copied out instead: sliced in place, XLA:TPU lays the decoded operand out for the matmul and
  carries that layout back through the slice to the stack, relaying the whole stack out (Flash's fp4
  experts: 42 G of temporaries for the 1M decode on v6e-8)."""
  leaves = jax.tree.leaves(tree, is_leaf=lambda a: isinstance(a, QArray))
  return all(not isinstance(a, QArray) and a.dtype == jnp.dtype(dtype) for a in leaves)


def _gathered_experts(p: dict, cfg: ModelConfig, x: jnp.ndarray, idx: jnp.ndarray, w: jnp.ndarray,
                      valid: jnp.ndarray, n_experts: int | None = None, reduce=None) -> jnp.ndarray:
  """Decode path. x: [T,D], idx/w: [T,k] (a token's slots in ascending expert id), valid [T] -> per-slot
  expert outputs [T,k,D] in x.dtype. `p` holds n_experts (default cfg.n_routed_experts) experts (a dict, or a
  scanned group's `Stacked` repetition); a pair whose idx is n_experts chooses none of them (its output is
  garbage: the caller masks it; the expert-parallel decode path marks the pairs of other shards' experts so).

  The distinct chosen experts (U = min(T*k, n_experts) static slots, the spare ones repeating the largest id)
  are each read once, dequantised and applied to every token ([T] rows per expert; pairs nobody chose have
  weight 0): U*T expert applications instead of T*k, in exchange for reading each chosen expert once instead
  of once per (token, slot); at decode sizes the weight reads dominate. A token that lists one expert twice
  (never in top-k or the released tid2eid tables) gets it once, with the summed weight.
  The U experts are applied DECODE_GROUP at a time (a `lax.map` over ceil(U / DECODE_GROUP) groups, the last
  padded with weight-0 repeats), so at most DECODE_GROUP experts are dequantised at once: Flash at batch 4 on
  a v5p chip of expert:4 holds U = 24 of them, 384 MiB per matrix in bf16 when all are dequantised together.
  Four at a time rather than eight: Flash's decode on v6e-8 (expert:4,tensor:2, batch 1) needed 0.18 / 0.25
  GiB of temporaries at 128K / 1M tokens against 0.27 / 0.46 (two: the same as four), Pro's on v6e-128 at
  1M 0.23 against 0.35.
  The per-slot outputs are picked from the [U, T, D] results by a one-hot select and sum (T*k*U*D work,
  small: T*k < n_experts, and under expert parallelism U is at most a shard's experts; a one-hot matmul
  instead left the toy decode step of bench/decode_memory.py 30 KB more temporaries, a gather 0.53 MB more
  traffic by XLA:TPU's count).
  How an expert is read (`_in_place`):
  * a stack stored in x.dtype: in place, each expert's dynamic slice the operand of its matmuls (the toy
    decode layer of bench/decode_memory.py on v5p, HBM-only: 0.52 MB of traffic for 0.39 MB of chosen bf16
    experts, against 3.96 MB when they were gathered into a copy first);
  * a packed stack (fp4 / fp8 QArray, another dtype): a group's stored bytes copied out first (fp4: a
    quarter of their bf16 bytes), expert by expert (`take_experts`), then dequantised and applied as one
    batched matmul.
  The U slots are static, the real ones first: a group with no real slot is skipped (`lax.cond`), so it
  reads no expert. Under expert parallelism a shard's all-gathered pairs mostly choose other shards'
  experts (Flash at batch 1 on expert:4: U = 24 slots, at most 6 real), and each shard reads the groups it
  needs, not U experts. Flash's decode on v6e-8 (expert:4,tensor:2, batch 1) then needs 0.26 GiB of
  temporaries at 128K and 1M tokens (0.18 / 0.25 when all U were copied out at once before the loop).
  """
  T, k = idx.shape
  ids, real, slot = chosen_experts(idx, valid, n_experts or cfg.n_routed_experts)   # [U], [U], [T,k]
  U = ids.shape[0]
  G = min(U, DECODE_GROUP)
  pad = -U % G
  ids_p = jnp.concatenate([ids, jnp.broadcast_to(ids[-1:], (pad,))])            # [U + pad]
  real_p = jnp.concatenate([real, jnp.zeros((pad,), bool)])
  mine = (slot[..., None] == jnp.arange(U + pad)) & valid[:, None, None]        # [T,k,U+pad]: one-hot
  wts = jnp.sum(jnp.where(mine, w[..., None], 0.0), axis=1).T                   # [U+pad,T]

  stacked = isinstance(p, Stacked)
  tree = p.tree if stacked else p
  rep = p.rep if stacked else None
  in_place = _in_place(tree, x.dtype)
  matmul = lambda a, wt: jnp.einsum("...ti,...oi->...to", *planar_operands(a, wt, a.dtype),
                                    preferred_element_type=F32)

  def group(g_ids, g_wts):                                                      # G experts -> [G,T,D]
    if in_place:                                                                # one expert after the other
      return jnp.stack([_expert_mlp(jax.tree.map(lambda a: _expert_at(a, g_ids[j], rep), tree), cfg, x, g_wts[j],
                                    matmul, reduce) for j in range(G)])
    chosen = take_experts(tree, g_ids, rep)                                     # [G, out, in]: one batched matmul
    return _expert_mlp(chosen, cfg, jnp.broadcast_to(x, (G,) + x.shape), g_wts, matmul, reduce)

  def maybe(args):                                  # a group with no real slot (all spare) reads no expert
    g_ids, g_wts, live = args
    return jax.lax.cond(live, group, lambda *_: jnp.zeros((G, T, x.shape[-1]), x.dtype), g_ids, g_wts)
  n = (U + pad) // G
  y = group(ids_p, wts) if n == 1 else jax.lax.map(
      maybe, (ids_p.reshape(n, G), wts.reshape(n, G, T), real_p[::G])).reshape(n * G, T, -1)   # [U+pad,T,D]
  out = jnp.sum(jnp.where(mine[..., None], jnp.swapaxes(y, 0, 1)[:, None], 0), axis=2)   # [T,k,D], exact
  first = jnp.concatenate([jnp.ones((T, 1), bool), idx[:, 1:] != idx[:, :-1]], axis=1)
  return jnp.where(first[..., None], out, 0)


def _grouped_experts(p: dict, cfg: ModelConfig, x: jnp.ndarray, idx: jnp.ndarray, w: jnp.ndarray,
                     valid: jnp.ndarray, group: int) -> jnp.ndarray:
  """Prefill path: pairs sorted by expert, grouped matmuls. Returns per-slot outputs [T,k,D] in x.dtype."""
  T, k = idx.shape
  order, group_sizes = dispatch(idx, valid, cfg.n_routed_experts)
  matmul = lambda a, wt: _grouped(a, wt, group_sizes, group)
  y = _expert_mlp(p, cfg, x[order // k], w.reshape(-1)[order], matmul)
  return jnp.zeros_like(y).at[order].set(y).reshape(T, k, -1)


def routed_experts(p: dict, cfg: ModelConfig, x: jnp.ndarray, idx: jnp.ndarray, w: jnp.ndarray,
                   valid: jnp.ndarray | None = None, group: int = EXPERT_GROUP) -> jnp.ndarray:
  """x: [T,D], idx/w: [T,k], valid: [T] bool (None = all) -> sum_k w * expert(x): [T,D] fp32; 0 on invalid
  rows. Each expert's output is rounded to x.dtype (the reference's bf16 GEMM output), then the k of a token
  are added in ascending expert id, one after the other, in fp32 (whatever the slot order of idx).

  Fewer (token, slot) pairs than experts (decode): each distinct chosen expert is read once
  (`_gathered_experts`). Otherwise grouped matmuls over the pairs sorted by expert, a quantised stack
  dequantised `group` experts at a time (`_grouped`). Same math either way.
  """
  T, k = idx.shape
  if valid is None:
    valid = jnp.ones((T,), bool)
  idx, w = sort_slots(idx, w)                                        # slots in ascending expert id
  if T * k < cfg.n_routed_experts:
    y = _gathered_experts(p, cfg, x, idx, w, valid)
  else:
    y = _grouped_experts(p.get() if isinstance(p, Stacked) else p, cfg, x, idx, w, valid, group)
  y = jnp.where(valid[:, None, None], y, 0)
  acc = y[:, 0].astype(F32)
  for j in range(1, k):                                              # a fixed chain of adds, in id order
    acc = acc + y[:, j].astype(F32)
  return acc


class MoEStats(NamedTuple):
  """What training needs from one MoE layer's routing (docs/architecture.md §6).

  load:    [E] fp32, (token, slot) pairs of the valid tokens routed to each expert, summed over the batch:
           the input of the aux-loss-free bias update.
  balance: [B] fp32, V3's sequence-wise balance statistic sum_i f_i P_i of each sequence, with
           f_i = E / (k T) * #{t: i chosen by t} and P_i = mean_t s_ti / sum_j s_tj over its T valid tokens.
  """
  load: jax.Array
  balance: jax.Array
  dropped: jax.Array | None = None   # expert-parallel only: (token, slot) pairs dropped for capacity


def moe_stats(s: jnp.ndarray, idx: jnp.ndarray, valid: jnp.ndarray) -> MoEStats:
  """s: [B,S,E] affinities, idx: [B,S,k] chosen experts, valid: [B,S] bool -> MoEStats.

  Only P carries a gradient (through s); f is a count, as in V3."""
  B, S, E = s.shape
  k = idx.shape[-1]
  v = valid.astype(F32)
  counts = jnp.zeros((B, E), F32).at[jnp.arange(B)[:, None, None], idx].add(
      jnp.broadcast_to(v[..., None], idx.shape))                                       # [B,E]
  n = jnp.maximum(jnp.sum(v, axis=-1), 1.0)                                            # [B] valid tokens
  f = counts * (E / k) / n[:, None]                                                    # [B,E]
  p = jnp.sum(s / jnp.sum(s, axis=-1, keepdims=True) * v[..., None], axis=1) / n[:, None]   # [B,E]
  return MoEStats(load=jnp.sum(counts, axis=0), balance=jnp.sum(f * p, axis=-1))


def moe(p: dict, cfg: ModelConfig, x: jnp.ndarray, token_ids: jnp.ndarray,
        valid: jnp.ndarray | None = None, stats: bool = False):
  """x: [B,S,D] (ffn_norm output), token_ids: [B,S], valid: [B,S] bool (None = all; False = a padded
  position: not routed, not hash-looked-up, output 0) -> [B,S,D] in x.dtype; with `stats`, also the
  layer's `MoEStats` (training)."""
  B, S, D = x.shape
  xt = x.reshape(B * S, D)
  v = jnp.ones((B * S,), bool) if valid is None else jnp.asarray(valid, bool).reshape(B * S)
  ids = jnp.where(v, token_ids.reshape(-1), 0)                       # a pad id never indexes tid2eid
  idx, w = route(p["gate"], cfg, xt, ids)
  mesh, _ = sharding.active_mesh()
  experts = p["experts"]                     # a dict, or a Stacked (a scanned group under expert parallelism)
  if mesh is not None and "expert" in mesh.axis_names and mesh.shape["expert"] > 1:
    from dsv4_jax import expert_parallel                             # imports this module
    y, ep = expert_parallel.routed_experts(experts, cfg, xt, idx, w, v, mesh)
  else:
    y, ep = routed_experts(experts, cfg, xt, idx, w, v), None
  if "shared_experts" in p:
    y = y + shared_expert(p["shared_experts"], cfg, xt).astype(F32)
  y = jnp.where(v[:, None], y, 0).astype(x.dtype).reshape(B, S, D)
  if not stats:
    return y
  s = affinity(p["gate"], xt)                                        # the router's own s (CSE'd by XLA)
  st = moe_stats(s.reshape(B, S, -1), idx.reshape(B, S, -1), v.reshape(B, S))
  return y, (st if ep is None else st._replace(load=ep.load, dropped=ep.dropped))   # load psummed over the mesh
