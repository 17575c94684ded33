"""Expert-parallel routed experts: the MoE's routed part inside `jax.shard_map` over the mesh's `expert` axis.

`moe.moe` calls `routed_experts` here instead of `moe.routed_experts` when the active mesh
(`sharding.active_mesh()`) has an `expert` axis of size > 1. Routing (`moe.route`), the shared expert and
`moe_stats` stay outside, unchanged; the result equals the single-device one (the same per-row math, see
"Equality" below).

Layout
* Experts: w1/w2/w3 (plain arrays or `QArray`s: values and scales alike) split on their leading expert axis
  over `expert` (the rules table's ("experts", "expert")): shard j holds experts [j*E/n, (j+1)*E/n). No
  expert weight is ever gathered. On a mesh with a `tensor` axis the experts are also split there on their
  inner dimension F (the rules table's ("expert_mlp", "tensor"): w1/w3 [E, F, D] on F, w2 [E, D, F] on F)
  and stay so inside: each tensor shard applies F/t of every expert (the clamped SwiGLU and the routing
  weight are per element of F) and w2's fp32 partial outputs are `psum`med over `tensor` before the cast
  (`moe._expert_mlp`'s reduce), so no expert weight is gathered over `tensor` either (`tensor_split`; where
  F does not split evenly into whole quantisation blocks, the weights are gathered over `tensor` instead).
* Tokens: the B*S rows are flattened and split over ("data", "sequence", "expert") (those present with
  size > 1), data-major: the batch rule's `data` split, the context-parallel `sequence` split, and each
  group's tokens further split over its expert shards (as MaxText). Rows are padded (valid False) to a
  multiple of that count. Tokens are replicated over `tensor` (each tensor shard applies its slice of F to
  the same rows, see Layout). The exchange runs within each (data, sequence) group over `expert`.

Per shard (T_l tokens, N = T_l*k (token, slot) pairs, n = expert-axis size, E_l = E/n local experts):
1. pairs sorted by expert (stable; pairs of padded tokens last and never sent): contiguous chunks per
   destination shard; send sizes [n] all-gathered over `expert` into S[sender, receiver];
2. receiver j's buffer holds C rows (the capacity, below), packed sender-major: sender i's chunk starts at
   sum_{i'<i} S[i', j] and keeps its first min(S[i,j], C - start) rows (first sender wins; a chunk's pairs
   are in ascending expert id, so its highest experts' pairs are dropped first);
3. `ragged_all_to_all` of the rows (and of their routing weight and local expert id, [N, 2] fp32);
4. the received rows sorted by local expert, `moe._expert_mlp` with `moe._grouped` (ragged_dot, the same
   clamped SwiGLU, weight-before-w2 and fp4/fp8 dequantisation `EXPERT_GROUP` experts at a time);
5. the reverse `ragged_all_to_all` (the transposed sizes) back into the pair order; dropped pairs stay 0;
6. the combine exactly as `moe.routed_experts`: each slot's output (in x.dtype) added in fp32 in ascending
   expert id.
Load (valid pairs per expert, before any drop) and the dropped pair count are `psum`med over the token axes
(data, expert): global numbers, returned in `EPStats` (moe puts them into `MoEStats.load/.dropped`).

Capacity: C = min(n*T_l*k, ceil(capacity_factor * T_l*k)) rows per shard (`capacity_rows`), i.e.
capacity_factor times the balanced share (the expert group's n*T_l*k pairs over n shards). n*T_l*k (every
pair of the group on one shard) is the dropless bound; `capacity_factor=None` (the default) uses it, so
inference is dropless by default. Smaller factors bound the buffers ([C, D] in and out per shard) and drop
the overflow pairs, which are counted (`EPStats.dropped`, per (token, slot) pair), never silently lost.

Equality: the per-row expert math is `moe._expert_mlp` on the same rows; only the batching of the grouped
matmul differs (which other rows share a ragged_dot), so results match `moe.routed_experts` to rounding
level (fp32 on CPU, measured: bit-identical on the grouped path; ~6e-7 relative against moe's decode-size
path `_gathered_experts` (T*k < E), an einsum instead of ragged_dot). The accumulation order over a token's experts is the
same ascending-id chain.

The exchange: XLA:CPU does not implement ragged-all-to-all (jax issue 34755). `ragged_all_to_all` here
takes `impl`: "native" (jax.lax.ragged_all_to_all) or "emulate" (padded `all_to_all` plus scatter, the same
contract for one update per peer); the default (None, or `options(impl=...)`) picks "emulate" only when the
mesh's devices are CPUs, "native" otherwise (TPU/GPU, abstract meshes). Tests force "native" to lower for TPU.

Few tokens (decode): when the group's n*T_l*k pairs are fewer than the experts (`decode_path`, the rule
`moe.routed_experts` uses on one device), two ragged exchanges of a handful of rows cost more in latency than
they save; instead the group's tokens are all-gathered over `expert` (n*T_l rows), every shard applies its
local experts to the pairs that chose them (`moe._gathered_experts`: each chosen expert read once), and the
per-slot outputs are reduce-scattered back (`_gather_body`). No capacity, nothing dropped.

A scanned layer group (inference): the experts enter the `shard_map` as the whole stack [reps, E, ...] with
the repetition's index (`moe.Stacked`, built by `transformer.run_layers` when caches are given), and the
shard indexes its own slice inside (the decode path reads only its chosen experts from the stack,
`moe.take_experts`). A layer's expert slice passed in instead is an operand XLA must materialise at the
`shard_map` boundary: every MoE layer of every step copied its local expert stack (Flash's 1M decode on
v6e-8, expert:4,tensor:2: 6 x 128 MiB; temporaries 1.05 -> 0.46 GiB). Training keeps the sliced experts
(a closed-over stack's gradient would be a whole [reps, ...] buffer accumulated on every iteration).

Gradients flow through the emulation and the native op's transpose rule as jax defines them (no custom
VJP); tests/test_expert_parallel.py checks them against one device.
"""
from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv4_jax import moe
from dsv4_jax.config import ModelConfig

