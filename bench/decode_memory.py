"""Memory and traffic of one compiled decode step (nothing runs: `jit(...).lower(...).compile()`).

    python bench/decode_memory.py [--capacities=131072,1048576] [--cache_dtype=bfloat16] [--layers=scanned,unrolled]
    python bench/decode_memory.py --topology=v5p:2x2x1 [--cache_dtype=paper] [--attn_impl=pallas_tpu] [--dtype=bfloat16] [--quant_sim=1]

A Flash-shaped attention stack at toy width (head_dim 512, window 128, 16 indexer heads x 128, top-k 512,
layers SWA/CSA/HCA/CSA/HCA/SWA, dim 256; fp32 compute (`--dtype`), bf16 cache). For each capacity, the step compiled
for a live context of the whole capacity (the worst case) and of 1K tokens:
- temp: `memory_analysis().temp_size_in_bytes` of the step as it runs (the indexer's key-block loop; the
  layer loop scanned, `cfg.scan_layers=True`, or every layer unrolled, `scan_layers=False`: the `layers`
  column): what XLA allocates besides arguments and outputs; the cache is donated and updated in place, so
  it is not counted again;
- accessed: `cost_analysis()["bytes accessed"]` of the same step compiled with no while loop (every layer
  and every indexer key block unrolled, `no_loops`). `cost_analysis` counts a while loop's body once, on
  XLA:CPU and on XLA:TPU alike: the running step's count (printed in parentheses) sees one key block of each
  indexer layer, e.g. ~5 MB for the 67 MB of keys a CSA layer holds at 1M;
- ideal: what the math must read per token (docs/performance.md): the weights the step touches
  (`touched_param_bytes`: not the MTP block, k of E routed experts per MoE layer, one embedding row), every
  indexer key of a CSA layer, top-k + window entries of a CSA layer, all compressed entries + window of an
  HCA layer, the window of a sliding layer, in the cache's storage format.
Targets: temp <= 10% of the cache; accessed within 2x of ideal.
- growth from 1K live (printed on each capacity's 1K row): what grows with the context, the same program but
  for the live length: (temp at full live - temp at 1K live) / cache, and (accessed at full live - accessed
  at 1K live) / (ideal at full live - ideal at 1K live), where whatever the cost model adds per weight or per
  op cancels.

What the cost models count besides HBM traffic:
- XLA:TPU counts every memory space. Memory-space assignment stages whatever fits on chip (`copy-start` into
  memory space 1: VMEM) and the copy counts on the way in and again when read: the script first compiles one
  matmul, `x[M, 4096] @ W[4096, 4096]` bf16, at M = 1 and 8, and prints the factor (5x at M = 8; at M = 1 it
  lowers to a multiply-reduce and counts 1x). At this toy width every weight fits, so the step's weights count
  several times over at any live length. On TPU, `accessed` is therefore the no-loop step compiled again with
  memory-space assignment off (`HBM_ONLY`, XLA's `xla_msa_enable=false`): every op then reads its operands from
  HBM and writes its result there, and the count is each op's HBM traffic once (the same matmul: 1.00x at M = 8),
  an upper bound on what the step as compiled moves (staging only saves HBM reads). The step as compiled is
  printed beside it (`all spaces`); the temp column is always the step as compiled.
- XLA:CPU counts a fusion's whole-store operand where the fusion gathers rows from it (the top-k rows of a
  CSA layer read the whole compressed store, by this count).
- A Pallas kernel (`--attn_impl=pallas_tpu`) counts what it declares (`pallas_kernels/cost.py`: the rows it
  fetches, from its grid and DMA plan); with no declaration XLA:TPU would count it as nothing.
The last lines list, from the compiled HLO, every op that takes a compressed or indexer-key store as an
operand and what it produces: writes are in-place `dynamic-update-slice`s of the new row, reads produce only
the rows the math needs (blocks of live keys, the top-k rows, the live HCA rows).

How the XLA ops read a stored row: `kv_format.Layout.decode_planar`, slot by slot (a bf16 word's low half for
every word, then its high half), so that no decode materialises an array whose minor dimension is a word's 2,
4 or 8 slots, which XLA:TPU lays out and relays out through memory (v5p, bf16 cache, 1M: 42.5 MB of
temporaries with the natural-order decode, 11.4 MB planar); the query is permuted to match (`ops.Rows`).

--topology=GEN:AxB[xC] compiles the same step for one chip of that TPU slice instead, deviceless (libtpu from
`make setup`, in a child process, as launch/aot.py does): XLA's TPU layouts, buffer assignment and cost model.
On a TPU, an array whose minor dimension is narrower than the 128 lanes gets a default HBM layout with the
*rows* as the minor dimension (u32[1, 262144, 64] is laid out {1,2,0}; 17- and 146-word rows alike), and a
scanned layer group carries its stacked stores through the while loop in the row-major layout: each step then
relayouts such stores whole, in and out of the loop (as it also did a 128-word-wide store of 4682 lines, not
whole (8, 128) tiles). The cache is therefore lane-dense (dsv4_jax/kv_format.py: every store 128 words wide,
whole tiles; indexer keys are tiles, 128 keys across the lanes: kv_format.key_tiles). The TPU table counts
whole-store copies (`store copies`) from the compiled HLO; `--lane_dense=0` compiles whole-row main entries
(the paper's 146-word rows) to show them.

The model scans its repeated layer group by default (compile time flat in depth). XLA:CPU copies each scanned
layer's weights out of the stacked parameters on every step (a constant, one period's weights, ~13 MB here),
which the scanned rows' temp includes; the unrolled rows (`scan_layers=False`, as MaxText's decode examples
run) have no such copy. XLA:TPU reads a scanned layer's weights in place (its fusions take the dynamic slice), and
an unrolled step there holds more buffers at once (more temp, not less).
"""
import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dsv4_jax import abstract_params, init_cache, load_config  # noqa: E402
from dsv4_jax.cache import layouts, live_bucket  # noqa: E402
from dsv4_jax.inference import step  # noqa: E402

