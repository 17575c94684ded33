"""The whole model on the pod meshes expert:8, data:2,expert:4 and data:2,tensor:2,expert:2 against one
device (tests/pod_meshes.py: forward, prefill + decode, greedy ids; sequence:4,expert:2, context parallel,
in tests/test_sharded_context.py, so that both xdist workers share the compiles), and the per-shard
compression that context parallelism is built on."""
from pod_meshes import check_meshes


def test_pod_meshes_match_one_device():
  check_meshes("expert:8", "data:2,expert:4", "data:2,tensor:2,expert:2")


def test_compress_resumes_from_a_state_built_from_earlier_tokens():
  """What each context-parallel shard does: compress its tokens from position `start` with the state
  `state_from_tokens` builds from the tokens just before (the halo). Entries equal those of compressing the
  whole sequence at once, for CSA (4x, overlapping) and HCA, chunked (chunk < S) or not."""
  import jax
  import numpy as np
  from dsv4_jax import compressor, init_params, load_config
  cfg = load_config("tiny")
  params = init_params(cfg, jax.random.key(0))
  x = jax.random.normal(jax.random.key(3), (2, 96, cfg.dim))
  # jitted (start traced, as context-parallel shards pass it): one program per call instead of op-by-op
  # dispatch of every primitive (about half the time)
  compress = jax.jit(compressor.compress, static_argnums=(1, 3), static_argnames="chunk")
  state_from_tokens = jax.jit(compressor.state_from_tokens, static_argnums=2)
  for ratio, p in ((4, params["layers"]["stack"][1]["attn"]["compressor"]),
                   (8, params["layers"]["stack"][0]["attn"]["compressor"])):
    p = jax.tree.map(lambda a: a[0], p)
    whole = np.asarray(compress(p, cfg, x, ratio))[:, : 96 // ratio]
    assert np.allclose(np.asarray(compress(p, cfg, x, ratio, chunk=16))[:, : 96 // ratio], whole,
                       rtol=1e-6, atol=1e-6)
    start, H = 48, 16
    halo_pos = np.broadcast_to(np.arange(start - H, start), (2, H))
    state = state_from_tokens(p, x[:, start - H:start], ratio, halo_pos)
    for chunk in (None, 16):
      rest = compress(p, cfg, x[:, start:], ratio, chunk=chunk, start=start, state=state)
      got = np.asarray(rest)[:, : (96 - start) // ratio]
      err = float(np.abs(got - whole[:, start // ratio:]).max())
      assert err <= 1e-5, (ratio, chunk, err)
