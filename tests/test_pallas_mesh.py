"""The Pallas kernels on a mesh (ops._per_batch_shard): each kernel runs inside a shard_map, one call per batch
shard, and gives what the `xla` reference gives on one device; on 4 CPU devices (interpreted kernels), for
the indexer's top-k and sparse attention over a stacked (scanned-layer) word store, with the batch split
over `data` and, where `data` does not divide it, whole. (The TPU compile of the whole model with the kernels
on a 4-chip mesh: tests/test_launch_aot.py.)"""
from fake_devices import run_script


def test_kernels_per_batch_shard_equal_the_reference():
  run_script("""
import dataclasses, numpy as np, jax, jax.numpy as jnp
from dsv4_jax import load_config, ops
from dsv4_jax.kv_format import Layout
from dsv4_jax.sharding import make_mesh, use_mesh
ref_cfg = load_config("tiny")
cfg = dataclasses.replace(ref_cfg, attn_impl="pallas_tpu")
H, K, nI, cI = cfg.n_heads, cfg.head_dim, cfg.index_n_heads, cfg.index_head_dim
S, N, W = 3, 64, 16
main, idx = Layout("float32", K), Layout("float32", cI)

def inputs(B):
  rng = np.random.default_rng(B)
  rnd = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  return dict(store=main.encode(rnd(2, B, N, K)), keys=idx.encode(rnd(2, B, N, cI)), qI=rnd(B, S, nI, cI),
              w=rnd(B, S, nI), q=rnd(B, S, H, K), sink=rnd(H))

def ops_out(cfg, x):
  B = x["q"].shape[0]
  rep = jnp.int32(1)                                           # stacked stores [reps, B, N, words]
  sel = ops.indexer_topk(cfg, x["qI"], x["w"], ops.Rows(x["keys"], idx, rep, N), jnp.full((B, S), 40, jnp.int32), 8)
  win_idx = jnp.broadcast_to(jnp.arange(W, dtype=jnp.int32) - 1, (B, S, W))   # -1: masked
  out = ops.sparse_attention(cfg, x["q"], x["sink"], ops.Rows(x["store"], main, rep, N), win_idx,
                             ops.Rows(x["store"], main, jnp.int32(0), N), sel)
  return sel, out

for spec, B in (("data:2,expert:2", 2), ("data:2,expert:2", 3), ("sequence:2,tensor:2", 2)):
  x = inputs(B)
  want = jax.jit(ops_out, static_argnums=0)(ref_cfg, x)
  mesh = make_mesh(spec, cfg)
  with use_mesh(mesh):
    f = jax.jit(ops_out, static_argnums=0)
    jaxpr = str(f.trace(cfg, x).jaxpr)
    got = f(cfg, x)
  assert jaxpr.count("shard_map") >= 2, jaxpr[:2000]
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
  err = float(np.max(np.abs(np.asarray(got[1]) - np.asarray(want[1]))) / np.max(np.abs(np.asarray(want[1]))))
  print(spec, "batch", B, "top-k equal, attention rel err", f"{err:.1e}")
  assert err <= 1e-5, err
print("ok")
""", n_devices=4)