MB = 1e6


def stack_config(max_seq_len: int, dtype: str = "float32"):
  return dataclasses.replace(
      load_config("tiny"), name="flash_attention_stack", dim=256, n_heads=8, head_dim=512, rope_head_dim=64,
      q_lora_rank=128, o_groups=2, o_lora_rank=128, window_size=128, index_n_heads=16, index_head_dim=128,
      index_topk=512, compress_ratios=(0, 4, 128, 4, 128, 0, 0), n_layers=6, n_hash_layers=1,
      moe_inter_dim=128, dtype=dtype, original_seq_len=65536, max_seq_len=max_seq_len)


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def touched_param_bytes(cfg, params) -> int:
  """The weight bytes one decode step at batch 1 must read (docs/performance.md: "weights touched per token"):
  every weight but the MTP block (a step runs it only with a speculative cache), of each MoE layer's routed
  experts the k its token chooses (k/E of the stack), and one row of the embedding."""
  total = 0
  for path, a in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    b = a.size * a.dtype.itemsize
    if keys[0] == "mtp":
      continue
    if "experts" in keys and "shared_experts" not in keys:
      b = b * cfg.n_activated_experts / cfg.n_routed_experts
    elif keys[0] == "embed":
      b = b / a.shape[0]
    total += b
  return int(total)


