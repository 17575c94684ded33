"""A multi-host load from safetensors reads only the routed experts of the process's own devices
(weights.experts_to_read, stream_units(experts=...)): checked on the released layout (one tensor per expert,
fp4 with scales) and on HF's stacked expert tensors, and end to end on a 4-device mesh that pretends to be
two processes."""
import dataclasses
import socket
import subprocess
import sys

import numpy as np
import pytest

import hf_oracle
import released_format as rf
from dsv4_jax import ModelConfig
from dsv4_jax.checkpoint import safetensors_io, stream
from dsv4_jax.qarray import QArray
from fake_devices import ROOT, cpu_env, run_script

SPEC = dict(hf_oracle.SPEC_A, num_hidden_layers=3, compress_ratios=[0, 4, 8, 0])
KEEP = {1, 6}


def _cfg(path):
  return dataclasses.replace(ModelConfig.from_hf_config(path), dtype="float32", quant_sim=False)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  root = tmp_path_factory.mktemp("slices")
  config = hf_oracle.official_config_dict(SPEC)
  src = str(root / "released")
  rf.write_released(src, rf.random_official(ModelConfig.from_hf_config(config), seed=2), config, n_shards=2)
  model, _ = hf_oracle.make_hf_model(SPEC, 0)
  return src, hf_oracle.save_hf_named(model, str(root / "hf"))


def _units(path, cfg, experts, monkeypatch):
  """{unit: {path: value}} and the tensor names read from disk (SafetensorsFile.read) / through the memory map
  (copies of rows of .get views)."""
  read = []
  orig = safetensors_io.SafetensorsFile.read
  monkeypatch.setattr(safetensors_io.SafetensorsFile, "read", lambda self, n: read.append(n) or orig(self, n))
  units = {u: dict(stream.flatten(t)) for u, t in stream.stream_units(path, cfg, experts=experts)}
  monkeypatch.setattr(safetensors_io.SafetensorsFile, "read", orig)
  return units, read


def _parts(v):
  return (v.values, v.scales) if isinstance(v, QArray) else (v,)


@pytest.mark.parametrize("which", ["released", "hf"])
def test_only_the_given_experts_are_read(released, which, monkeypatch):
  path = released[0] if which == "released" else released[1]
  cfg = _cfg(path)
  full, read_all = _units(path, cfg, None, monkeypatch)
  some, read_some = _units(path, cfg, KEEP, monkeypatch)
  assert full.keys() == some.keys()
  n_expert_leaves = 0
  for unit in full:
    for p, v in full[unit].items():
      for a, b in zip(_parts(v), _parts(some[unit][p])):
        if stream.is_expert_leaf(p):
          n_expert_leaves += 1
          for e in range(cfg.n_routed_experts):
            if e in KEEP:
              np.testing.assert_array_equal(b[e], a[e], err_msg=f"{unit} {p} expert {e}")
            else:
              assert not np.any(b[e]), f"{unit} {p} expert {e} was filled"
        else:
          np.testing.assert_array_equal(b, a, err_msg=f"{unit} {p}")
  assert n_expert_leaves >= 3 * (cfg.n_layers)
  if which == "released":          # one tensor (+ scale) per expert: the others are never read from disk
    experts_read = {n.split(".experts.")[1].split(".")[0] for n in read_some if ".experts." in n}
    assert experts_read == {str(e) for e in KEEP}, experts_read
    assert len(read_all) - len(read_some) == (cfg.n_routed_experts - len(KEEP)) * 3 * 2 * (cfg.n_layers + cfg.n_mtp_layers)   # w1-3, scales
  else:                            # stacked [E, ...] tensors: only their kept rows are copied from the map
    stacked = lambda names: [n for n in names if ".mlp.experts." in n]
    assert not stacked(read_some) and len(stacked(read_all)) == 2 * cfg.n_layers, (read_some, read_all)