F32 = jnp.float32
EXPERT_AXIS = "expert"
TOKEN_AXES = ("data", "sequence", "expert")

_opts = {"capacity_factor": None, "impl": None, "path": None}


@contextlib.contextmanager
def options(**kw) -> Iterator[None]:
  """Overrides the defaults of `routed_experts` (capacity_factor, impl, path) for calls made inside (e.g. through
  `moe.moe`, which takes no such arguments)."""
  unknown = set(kw) - set(_opts)
  if unknown:
    raise ValueError(f"unknown expert_parallel options {sorted(unknown)}; expected some of {sorted(_opts)}")
  prev = dict(_opts)
  _opts.update(kw)
  try:
    yield
  finally:
    _opts.clear()
    _opts.update(prev)


class EPStats(NamedTuple):
  load: jax.Array       # [E] fp32 valid (token, slot) pairs routed to each expert, summed over the mesh
  dropped: jax.Array    # [] int32 pairs dropped for capacity, summed over the mesh


def active(mesh) -> bool:
  return mesh is not None and EXPERT_AXIS in mesh.axis_names and mesh.shape[EXPERT_AXIS] > 1


def capacity_rows(tokens_per_shard: int, k: int, n_shards: int, capacity_factor: float | None) -> int:
  """Rows of each shard's receive buffer: capacity_factor * T_l * k, at most the dropless n * T_l * k."""
  full = n_shards * tokens_per_shard * k
  if capacity_factor is None:
    return full
  return max(1, min(full, math.ceil(capacity_factor * tokens_per_shard * k)))


def _platform_impl(mesh) -> str:
  devices = getattr(mesh, "devices", None)
  if devices is None or not hasattr(devices, "flat"):
    return "native"                                                    # abstract mesh: lowering for a target
  return "emulate" if all(d.platform == "cpu" for d in devices.flat) else "native"


