"""A multi-host load from safetensors reads only the routed experts of the process's own devices
(weights.experts_to_read, stream_units(experts=...)): checked on the released layout (one tensor per expert,
fp4 with scales) and on HF's stacked expert tensors, and end to end on a 4-device mesh that pretends to be
two processes."""
import dataclasses

import numpy as np
import pytest

import hf_oracle
import released_format as rf
from dsv4_jax import ModelConfig
from dsv4_jax.checkpoint import safetensors_io, stream
from dsv4_jax.qarray import QArray
from fake_devices import run_script

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
mine = weights.experts_to_read(cfg, mesh, process_of=pretend)
assert mine == set(range(E // 2)), mine
whole = load_params(path, cfg)
weights.experts_to_read = functools.partial(weights.experts_to_read, process_of=pretend)
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