@pytest.mark.parametrize("which", ["released", "hf"])
def test_units_by_slice_read_as_the_whole(released, which):
  """`stream_units(by_slice=True)` reads nothing, and every leaf, routed experts included (one fp4 tensor and
  scale per expert, or rows of HF's stacked [E, 2F, D] tensors), reads as the whole-read unit: all of it, a
  slice across experts and inside each (rows of w1/w3 past HF's gate/up boundary), and with the experts this
  process does not read (`experts`) zero."""
  path = released[0] if which == "released" else released[1]
  cfg = _cfg(path)
  whole = {u: dict(stream.flatten(t)) for u, t in stream.stream_units(path, cfg)}
  n_experts = 0
  for keep, rows in ((None, slice(None)), (KEEP, slice(3, 7))):
    for unit, tree in stream.stream_units(path, cfg, experts=keep, by_slice=True):
      for p, v in stream.flatten(tree):
        for a, b in zip(_parts(whole[unit][p]), _parts(v)):
          assert isinstance(b, stream.Slices) and b.shape == a.shape, (unit, p)   # wo_a: fp32 here, bf16 whole
          np.testing.assert_array_equal(b.read(), a if keep is None or not stream.is_expert_leaf(p) else
                                        np.where(np.isin(np.arange(len(a)), list(keep))[:, None, None], a, 0))
          if stream.is_expert_leaf(p):
            n_experts += 1
            index = (rows, slice(1, None), slice(0, 1))
            want = a[index] if keep is None else np.where(np.isin(np.arange(3, 7), list(keep))[:, None, None],
                                                          a[index], 0)
            np.testing.assert_array_equal(b.read(index), want, err_msg=f"{unit} {p}")
  assert n_experts >= 2 * 3 * cfg.n_layers


def test_slices_read_only_their_bytes_and_dequantise_as_the_whole(tmp_path, monkeypatch):
  """`read_slice` equals numpy slicing of the whole tensor and reads only the slice's bytes; the dequantised
  slices of fp8 (boundaries inside 128x128 blocks), fp4 (odd columns: half a byte, inside a 1x32 block) and
  float non-power-of-two scales equal the whole tensor's exact dequantisation, sliced."""
  import ml_dtypes
  rng = np.random.default_rng(0)
  fp8 = rng.normal(size=(200, 300)).astype(ml_dtypes.float8_e4m3fn)
  fp8_s = rng.integers(120, 130, size=(2, 3)).astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)
  fp4 = rng.integers(-128, 128, size=(7, 48)).astype(np.int8)
  fp4_s = rng.integers(120, 130, size=(7, 3)).astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)
  odd_s = rng.uniform(0.5, 3, size=(2, 3)).astype(np.float32)       # HF weight_scale_inv, not powers of 2
  t3 = rng.normal(size=(3, 5, 8)).astype(ml_dtypes.bfloat16)
  rf.write_safetensors(str(tmp_path / "t.safetensors"),
                       {"fp8": fp8, "fp8_s": fp8_s, "fp4": fp4, "fp4_s": fp4_s, "odd_s": odd_s, "t3": t3})
  st = safetensors_io.SafetensorsFile(str(tmp_path / "t.safetensors"))
  read = []
  orig = safetensors_io.SafetensorsFile._pread
  monkeypatch.setattr(safetensors_io.SafetensorsFile, "_pread",
                      lambda self, f, o, v: read.append(len(v)) or orig(self, f, o, v))
  all_ = slice(None)
  for index, runs in [((slice(1, 3), all_, all_), 1), ((all_, slice(2, 4), all_), 3),
                      ((slice(0, 2), slice(1, 5), slice(3, 7)), 2 * 4), ((all_,) * 3, 1)]:
    read.clear()
    got = st.read_slice("t3", index)
    np.testing.assert_array_equal(got, t3[index])
    assert sum(read) == got.nbytes and len(read) == runs, (index, read)
  S = stream.Slices.of_file
  u8 = lambda a: a.view(np.uint8)
  cases = [("fp8", "fp8_s", stream._dense_f32(QArray(fp8, u8(fp8_s), (128, 128), "fp8"))),     # today's path
           ("fp4", "fp4_s", stream._dense_f32(QArray(u8(fp4), u8(fp4_s), (1, 32), "fp4"))),
           ("fp8", "odd_s", stream._quantised("fp8", fp8, odd_s, "t"))]
  for w, sc, whole in cases:
    q = stream._quantised_slices(w, S(st, w), S(st, sc), "t", dequantize=False)
    d = stream._quantised_slices(w, S(st, w), S(st, sc), "t", dequantize=True)
    assert whole.dtype == np.float32 and d.shape == whole.shape and d.dtype == np.float32
    for r, c in [(slice(0, 100), slice(0, 150)), (slice(100, 200), slice(150, 300)),
                 (slice(3, 5), slice(33, 95)), (slice(None), slice(1, 2))]:
      if r.stop and r.stop > whole.shape[0]:
        r = slice(r.start % whole.shape[0], whole.shape[0])
      c = slice(*slice(c.start, min(c.stop, whole.shape[1])).indices(whole.shape[1])[:2])
      np.testing.assert_array_equal(d.read((r, c)), whole[r, c], err_msg=f"{w} {sc} {r} {c}")
    if sc != "odd_s":                      # stays a QArray: values and scales each by their own slices
      values, scales = (fp8, fp8_s) if w == "fp8" else (fp4, fp4_s)
      assert isinstance(q, QArray)
      assert q.values.read((slice(1, 3), slice(2, 5))).tobytes() == values[1:3, 2:5].tobytes()
      np.testing.assert_array_equal(q.scales.read((slice(0, 1), slice(1, 2))), u8(scales)[0:1, 1:2])
    else:
      assert isinstance(q, stream.Slices)