def _excl_cumsum(a, axis=-1):
  return jnp.cumsum(a, axis=axis) - a


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
  """`jax.lax.ragged_all_to_all`'s contract (one update per peer: offset/size vectors of the axis size) with
  a padded `all_to_all` plus a scatter, for backends without the op (XLA:CPU). Chunk j of `operand`
  (rows input_offsets[j] + [0, send_sizes[j])) lands in peer j's `output` at its rows output_offsets[j] + ...
  (offsets on the sender's side); rows of `output` nobody writes keep their value."""
  del recv_sizes                                                       # = what the peers send (the contract)
  n = send_sizes.shape[0]
  cap = min(operand.shape[0], output.shape[0])                         # no chunk is longer
  r = jnp.arange(cap, dtype=jnp.int32)
  live = r[None] < send_sizes[:, None]                                 # [n, cap]
  src = jnp.clip(input_offsets[:, None] + r[None], 0, operand.shape[0] - 1)
  tail = (1,) * (operand.ndim - 1)
  buf = jnp.where(live.reshape(live.shape + tail), operand[src], jnp.zeros((), operand.dtype))
  buf = jax.lax.all_to_all(buf, axis_name, 0, 0)                       # buf[i]: chunk sender i sent me
  offs = jax.lax.all_to_all(output_offsets, axis_name, 0, 0)
  sizes = jax.lax.all_to_all(send_sizes, axis_name, 0, 0)
  dst = jnp.where(r[None] < sizes[:, None], offs[:, None] + r[None], output.shape[0])   # out of range: dropped
  return output.at[dst.reshape(-1)].set(buf.reshape((n * cap,) + operand.shape[1:]), mode="drop")


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name,
                      impl: str = "native"):
  if impl == "native":
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                     axis_name=axis_name)
  if impl == "emulate":
    return emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                      axis_name=axis_name)
  raise ValueError(f"ragged_all_to_all impl must be 'native' or 'emulate', got {impl!r}")


def _tensor_sum(y):
  """w2's partial outputs summed over the `tensor` shards of F (fp32)."""
  return jax.lax.psum(y, "tensor")


