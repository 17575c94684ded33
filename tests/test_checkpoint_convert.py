"""Conversion of released-format checkpoints (fp8 + e8m0, packed fp4 experts, sharded with an index) to
Orbax, and restoring them: exact dequantisation, quantised == dequantised logits, HF parity, round trip,
bounded memory, and every error case."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import hf_oracle
import released_format as rf
from dsv4_jax import ModelConfig, forward, layer_plan, load_params, relayout_layers
from dsv4_jax.checkpoint import convert, orbax_io, stream
from dsv4_jax.qarray import QArray

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# SPEC_A with a scanned (CSA, HCA) pair, so stacked QArray leaves are exercised.
SPEC_Q = dict(hf_oracle.SPEC_A, num_hidden_layers=5, compress_ratios=[0, 4, 8, 4, 8, 0])
_fwd = jax.jit(forward, static_argnums=1)


def _cfg(path, **kw):
  return dataclasses.replace(ModelConfig.from_hf_config(path), **kw)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  """(source dir, converted dir, dense values by official name, config dict) for SPEC_Q."""
  root = tmp_path_factory.mktemp("released")
  config = hf_oracle.official_config_dict(SPEC_Q)
  official = rf.random_official(ModelConfig.from_hf_config(config), seed=1)
  src = str(root / "src")
  dense = rf.write_released(src, official, config, n_shards=4)
  out = str(root / "orbax")
  convert.convert(src, out, progress=False)
  return src, out, dense, config


def _unit_tree(params, cfg, unit):
  kind, n = stream.parse_unit(unit)
  if kind == "top":
    return params, None
  if kind == "mtp":
    return params["mtp"][n], None
  where, pos, rep = layer_plan(cfg).locate(n)
  return params["layers"][where][pos], rep


def test_released_layout(released):
  src, out, _, _ = released
  files = sorted(os.listdir(src))
  assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) == 4
  with open(os.path.join(src, "model.safetensors.index.json")) as f:
    wm = json.load(f)["weight_map"]
  assert len({v for k, v in wm.items() if k.startswith("mtp.")}) == 1
  manifest = orbax_io.read_manifest(out)
  assert set(manifest["units"]) == {"top", "mtp.0"} | {f"layer.{i}" for i in range(5)}
  assert os.path.isfile(os.path.join(out, "config.json"))


def test_dequantisation_bit_exact(released):
  """Every weight restored from Orbax, dequantised by the model's code, equals the reference
  dequantisation of the released bytes bit for bit; formats are the released ones."""
  src, out, dense, _ = released
  cfg = _cfg(out, dtype="float32")
  params = load_params(out, cfg)
  seen = 0
  for unit, specs in stream.unit_specs(cfg).items():
    tree, rep = _unit_tree(params, cfg, unit)
    for path, spec in stream.flatten(specs):
      leaf = tree
      for k in path:
        leaf = leaf[k]
      if rep is not None:
        leaf = jax.tree.map(lambda x: x[rep], leaf)
      name = stream.official_name(unit, path)
      kind = rf.kind_of(stream.official_name(unit, path, 0))
      if kind in ("fp8", "fp4") and not name.endswith("wo_a.weight"):
        assert isinstance(leaf, QArray) and leaf.fmt == kind, name
        got = np.asarray(leaf.dequantize(np.float32))
      else:
        assert not isinstance(leaf, QArray), name
        got = np.asarray(leaf)
      if name.endswith("tid2eid"):
        assert got.dtype == np.int32
      if stream.is_expert_leaf(path):
        want = np.stack([dense[stream.official_name(unit, path, e)] for e in range(spec.shape[0])])
      else:
        want = dense[name]
      np.testing.assert_array_equal(got, want.astype(got.dtype), err_msg=name)
      seen += 1
  assert seen == len(jax.tree.leaves(stream.unit_specs(cfg), is_leaf=lambda x: hasattr(x, "kind")))


def test_quantised_logits_equal_dequantised(released, tmp_path):
  """Same logits (bit for bit) from QArray params, from quantized=False, and from a --dtype=bf16 conversion."""
  src, out, _, _ = released
  dense_out = str(tmp_path / "bf16")
  convert.convert(src, dense_out, dtype="bf16", progress=False)
  tokens = hf_oracle.make_tokens(SPEC_Q, 0, B=2, S=24).astype(np.int32)
  for kw in ({"dtype": "bfloat16", "quant_sim": True},):       # the serving config (fp32: the HF test)
    cfg = _cfg(out, **kw)
    q = _fwd(load_params(out, cfg), cfg, tokens)
    d = _fwd(load_params(out, cfg, quantized=False), cfg, tokens)
    b = _fwd(load_params(dense_out, cfg), cfg, tokens)
    assert q.mtp_logits is not None
    for other in (d, b):
      np.testing.assert_array_equal(np.asarray(q.logits), np.asarray(other.logits))
      np.testing.assert_array_equal(np.asarray(q.mtp_logits), np.asarray(other.mtp_logits))
    assert np.isfinite(np.asarray(q.logits)).all()


def _assert_trees_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_equals_direct(released, tmp_path):
  src, out, _, config = released
  cfg = _cfg(out, dtype="bfloat16")
  direct = load_params(src, cfg)
  _assert_trees_equal(direct, load_params(out, cfg))
  # the per-layer units restore into the unrolled layout (scan_layers=False) as well
  flat = dataclasses.replace(cfg, scan_layers=False)
  assert layer_plan(cfg).reps and not layer_plan(flat).reps
  _assert_trees_equal({**direct, "layers": relayout_layers(direct["layers"], cfg, flat)}, load_params(out, flat))
  # one model.safetensors file, no index
  single = str(tmp_path / "single")
  rf.write_released(single, rf.random_official(cfg, seed=1), config, single_file=True)
  convert.convert(os.path.join(single, "model.safetensors"), str(tmp_path / "single_out"), progress=False)
  _assert_trees_equal(direct, load_params(str(tmp_path / "single_out"), cfg))


def test_hf_named_checkpoint_converts(tmp_path):
  model, _ = hf_oracle.make_hf_model(hf_oracle.SPEC_A, 0)
  d = hf_oracle.save_hf_named(model, str(tmp_path / "hf"))
  cfg = _cfg(d, dtype="float32", quant_sim=False)
  convert.convert(d, str(tmp_path / "out"), progress=False)
  _assert_trees_equal(load_params(d, cfg), load_params(str(tmp_path / "out"), cfg))


@pytest.mark.parametrize("spec_name", ["A", "C"])   # B: expert in-dim 48 is not a multiple of 32 (fp4)
def test_logits_match_hf_on_released_format(spec_name, tmp_path):
  """HF transformers (fp32) on the dequantised weights == our model on the converted quantised weights."""
  spec = hf_oracle.SPECS[spec_name]
  model, _ = hf_oracle.make_hf_model(spec, hf_oracle.MODEL_SEED)
  config = hf_oracle.official_config_dict(spec)
  official = {k: v.numpy() for k, v in hf_oracle.official_state_dict(model, spec).items()}
  mtp = rf.random_official(ModelConfig.from_hf_config(config), seed=2)
  official.update({k: v for k, v in mtp.items() if k.startswith("mtp.")})
  src = str(tmp_path / "src")
  dense = rf.write_released(src, official, config, n_shards=3)
  rf.load_into_hf(model, dense)
  out = str(tmp_path / "orbax")
  convert.convert(src, out, progress=False)
  cfg = _cfg(out, dtype="float32", quant_sim=False)
  params = load_params(out, cfg)
  assert isinstance(params["head"], jax.Array)
  seed = hf_oracle.find_token_seed(model, spec, B=2, S=37, seeds=range(40))
  tokens = hf_oracle.make_tokens(spec, seed, B=2, S=37)
  ref = hf_oracle.hf_logits(model, tokens)
  got = np.asarray(_fwd(params, cfg, tokens.astype(np.int32)).logits)
  err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
  print(f"spec {spec_name}: prefill max relative error vs HF {err:.2e}")
  assert err < 1e-4

  if spec_name != "A":
    return                          # cached decode once (compiles prefill + decode_step: the slow part)
  from dsv4_jax import decode_step, init_cache, prefill
  new = 6
  _, ref_steps = hf_oracle.hf_greedy(model, tokens, new, return_logits=True)
  B, S = tokens.shape
  cache = init_cache(cfg, batch_size=B, max_seq_len=S + new)
  logits, cache = prefill(params, cfg, tokens.astype(np.int32), np.full((B,), S, np.int32), cache)
  steps = [np.asarray(logits)]
  for _ in range(new - 1):          # feed HF's greedy choices, so both decode the same sequence
    nxt = np.argmax(ref_steps[:, len(steps) - 1], -1).astype(np.int32)
    logits, cache = decode_step(params, cfg, nxt, cache)
    steps.append(np.asarray(logits))
  got = np.stack(steps, 1)
  err = float(np.max(np.abs(got - ref_steps)) / np.max(np.abs(ref_steps)))
  print(f"spec {spec_name}: cached decode max relative error vs HF {err:.2e}")
  assert err < 1e-4


def test_restore_with_mesh(released):
  src, out, _, _ = released
  cfg = _cfg(out, dtype="bfloat16")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "sequence", "tensor", "expert"))
  params = load_params(out, cfg, mesh=mesh)
  _assert_trees_equal(params, load_params(out, cfg))
  assert all(isinstance(x.sharding, jax.sharding.NamedSharding) for x in jax.tree.leaves(params))


# ---- errors -----------------------------------------------------------------------------------------

@pytest.fixture()
def small(tmp_path):
  """A fresh released checkpoint to corrupt: (dir, official fp32 tensors, config)."""
  config = hf_oracle.official_config_dict(SPEC_Q)
  official = rf.random_official(ModelConfig.from_hf_config(config), seed=3)
  return tmp_path, official, config


def _write(small, official=None, config=None, **kw):
  root, off, cfg = small
  src = str(root / "src")
  shutil.rmtree(src, ignore_errors=True)
  rf.write_released(src, official or off, config or cfg, **kw)
  return src


def _no_output(root):
  left = [p for p in os.listdir(root) if p.startswith("out")]
  assert not left, f"a failed conversion left {left}"


def _convert_fails(small, src, exc, *fragments):
  root = small[0]
  with pytest.raises(exc) as e:
    convert.convert(src, str(root / "out"), progress=False)
  for f in fragments:
    assert f in str(e.value), (f, str(e.value))
  _no_output(root)
  return str(e.value)


def test_missing_tensor(small):
  off = dict(small[1])
  del off["layers.3.attn.wkv.weight"]
  del off["layers.2.ffn.experts.5.w2.weight"]
  msg = _convert_fails(small, _write(small, off), ValueError, "lacks", "layers.3.attn.wkv.weight",
                       "layers.2.ffn.experts.5.w2.weight")
  print(msg)


def test_unexpected_tensor(small):
  off = dict(small[1], **{"layers.1.attn.bogus.weight": np.zeros((4, 4), np.float32)})
  _convert_fails(small, _write(small, off), ValueError, "unexpected tensor", "layers.1.attn.bogus.weight")
  off = dict(small[1], **{"layers.5.attn_norm.weight": np.ones((64,), np.float32)})      # a 6th layer
  _convert_fails(small, _write(small, off), ValueError, "unexpected tensor", "layers.5.attn_norm.weight")


def test_wrong_shape(small):
  off = dict(small[1], **{"layers.2.attn.wq_b.weight": np.zeros((256, 64), np.float32)})
  _convert_fails(small, _write(small, off), ValueError, "layers.2.attn.wq_b.weight", "(256, 64)", "(512, 32)")


def _rewrite(src, name, value=None):
  """Replaces (or, with value None, deletes) one stored tensor of a sharded checkpoint in place."""
  from dsv4_jax.checkpoint.safetensors_io import SafetensorsFile
  index = os.path.join(src, "model.safetensors.index.json")
  with open(index) as fh:
    idx = json.load(fh)
  path = os.path.join(src, idx["weight_map"][name])
  st = SafetensorsFile(path)
  tensors = {n: st.read(n) for n in st.keys()}
  if value is None:
    del tensors[name], idx["weight_map"][name]
  else:
    tensors[name] = value
  rf.write_safetensors(path, tensors)
  with open(index, "w") as fh:
    json.dump(idx, fh)


def test_wrong_dtype(small):
  src = _write(small)
  _rewrite(src, "layers.0.ffn.gate.tid2eid", small[1]["layers.0.ffn.gate.tid2eid"].astype(np.float32))
  _convert_fails(small, src, ValueError, "layers.0.ffn.gate.tid2eid", "float32", "integer")
  src = _write(small)
  _rewrite(src, "layers.1.attn.wq_a.scale")                       # an fp8 weight without its scale
  _convert_fails(small, src, ValueError, "layers.1.attn.wq_a.weight", "float8_e4m3fn", "no scale")
  src = _write(small)
  _rewrite(src, "layers.2.attn.wkv.weight", np.zeros((128, 64), np.int16))
  _convert_fails(small, src, ValueError, "layers.2.attn.wkv.weight", "int16", "float8_e4m3fn")


def test_truncated_shard(small):
  src = _write(small)
  last = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))[-1]
  path = os.path.join(src, last)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  _convert_fails(small, src, ValueError, last, "truncated")


def test_failure_midway_leaves_nothing(small, monkeypatch):
  """A tensor that fails only when read (after several units were written) leaves no output, no partial dir."""
  src = _write(small)
  written = []
  orig = orbax_io.save_unit
  monkeypatch.setattr(orbax_io, "save_unit", lambda *a: written.append(a[1]) or orig(*a))
  real_read = stream.safetensors_io.SafetensorsFile.read

  def bad_read(self, name):
    if name == "head.weight":
      raise ValueError(f"{self.path}: tensor 'head.weight' needs N bytes but only M could be read: truncated.")
    return real_read(self, name)
  monkeypatch.setattr(stream.safetensors_io.SafetensorsFile, "read", bad_read)
  _convert_fails(small, src, ValueError, "head.weight", "truncated")
  assert len(written) >= 3


def test_killed_conversion_is_not_a_checkpoint(small):
  src = _write(small)
  out = str(small[0] / "out")
  code = ("import os, signal, sys\nfrom dsv4_jax.checkpoint import convert\n"
          "def die(p):\n  if p.tensors_done > p.tensors_total // 2: os.kill(os.getpid(), signal.SIGKILL)\n"
          f"convert.convert({src!r}, {out!r}, progress=die)\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == -9
  assert not os.path.exists(out)
  partial = [p for p in os.listdir(small[0]) if p.startswith("out.partial-")]
  assert len(partial) == 1 and not orbax_io.is_converted(small[0] / partial[0])
  cfg = ModelConfig.from_hf_config(src)
  with pytest.raises(ValueError, match="unfinished conversion"):
    load_params(small[0] / partial[0], cfg)
  convert.convert(src, out, progress=False)                       # a rerun succeeds
  assert orbax_io.is_converted(out)


def test_config_mismatch(small, released):
  root, off, config = small
  bad = dict(config, moe_intermediate_size=64)
  _convert_fails(small, _write(small, config=bad), ValueError, "layers.0.ffn.experts.0.w1.weight", "(32, 64)",
                 "(64, 64)")
  fewer = dict(config, num_hidden_layers=4, compress_ratios=[0, 4, 8, 4, 0], layer_types=None)
  fewer.pop("layer_types")
  _convert_fails(small, _write(small, config=fewer), ValueError, "unexpected tensor", "layers.4.")
  # a converted checkpoint restored with a config that does not match it
  out = released[1]
  wrong = dataclasses.replace(ModelConfig.from_hf_config(out), moe_inter_dim=64)
  with pytest.raises(ValueError, match=r"layer\.0/ffn/experts/w1.*\(8, 32, 64\).*\(8, 64, 64\)"):
    load_params(out, wrong)


def test_existing_output_needs_overwrite(small):
  src = _write(small)
  out = str(small[0] / "out")
  convert.convert(src, out, progress=False)
  with pytest.raises(FileExistsError, match="--overwrite"):
    convert.convert(src, out, progress=False)
  convert.convert(src, out, progress=False, overwrite=True)
  assert orbax_io.is_converted(out) and not [p for p in os.listdir(small[0]) if ".old-" in p or ".partial-" in p]


def test_cli(small):
  src = _write(small)
  out = str(small[0] / "out")
  cmd = [sys.executable, "-m", "launch.convert", f"--input={src}", f"--output={out}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "tensors" in r.stderr and "ETA" in r.stderr                    # progress line
  assert "converted" in r.stdout and "GB in" in r.stdout                # summary
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  assert r.returncode != 0 and "--overwrite" in r.stderr


def test_peak_memory_is_bounded():
  """Converting a ~170 MB, 5-shard checkpoint grows peak RSS by less than one shard plus one layer (over the
  fixed cost measured on a tiny conversion), far below the checkpoint size."""
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  import convert_memory
  r = convert_memory.measure("small")
  print(convert_memory.report(r))
  assert r["total"] > 4 * r["largest_shard"]
  assert r["growth"] < r["largest_shard"] + r["largest_layer"] + 32 * 2 ** 20