def test_each_pretend_process_reads_and_holds_its_own_experts(released):
  """4 devices, mesh expert:4; devices 0-1 play process 0, 2-3 process 1 (the pytest process is process 0).
  Process 0 must read experts of shards 0 and 1 only: its devices hold them exactly; the shards of the
  other pretend process stay zero, which shows those tensors were not read."""
  out = run_script(f"""
import functools, numpy as np, jax
from dsv4_jax import ModelConfig, load_params, weights
from dsv4_jax.sharding import make_mesh
from dsv4_jax.qarray import QArray
import dataclasses
path = {released[0]!r}
cfg = dataclasses.replace(ModelConfig.from_hf_config(path), dtype="float32", quant_sim=False)
mesh = make_mesh("expert:4", cfg)
E = cfg.n_routed_experts
assert weights.experts_to_read(cfg, mesh) is None                      # one real process holds them all
pretend = lambda d: d.id // 2
mine = weights.experts_to_read(cfg, mesh, owner=pretend)
assert mine == set(range(E // 2)), mine
whole = load_params(path, cfg)
weights.experts_to_read = functools.partial(weights.experts_to_read, owner=pretend)
part = load_params(path, cfg, mesh=mesh)
checked = 0
for (kp, a), b in zip(jax.tree_util.tree_flatten_with_path(whole)[0], jax.tree.leaves(part)):
  name = jax.tree_util.keystr(kp)
  if "['experts']" not in name:
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=name)
    continue
  for s in b.addressable_shards:
    want = np.asarray(a)[s.index]
    got = np.asarray(s.data)
    if pretend(s.device) == 0:
      np.testing.assert_array_equal(got, want, err_msg=name)
    else:
      assert not got.any() and want.any(), name
    checked += 1
assert checked >= 4 * 3 * 2, checked
print("expert shards checked", checked)
print("ok")
""", n_devices=4)
  assert "expert shards checked" in out