def tensor_split(pe: dict, cfg: ModelConfig, mesh) -> int:
  """How many `tensor` shards the experts' inner dimension F is split over inside the shard_map: the mesh's
  tensor size when every expert array (values and scales of w1/w3 on dim 1, of w2 on dim 2) splits into it
  evenly, and each shard's F into whole 128-wide activation-quantisation blocks under `quant_sim`; else 1
  (the weights gathered over `tensor`)."""
  t = dict(mesh.shape).get("tensor", 1)
  if t == 1:
    return 1
  F = cfg.moe_inter_dim
  ok = F % t == 0 and (not cfg.quant_sim or (F // t) % 128 == 0)
  for name, dim in (("w1", 1), ("w3", 1), ("w2", 2)):
    ok = ok and all(a.shape[dim] % t == 0 for a in jax.tree.leaves(pe[name]))
  return t if ok else 1


def _expert_specs(pe: dict, t: int) -> dict:
  """shard_map in_specs of the experts: the expert axis on `expert`, F on `tensor` when t > 1."""
  if t == 1:
    return jax.tree.map(lambda _: P(EXPERT_AXIS), pe)
  spec = {"w1": P(EXPERT_AXIS, "tensor"), "w3": P(EXPERT_AXIS, "tensor"), "w2": P(EXPERT_AXIS, None, "tensor")}
  return {k: jax.tree.map(lambda _, s=spec.get(k, P(EXPERT_AXIS)): s, v) for k, v in pe.items()}


def _shard_body(pe, x, idx, w, valid, *, cfg: ModelConfig, n: int, cap: int, tok_axes, impl: str, group: int,
                reduce=None):
  """One shard: x [T,D], idx/w [T,k] (each token's slots in ascending expert id), valid [T] ->
  (sum_k w*expert(x) [T,D] fp32, load [E] fp32, dropped [] int32)."""
  T, k = idx.shape
  D = x.shape[-1]
  E = cfg.n_routed_experts
  El = E // n
  N = T * k
  me = jax.lax.axis_index(EXPERT_AXIS)
  a2a = partial(ragged_all_to_all, axis_name=EXPERT_AXIS, impl=impl)

  key = moe._expert_key(idx, valid, E)                                  # [N]; E for padded tokens' pairs
  order = jnp.argsort(key, stable=True)
  skey = key[order]
  counts = jnp.zeros((E,), jnp.int32).at[key].add(1, mode="drop")       # valid pairs per expert
  send = counts.reshape(n, El).sum(axis=1)                              # [n] pairs per destination shard
  in_off = _excl_cumsum(send)
  S = jax.lax.all_gather(send, EXPERT_AXIS)                             # [sender, receiver]
  start = _excl_cumsum(S, axis=0)                                       # chunk start in the receiver buffer
  kept = jnp.clip(cap - start, 0, S)                                    # first sender wins
  src_off = _excl_cumsum(S, axis=1)                                     # chunk start in the sender's pairs
  sent, out_off = kept[me], start[me]                                   # as sender, to each receiver
  recv, recv_off = kept[:, me], start[:, me]                            # as receiver, from each sender
  back_off = src_off[:, me]                                             # where my results go back to

  xs = x[order // k]
  meta = jnp.stack([w.reshape(-1)[order], (skey % El).astype(F32)], axis=-1)     # weight, local expert
  xr = a2a(xs, jnp.zeros((cap, D), x.dtype), in_off, sent, out_off, recv)
  mr = a2a(meta, jnp.zeros((cap, 2), F32), in_off, sent, out_off, recv)

  live = jnp.arange(cap) < jnp.sum(recv)
  lkey = jnp.where(live, mr[:, 1].astype(jnp.int32), El)
  lorder = jnp.argsort(lkey, stable=True)
  sizes = jnp.zeros((El,), jnp.int32).at[lkey].add(1, mode="drop")
  y = moe._expert_mlp(pe, cfg, xr[lorder], mr[lorder, 0], lambda a, wt: moe._grouped(a, wt, sizes, group), reduce)
  yb = jnp.zeros_like(y).at[lorder].set(y)                              # back to the received layout

  back = a2a(yb, jnp.zeros((N, D), x.dtype), recv_off, recv, back_off, sent)    # [N] pairs, sorted order
  yp = jnp.zeros_like(back).at[order].set(back).reshape(T, k, D)
  yp = jnp.where(valid[:, None, None], yp, 0)
  acc = yp[:, 0].astype(F32)
  for j in range(1, k):                                                 # moe.routed_experts' chain
    acc = acc + yp[:, j].astype(F32)
  load = jax.lax.psum(counts.astype(F32), tok_axes)
  dropped = jax.lax.psum(jnp.sum(send - sent), tok_axes)
  return acc, load, dropped


def _gather_body(pe, x, idx, w, valid, *, cfg: ModelConfig, n: int, tok_axes, reduce=None):
  """One shard, few tokens: x [T,D], idx/w [T,k] (ascending expert id), valid [T] -> like `_shard_body`.
  The expert group's n*T tokens are all-gathered; this shard applies its own experts to the pairs that chose
  them (`moe._gathered_experts`: each chosen local expert read once), the per-slot outputs (one shard holds
  each pair's, the others exact zeros) are summed and scattered back over `expert`, and the combine is
  `moe.routed_experts`' ascending-id chain."""
  T, k = idx.shape
  E = cfg.n_routed_experts
  El = E // n
  me = jax.lax.axis_index(EXPERT_AXIS)
  gather = partial(jax.lax.all_gather, axis_name=EXPERT_AXIS, tiled=True)
  xa, ia, wa, va = gather(x), gather(idx), gather(w), gather(valid)          # [n*T, ...]
  mine = (ia // El == me) & va[:, None]                                       # pairs of my experts
  y = moe._gathered_experts(pe, cfg, xa, jnp.where(mine, ia - me * El, El), wa, va, n_experts=El, reduce=reduce)
  y = jnp.where(mine[..., None], y, 0)                                        # [n*T, k, D] x.dtype
  yp = jax.lax.psum_scatter(y, EXPERT_AXIS, scatter_dimension=0, tiled=True)  # my T tokens' slots, exact
  yp = jnp.where(valid[:, None, None], yp, 0)
  acc = yp[:, 0].astype(F32)
  for j in range(1, k):                                                       # moe.routed_experts' chain
    acc = acc + yp[:, j].astype(F32)
  counts = jnp.zeros((E,), F32).at[moe._expert_key(idx, valid, E)].add(1.0, mode="drop")
  return acc, jax.lax.psum(counts, tok_axes), jnp.zeros((), jnp.int32)


def decode_path(tokens_per_shard: int, k: int, n_shards: int, n_experts: int) -> str:
  """"gather" when the expert group's (token, slot) pairs are fewer than the experts (decode batches: the
  single-device rule of `moe.routed_experts`), else "exchange" (the two ragged all-to-alls)."""
  return "gather" if n_shards * tokens_per_shard * k < n_experts else "exchange"


def routed_experts(pe: dict, cfg: ModelConfig, x: jnp.ndarray, idx: jnp.ndarray, w: jnp.ndarray,
                   valid: jnp.ndarray | None, mesh, *, capacity_factor: float | None = "default",
                   impl: str | None = None, path: str | None = None,
                   group: int = moe.EXPERT_GROUP) -> tuple[jnp.ndarray, EPStats]:
  """`moe.routed_experts` over `mesh`'s expert axis. x: [T,D], idx/w: [T,k], valid: [T] bool (None = all) ->
  ([T,D] fp32, EPStats). capacity_factor: see the module doc ("default": `options`' value, None =
  dropless); impl: "native" | "emulate" | None (`options`' value, else by the mesh's platform); path:
  "exchange" | "gather" | None (`options`' value, else by size: `decode_path`)."""
  if capacity_factor == "default":
    capacity_factor = _opts["capacity_factor"]
  impl = impl or _opts["impl"] or _platform_impl(mesh)
  path = path or _opts["path"]
  if path not in (None, "exchange", "gather"):
    raise ValueError(f"expert-parallel path must be 'exchange', 'gather' or None (by size); got {path!r}")
  T, k = idx.shape
  E = cfg.n_routed_experts
  n = mesh.shape[EXPERT_AXIS]
  if E % n:
    raise ValueError(f"{E} routed experts do not split over an expert axis of {n} shards.")
  if valid is None:
    valid = jnp.ones((T,), bool)
  idx, w = moe.sort_slots(idx, w)                                       # slots in ascending expert id

  tok_axes = tuple(a for a in TOKEN_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  n_tok = math.prod(mesh.shape[a] for a in tok_axes)
  Tp = -(-T // n_tok) * n_tok
  if Tp != T:
    pad = lambda a: jnp.pad(a, [(0, Tp - T)] + [(0, 0)] * (a.ndim - 1))
    x, idx, w, valid = pad(x), pad(idx), pad(w), pad(valid)
  tok = P(tok_axes)
  stacked = isinstance(pe, moe.Stacked)
  layer = jax.eval_shape(pe.get) if stacked else pe                  # one layer's experts (shapes suffice)
  t = tensor_split(layer, cfg, mesh)
  reduce = _tensor_sum if t > 1 else None
  gather = (path or decode_path(Tp // n_tok, k, n, E)) == "gather"
  if gather:
    body = partial(_gather_body, cfg=cfg, n=n, tok_axes=tok_axes, reduce=reduce)
  else:
    cap = capacity_rows(Tp // n_tok, k, n, capacity_factor)
    body = partial(_shard_body, cfg=cfg, n=n, cap=cap, tok_axes=tok_axes, impl=impl, group=group, reduce=reduce)
  specs = _expert_specs(layer, t)
  if stacked:                                  # the whole stack in, this shard's experts indexed inside
    one = body                                 # the decode path takes its chosen experts from the stack
    body = lambda stack, rep, *a: one(moe.Stacked(stack, rep) if gather else moe.Stacked(stack, rep).get(), *a)
    args = (pe.tree, pe.rep)
    in_specs = (jax.tree.map(lambda s: P(None, *s), specs, is_leaf=lambda s: isinstance(s, P)), P())
  else:
    args, in_specs = (pe,), (specs,)
  f = jax.shard_map(body, mesh=mesh, in_specs=(*in_specs, tok, tok, tok, tok),
                    out_specs=(tok, P(), P()), check_vma=False)
  y, load, dropped = f(*args, x, idx.astype(jnp.int32), w.astype(F32), valid)
  return y[:T], EPStats(load=load, dropped=dropped)
