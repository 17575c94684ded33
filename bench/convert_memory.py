"""Peak host memory of `launch.convert` on a multi-shard synthetic checkpoint in the released format.

    python bench/convert_memory.py [--size=large|small] [--workdir=/tmp/...]

Writes a released-format checkpoint of random bytes (fp8 + e8m0 128x128, packed fp4 experts, bf16, fp32,
int64 tid2eid, mtp.*; sharded with an index), converts it in a child process and prints that process's
peak RSS next to the checkpoint size, the largest shard and the largest layer. The fixed overhead
(Python, jax, orbax, tensorstore) is measured the same way on a tiny checkpoint and subtracted.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

import released_format  # noqa: E402  (tests/released_format.py)

MB = 2 ** 20

_CHILD = """
import json, resource, sys, time
from dsv4_jax.checkpoint import convert
t = time.time()
s = convert.convert(sys.argv[1], sys.argv[2], progress=False)
try:     # VmHWM: this process image's peak RSS (ru_maxrss would include the parent's image before exec)
  peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
except OSError:
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"maxrss": peak, "seconds": time.time() - t, "bytes_out": s.bytes_out}))
"""


def synthetic_config(dim: int, n_layers: int, n_experts: int, inter: int, vocab: int = 1024) -> dict:
  """Hub config.json keys of a small DeepSeek-V4 (sliding, then CSA / HCA alternating; 1 hash layer)."""
  return {
      "model_type": "deepseek_v4", "vocab_size": vocab, "hidden_size": dim, "num_hidden_layers": n_layers,
      "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 128, "qk_rope_head_dim": 64,
      "q_lora_rank": 256, "o_groups": 2, "o_lora_rank": 128, "sliding_window": 16,
      "compress_ratios": [0] + [4, 128] * ((n_layers - 1) // 2) + [4] * ((n_layers - 1) % 2) + [0],
      "index_n_heads": 8, "index_head_dim": 128, "index_topk": 8, "n_routed_experts": n_experts,
      "n_shared_experts": 1, "num_experts_per_tok": 2, "moe_intermediate_size": inter, "num_hash_layers": 1,
      "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "rope_theta": 10000.0, "compress_rope_theta": 160000.0,
      "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                       "beta_slow": 1},
      "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "num_nextn_predict_layers": 1,
      "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
  }


SIZES = {   # (dim, layers, experts, inter, shards): stored size about 430 MB / 140 MB / 1 MB
    "large": (1024, 7, 64, 512, 8),
    "small": (512, 5, 64, 512, 5),
    "tiny": (256, 3, 4, 64, 2),
}


def _convert_child(inp: str, out: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  r = subprocess.run([sys.executable, "-c", _CHILD, inp, out], capture_output=True, text=True, cwd=ROOT, env=env)
  if r.returncode:
    raise RuntimeError(f"conversion child failed:\n{r.stderr[-3000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def measure(size: str = "large", workdir: str | None = None) -> dict:
  own = workdir is None
  workdir = workdir or tempfile.mkdtemp(prefix="dsv4_convert_mem_")
  try:
    res = {}
    for name in ("tiny", size):
      dim, layers, experts, inter, shards = SIZES[name]
      src = os.path.join(workdir, f"{name}_src")
      info = released_format.write_synthetic(src, synthetic_config(dim, layers, experts, inter), shards)
      run = _convert_child(src, os.path.join(workdir, f"{name}_out"))
      res[name] = {**info, **run}
    big, base = res[size], res["tiny"]
    return {"size": size, "total": big["total"], "n_shards": big["n_shards"], "largest_shard": big["largest_shard"],
            "largest_layer": big["largest_layer"], "top": big["top"], "peak_rss": big["maxrss"],
            "baseline_rss": base["maxrss"], "growth": big["maxrss"] - base["maxrss"], "seconds": big["seconds"],
            "bytes_out": big["bytes_out"]}
  finally:
    if own:
      shutil.rmtree(workdir, ignore_errors=True)


def report(r: dict) -> str:
  return (f"checkpoint {r['total'] / MB:.0f} MiB in {r['n_shards']} shards (largest shard {r['largest_shard'] / MB:.0f} "
          f"MiB, largest layer {r['largest_layer'] / MB:.0f} MiB, embed+head+norms {r['top'] / MB:.1f} MiB); "
          f"converted in {r['seconds']:.1f} s to {r['bytes_out'] / MB:.0f} MiB\n"
          f"peak RSS {r['peak_rss'] / MB:.0f} MiB = baseline (imports + tiny conversion) {r['baseline_rss'] / MB:.0f} "
          f"MiB + growth {r['growth'] / MB:.0f} MiB  "
          f"(growth / largest layer = {r['growth'] / r['largest_layer']:.2f}, growth / checkpoint = "
          f"{r['growth'] / r['total']:.2f})")


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", default="large", choices=sorted(SIZES))
  ap.add_argument("--workdir", default=None)
  print(report(measure(**vars(ap.parse_args()))))