def test_each_pretend_process_reads_only_its_slices(released):
  """Mesh tensor:2,expert:2; devices 0-1 play one process and 2-3 the other, the pytest process (process 0)
  playing each side in turn. Every tensor is read by slice, the routed experts too (each side holds all
  experts, half of each one's rows or columns: `tensor` splits them): (a) each shard of the
  playing side equals today's whole-read load onto the same mesh bit for bit; (b) the byte ranges read are
  exactly those of its slices (a tensor split over `tensor` by rows: one range of its half; by columns: one
  per row; a replicated tensor, fp8 scale included: once, not once per device; `wo_a`, dequantised with a
  shard boundary inside its 128-row quant block: its rows and the covering scale block; an fp4 expert: its
  half of the rows or columns of the packed values and scales); (c) nothing of the other side's slices is read
  and its devices' shards stay zero."""
  out = run_script(f"""
import collections, os, dataclasses, numpy as np, jax
from dsv4_jax import ModelConfig, load_params, weights
from dsv4_jax.checkpoint import safetensors_io, stream
from dsv4_jax.sharding import make_mesh
path = {released[0]!r}
cfg = dataclasses.replace(ModelConfig.from_hf_config(path), dtype="float32", quant_sim=False)
mesh = make_mesh("tensor:2,expert:2", cfg)
ref = jax.tree_util.tree_flatten_with_path(load_params(path, cfg, mesh=mesh))[0]   # today's path: read whole
files = {{os.path.basename(f): safetensors_io.SafetensorsFile(f)
         for f in safetensors_io.checkpoint_files(path)}}
extent = {{}}                                                         # tensor -> (file, first byte, end)
for fn, st in files.items():
  for n in st.keys():
    b, e = st._entries[n]["data_offsets"]
    extent[n] = (fn, st._data_start + b, st._data_start + e)
reads = []
orig = safetensors_io.SafetensorsFile._pread
def pread(self, f, offset, view):
  reads.append((os.path.basename(self.path), offset, len(view)))
  return orig(self, f, offset, view)
safetensors_io.SafetensorsFile._pread = pread
def ranges(name):
  fn, b, e = extent[name]
  return sorted((o - b, n) for f, o, n in reads if f == fn and b <= o < e)
checked = collections.Counter()
for side in (0, 1):
  weights.process_of = lambda d, side=side: abs(side - d.id // 2)  # the devices of `side` are process 0's
  reads.clear()
  part = jax.tree.leaves(load_params(path, cfg, mesh=mesh))
  for (kp, a), b in zip(ref, part):
    assert a.sharding == b.sharding and a.dtype == b.dtype
    want = {{s.device: np.asarray(s.data) for s in a.addressable_shards}}
    for s in b.addressable_shards:
      got = np.asarray(s.data)
      if weights.process_of(s.device) == 0:
        np.testing.assert_array_equal(got, want[s.device])              # (a) bit-equal
        checked["own"] += 1
      else:
        assert not got.any()                                            # (c) nothing read for the other side
        checked["other nonzero" if want[s.device].any() else "other"] += 1
  for n in extent:                                                      # no tensor read more than once
    assert sum(k for _, k in ranges(n)) <= files[extent[n][0]].nbytes(n), (n, ranges(n))
  t = side                                                              # this side's coordinate on `tensor`
  half = lambda n, row: [(t * n * row, n * row)]                        # rows [t*n, (t+1)*n) of `row` bytes
  expect = {{
      "embed.weight": half(128, 64 * 2), "head.weight": half(128, 64 * 2),          # bf16 [256, 64] by vocab
      "layers.0.attn.wq_b.weight": half(256, 32), "layers.0.attn.wq_b.scale": half(2, 1),   # fp8 [512, 32]
      "layers.0.attn.wo_b.weight": [(r * 64 + t * 32, 32) for r in range(64)],  # fp8 [64, 64] by columns
      "layers.0.attn.wo_b.scale": [(0, 1)],                             # [1, 1]: replicated, read once
      "layers.0.attn.wo_a.weight": half(32, 256), "layers.0.attn.wo_a.scale": [(0, 2)],    # covering block
      "layers.0.attn.attn_sink": half(2, 4), "layers.0.ffn.gate.tid2eid": half(128, 16),
      "layers.0.attn_norm.weight": [(0, 128)], "layers.0.hc_attn_fn": [(0, 24 * 256 * 4)],   # replicated
      # fp4 experts, 2 values a byte, 1x32 scales: w1 [32, 64] by rows, w2 [64, 32] by columns (its [64, 1]
      # scales are not split: replicated over `tensor`, read once)
      "layers.0.ffn.experts.0.w1.weight": half(16, 32), "layers.0.ffn.experts.0.w1.scale": half(16, 2),
      "layers.0.ffn.experts.5.w2.weight": [(r * 16 + t * 8, 8) for r in range(64)],
      "layers.0.ffn.experts.5.w2.scale": [(0, 64)],
  }}
  for n, want in expect.items():
    assert ranges(n) == sorted(want), (side, n, ranges(n), want)       # (b) only the owned slices
  for kind in ("dense", "experts"):
    group = [n for n in extent if (".experts." in n) == (kind == "experts")]
    read = sum(k for n in group for _, k in ranges(n))
    total = sum(files[extent[n][0]].nbytes(n) for n in group)
    print(f"side {{side}}: read {{read}} of {{total}} bytes of the {{kind}} tensors")
    assert read < total if kind == "dense" else 0.5 * total < read < 0.6 * total   # dense: mostly replicated
print("shards", dict(checked))
assert checked["own"] == checked["other"] + checked["other nonzero"], checked
assert checked["other nonzero"] > 20, checked
print("ok")
""", n_devices=4)
  assert "shards" in out


TWO_PROCESSES = """
import sys, dataclasses, numpy as np, jax
from dsv4_jax import distributed
address, pid, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
assert distributed.initialize(address, 2, pid) is True
from dsv4_jax import ModelConfig, load_params
from dsv4_jax.sharding import make_mesh
cfg = dataclasses.replace(ModelConfig.from_hf_config(path), dtype="float32", quant_sim=False)
whole = jax.tree.leaves(load_params(path, cfg))                 # on this process's first device
part = jax.tree.leaves(load_params(path, cfg, mesh=make_mesh("expert:4", cfg)))
n = 0
for a, b in zip(whole, part):
  assert not b.is_fully_addressable
  for s in b.addressable_shards:
    assert np.asarray(s.data).tobytes() == np.ascontiguousarray(np.asarray(a)[s.index]).tobytes()
    n += 1
print("process", pid, "shards equal", n)
print("ok")
"""


def test_two_real_processes_load_safetensors_by_slice(released):
  """Two jax.distributed processes of 2 CPU devices, mesh expert:4: each reads its own experts (the others
  zero in its host buffers, so the buffers differ between the processes, which `device_put` would reject) and
  its slices of the rest; every shard it holds equals its own single-device load."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
  procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, address, str(i), released[0]], cwd=ROOT,
                            env=cpu_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (out, err) in zip(procs, outs):
    print(out)
    assert p.returncode == 0 and out.strip().endswith("ok"), out[-2000:] + err[-4000:]
