"""MTP speculative decoding against plain decoding, same process: tokens per step, acceptance, tokens/s.

    python bench/speculative.py                     # the demo model (trained MTP head), then random weights
    python bench/speculative.py --max_new_tokens=96 --num_draft=1,2,3

For each model and draft count k it runs `generate` plainly and with `speculative="mtp", num_draft=k` on the
same prompts (greedy), checks the tokens are identical, and prints: verify steps, accepted drafts /
proposed, tokens per step (accepted + 1 per step), decode tokens/s of both and their ratio. Compile time is
excluded (`generate` compiles ahead of time and reports it apart). Random weights give an acceptance near
zero: that row shows the overhead of speculating, not a result. The demo model is tiny, so on a CPU its
step time is dominated by per-step overhead rather than weight reads; the speed-up that matters is on an
accelerator at real size, where a k+1-token verify step costs about what a 1-token step does.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from dsv4_jax import init_params, load_config  # noqa: E402
from dsv4_jax.data import shipped_assets  # noqa: E402
from dsv4_jax.generation import generate  # noqa: E402
from dsv4_jax.tokenizer import load_tokenizer  # noqa: E402
from dsv4_jax.weights import load_params  # noqa: E402

PROMPTS = ["I was", "The headmaster said that", "When I went back to the school,", "Red Shirt"]


def models():
  cfg = load_config("demo")
  ckpt, tok_path = shipped_assets("demo")
  tok = load_tokenizer(tok_path)
  prompts = [[tok.bos_id] + tok.encode(p) for p in PROMPTS]
  yield "demo (trained)", cfg, load_params(ckpt, cfg), prompts
  yield "demo (random)", cfg, init_params(cfg, jax.random.key(0)), prompts


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--max_new_tokens", type=int, default=64)
  ap.add_argument("--num_draft", default="1,2,3")
  ap.add_argument("--repeats", type=int, default=2, help="timed runs per setting (best taken)")
  args = ap.parse_args()
  ks = [int(k) for k in args.num_draft.split(",")]
  print(f"greedy, {len(PROMPTS)} prompts, {args.max_new_tokens} new tokens each, backend {jax.default_backend()}")
  print(f"{'model':16} {'k':>2} {'same':>5} {'steps':>6} {'accepted':>12} {'tok/step':>8} {'tok/s':>8} "
        f"{'plain tok/s':>11} {'speed-up':>8}")
  for name, cfg, params, prompts in models():
    run = lambda **kw: min((generate(params, cfg, prompts, args.max_new_tokens, stop_on_eos=False, **kw)
                            for _ in range(args.repeats)), key=lambda r: r.timings["decode_s"])
    plain = run()
    for k in ks:
      r = run(speculative="mtp", num_draft=k)
      t = r.timings
      steps, acc = sum(t["steps"]), sum(t["accepted"])
      print(f"{name:16} {k:>2} {str(r.tokens == plain.tokens):>5} {steps:>6} {f'{acc}/{k * steps}':>12} "
            f"{t['tokens_per_step']:>8.2f} {t['decode_tokens_per_s']:>8.1f} "
            f"{plain.timings['decode_tokens_per_s']:>11.1f} "
            f"{t['decode_tokens_per_s'] / plain.timings['decode_tokens_per_s']:>7.2f}x")


if __name__ == "__main__":
  main()