def ideal_bytes(cfg, storage: str, live: int, param_bytes: int) -> int:
  main, idx = layouts(cfg, storage)
  W, total = cfg.window_size, param_bytes
  for i in range(cfg.n_layers):
    r = cfg.layer_ratio(i)
    if r == 4:
      total += (live // 4) * idx.nbytes + (min(cfg.index_topk, live // 4) + W) * main.nbytes
    elif r:
      total += (live // r + W) * main.nbytes
    else:
      total += W * main.nbytes
  return total


def no_loops(cfg):
  """(cfg with every layer unrolled, the function that undoes the rest): compiles from here on also unroll
  the indexer's key-block loop (`ops.UNROLL_KEY_BLOCKS`), so the step has no while loop. The config gets its
  own name: jit keys its traces on the (static) config, and the knob is not part of it."""
  from dsv4_jax import ops
  ops.UNROLL_KEY_BLOCKS = True

  def restore():
    ops.UNROLL_KEY_BLOCKS = False
  return dataclasses.replace(cfg, scan_layers=False, name=cfg.name + "_no_loops"), restore


def measure(c):
  cost = c.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return c.memory_analysis().temp_size_in_bytes, cost.get("bytes accessed", float("nan"))


def store_accesses(compiled) -> list[tuple[str, str, str]]:
  """(what, store shape, output shape) of every instruction of the compiled step's entry computation that
  takes a compressed store or indexer key store (or its in-place update) as an operand: shows whether an op
  touches the rows it needs or the whole store (read it with the layers unrolled: no while loop)."""
  import re
  txt = compiled.as_text()
  roots = {}
  for m in re.finditer(r"\n(%[\w.\-]+) \([^\n]*\) -> [^\n]* \{\n(.*?)\n\}", txt, re.S):
    root = [ln for ln in m.group(2).splitlines() if ln.strip().startswith("ROOT")][0]
    roots[m.group(1)] = re.search(r"= .*?\s([a-z][\w\-]*)\(", root).group(1)
  entry = txt[txt.index("\nENTRY"):]
  stores = {m.group(1): m.group(2) for m in re.finditer(
      r"(%cache__layers__\S*?___(?:comp|idx)___words\S*) = (u32\[[\d,]+\])", entry)}
  out = []
  for line in entry.splitlines():
    m = re.match(r"\s*(?:ROOT )?(%[\w.\-]+) = (\S+?)(?:\{[^}]*\})? (\w[\w\-]*)\((.*?)\)", line)
    if not m or m.group(3) == "parameter":
      continue
    used = [o for o in re.findall(r"%[\w.\-]+", m.group(4)) if o in stores]
    if not used:
      continue
    call = re.search(r"calls=(%[\w.\-]+)", line)
    what = roots.get(call.group(1), "?") if call else m.group(3)
    if what == "dynamic-update-slice":
      stores[m.group(1)] = stores[used[0]]            # the updated store: followed to its readers
    out.append((what, stores[used[0]], m.group(2)))
  return out


def store_copies(compiled, cache) -> int:
  """Instructions of the compiled step that copy a compressed or indexer-key store whole (a relayout: `copy`
  or a TPU SparseCore data-format call whose result has a store's full shape, in any layout)."""
  import re
  stores = [a for part in cache["layers"].values() for c in part for k in ("comp", "idx") if k in c
            for a in c[k].arrays]
  shapes = {",".join(map(str, w.shape)) for w in stores}
  found = re.findall(r"= \(?u32\[([\d,]+)\]\{[^}]*\}\)?[^\n]*? (?:copy|call-start)\(", compiled.as_text())
  return sum(shape in shapes for shape in found)


# XLA:TPU compiled without memory-space assignment: nothing is staged in on-chip memory between ops, so
# `cost_analysis` counts what every op moves to and from HBM, once (see the module docstring).
HBM_ONLY = {"xla_msa_enable": False}


def weight_count_factor(device, m: int, n: int = 4096, options=None) -> float:
  """`cost_analysis` bytes accessed / weight bytes of one `x[m, n] @ W[n, n]` bf16 matmul compiled for device."""
  sh = jax.sharding.SingleDeviceSharding(device)
  x, w = (jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sh) for s in ((m, n), (n, n)))
  c = jax.jit(lambda x, w: x @ w).trace(x, w).lower().compile(compiler_options=options)
  return measure(c)[1] / (n * n * 2)


def compiled_step(cfg, capacity: int, live: int, storage: str, device=None, lane_dense: bool = True, options=None):
  """The decode step compiled for abstract arguments (on `device`, e.g. a TPU topology's chip, when given), with
  XLA compiler `options` (e.g. `HBM_ONLY`)."""
  sh = None if device is None else jax.sharding.SingleDeviceSharding(device)
  put = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), t)
  params = put(abstract_params(cfg))
  cache = put(jax.eval_shape(lambda: init_cache(cfg, 1, capacity, storage, lane_dense=lane_dense)))
  tok, one = put(jax.ShapeDtypeStruct((1, 1), jnp.int32)), put(jax.ShapeDtypeStruct((1,), jnp.int32))
  c = jax.jit(step, static_argnums=(1, 5), donate_argnums=4).trace(params, cfg, tok, one, cache, live).lower().compile(
      compiler_options=options)
  return c, touched_param_bytes(cfg, params), nbytes(cache), cache


def tpu_child(args) -> int:
  """Re-runs this script in a process that sees libtpu (deviceless TPU compiles; see launch/aot.py)."""
  import subprocess
  from pallas_kernels.aot import libtpu_env
  try:
    env = dict(libtpu_env(), JAX_PLATFORMS="cpu")
  except FileNotFoundError as e:
    sys.exit(f"error: {e}")
  return subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--in_child"], env=env).returncode


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--capacities", default="131072,1048576")
  ap.add_argument("--cache_dtype", default="bfloat16", choices=("bfloat16", "float32", "paper"))
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="compute dtype (the released models compute in bfloat16)")
  ap.add_argument("--topology", default=None, help="compile for one chip of this TPU slice (e.g. v5p:2x2x1)")
  ap.add_argument("--lane_dense", type=int, default=1, choices=(0, 1),
                  help="the cache's main stores lane-dense (default) or whole rows (init_cache(lane_dense=))")
  ap.add_argument("--attn_impl", default="xla", choices=("xla", "pallas_tpu"), help="with --topology")
  ap.add_argument("--quant_sim", type=int, default=0, choices=(0, 1),
                  help="the reference's QAT numerics (cfg.quant_sim), as the released models run: with the paper "
                       "cache, a decode step's window then reads its own fp8 row from the ring in place")
  ap.add_argument("--layers", default="scanned,unrolled",
                  help="the layer loops to compile the running step with: scanned (cfg.scan_layers=True, the "
                       "default) and/or unrolled (scan_layers=False)")
  ap.add_argument("--in_child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.topology and not args.in_child:
    return tpu_child(args)
  device, target = None, f"backend {jax.default_backend()}"
  if args.topology:
    from jax.experimental import topologies
    device = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices[0]
    target = f"one chip of {args.topology} ({device.device_kind}), deviceless libtpu compile, attn_impl {args.attn_impl}"
  elif args.attn_impl != "xla":
    ap.error("--attn_impl=pallas_tpu needs --topology")
  geometry = ("lane-dense" if args.lane_dense else "whole-row") + " entries, indexer keys as tiles"
  print(f"one decode step, batch 1, Flash-shaped attention stack (D=256, 8 heads x 512, window 128, top-k 512, "
        f"layers SWA/CSA/HCA/CSA/HCA/SWA), {args.dtype} compute{', quant_sim' if args.quant_sim else ''}, "
        f"{args.cache_dtype} cache ({geometry}); {target}, jax {jax.__version__}")
  if device is not None:
    print(f"cost-model check: one x[M,4096] @ W[4096,4096] bf16 matmul counts {weight_count_factor(device, 1):.2f}x "
          f"W's bytes as accessed at M=1, {weight_count_factor(device, 8):.2f}x at M=8 (W staged on chip); compiled "
          f"HBM-only ({HBM_ONLY}): {weight_count_factor(device, 1, options=HBM_ONLY):.2f}x and "
          f"{weight_count_factor(device, 8, options=HBM_ONLY):.2f}x")
    print("accessed MB: compiled HBM-only (every op's HBM traffic, once); all spaces: the step as compiled, which "
          "also counts on-chip staging")
  layer_modes = args.layers.split(",")
  if not layer_modes or set(layer_modes) - {"scanned", "unrolled"}:
    ap.error(f"--layers={args.layers!r}: expected scanned, unrolled or both, comma-separated")
  print(f"{'layers':>8} {'capacity':>9} {'live':>9} {'cache MB':>9} {'temp MB':>8} {'temp/cache':>10} {'store copies':>12} | "
        f"no loops: {'accessed MB':>11} {'ideal MB':>9} {'acc/ideal':>9} {'(loops: acc MB)':>15}"
        f"{' all spaces MB' if device is not None else ''} | "
        f"growth from 1K live: {'temp/cache':>10} {'acc/ideal':>9}")
  accesses, no_loop_acc, all_spaces = {}, {}, {}
  for mode in layer_modes:
    for cap in map(int, args.capacities.split(",")):
      rows = []
      cfg = dataclasses.replace(stack_config(cap, args.dtype), scan_layers=mode == "scanned",
                                quant_sim=bool(args.quant_sim))
      if args.attn_impl == "pallas_tpu":
        from launch.aot import _compile_pallas_for_tpu
        cfg = _compile_pallas_for_tpu(dataclasses.replace(cfg, attn_impl="pallas"))
      for live in (cap, live_bucket(1024, cap)):
        c, pbytes, cbytes, ctree = compiled_step(cfg, cap, live, args.cache_dtype, device, bool(args.lane_dense))
        temp, acc_loops = measure(c)
        copies = store_copies(c, ctree)
        if (cap, live) not in no_loop_acc:                 # the same program for either layer loop
          flat, restore = no_loops(cfg)
          try:
            cu = compiled_step(flat, cap, live, args.cache_dtype, device, bool(args.lane_dense))[0]
            accesses[(cap, live)] = store_accesses(cu)
            if device is None:
              no_loop_acc[(cap, live)] = measure(cu)[1]
            else:                                    # TPU: HBM traffic, beside the step as compiled
              all_spaces[(cap, live)] = measure(cu)[1]
              no_loop_acc[(cap, live)] = measure(compiled_step(flat, cap, live, args.cache_dtype, device,
                                                               bool(args.lane_dense), HBM_ONLY)[0])[1]
          finally:
            restore()
        acc = no_loop_acc[(cap, live)]
        ideal = ideal_bytes(cfg, args.cache_dtype, live, pbytes)
        rows.append((live, temp, acc, ideal))
        growth = ""
        if len(rows) == 2 and rows[0][0] > live:          # the full-live row against this 1K row
          (_, temp_full, acc_full, ideal_full), (_, temp_1k, acc_1k, ideal_1k) = rows
          growth = (f"{(temp_full - temp_1k) / cbytes:>30.2%} {(acc_full - acc_1k) / (ideal_full - ideal_1k):>8.2f}x "
                    f"({rows[0][0]} live against {live})")
        print(f"{mode:>8} {cap:>9} {live:>9} {cbytes / MB:>9.1f} {temp / MB:>8.2f} {temp / cbytes:>9.2%} {copies:>12} | "
              f"no loops: {acc / MB:>11.1f} {ideal / MB:>9.1f} {acc / ideal:>8.2f}x {acc_loops / MB:>15.1f}"
              f"{f'{all_spaces[(cap, live)] / MB:>14.1f}' if device is not None else ''} |{growth}",
              flush=True)
  print()
  print("how the step with no loops touches the compressed and indexer-key stores (op at the root of each fusion "
        "that takes a store: store shape -> what it produces):")
  for (cap, live), acc in accesses.items():
    seen = {}
    for what, store, out in acc:
      seen[(what, store, out)] = seen.get((what, store, out), 0) + 1
    print(f"  capacity {cap}, live {live}: " + "; ".join(f"{n} x {w} {s} -> {o}" for (w, s, o), n in seen.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
