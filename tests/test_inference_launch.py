"""`launch.decode` end to end in subprocesses: ids, text prompts and chat files through the V4 tokenizer,
the interactive chat, a converted checkpoint (split from test_inference.py so that the two xdist workers
share the inference tests)."""
import dataclasses
import json
import os
import subprocess
import sys

from dsv4_jax import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_launch_decode_end_to_end(tmp_path):
  out = tmp_path / "o.json"
  cmd = [sys.executable, "-m", "launch.decode", "--config=tiny", "--prompt_ids=5,17,300;7,8",
         "--max_new_tokens=6", f"--output_json={out}", "--temperature=0.7", "--top_p=0.9", "--seed=1"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "RANDOM weights" in proc.stderr
  data = json.loads(out.read_text())
  assert data["prompt_ids"] == [[5, 17, 300], [7, 8]] and data["random_weights"] is True
  assert [len(g) for g in data["generated_ids"]] == [6, 6] and data["stop_reasons"] == ["max_new_tokens"] * 2
  assert all(0 <= t < 512 for g in data["generated_ids"] for t in g)
  assert {"prefill_s", "decode_s", "decode_tokens_per_s"} <= set(data["timings"])
  bad = subprocess.run([sys.executable, "-m", "launch.decode", "--config=tiny", "--prompt_ids=5,9999"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert bad.returncode == 2 and "token id 9999 is outside the vocabulary [0, 512)" in bad.stderr


def test_launch_decode_text_prompt_and_chat_file(tmp_path):
  """--prompt / --chat go through the V4 tokenizer and chat format (a tiny model with the real vocabulary). The
  capacity is that of the interactive test below: with the run's persistent compilation cache
  (tests/conftest.py) the decode programs of these three processes are compiled once."""
  from dsv4_jax.chat import chat_prompt
  from dsv4_jax.tokenizer import load_tokenizer
  chat = tmp_path / "chat.json"
  chat.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hi there"}]}))
  tok = load_tokenizer()
  expected = {
      "--prompt=Hello world": tok.encode(chat_prompt("Hello world", thinking_mode="chat")),
      f"--chat={chat}": tok.encode(chat_prompt([{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hi there"}], thinking_mode="chat")),
  }
  for flag, ids in expected.items():
    out = tmp_path / "o.json"
    proc = subprocess.run([sys.executable, "-m", "launch.decode", "--config=tiny", "--config.vocab_size=129280",
                           flag, "--max_new_tokens=3", "--max_seq_len=256", f"--output_json={out}"], cwd=ROOT,
                          capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["prompt_ids"] == [ids] and ids[0] == tok.bos_id
    assert "[0] ids:" in proc.stdout


def test_launch_decode_interactive_chat():
  proc = subprocess.run([sys.executable, "-m", "launch.decode", "--config=tiny", "--config.vocab_size=129280",
                         "--chat=-", "--max_new_tokens=3", "--max_seq_len=256"], cwd=ROOT, input="Hi there\nAgain\n\n",
                        capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.count("user> ") == 3            # two turns answered, then the empty line ends the chat


def test_convert_then_decode_from_the_checkpoint(tmp_path):
  """launch.convert, then launch.decode --checkpoint (the config comes from its config.json): the same tokens
  as `generate` on the source safetensors in-process."""
  import hf_oracle
  from dsv4_jax import ModelConfig, load_params
  spec = hf_oracle.SPEC_A
  model, hf_cfg = hf_oracle.make_hf_model(spec, hf_oracle.MODEL_SEED)
  src, out, js = tmp_path / "st", tmp_path / "orbax", tmp_path / "o.json"
  hf_oracle.save_official(model, hf_cfg, str(src), spec)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  conv = subprocess.run([sys.executable, "-m", "launch.convert", f"--input={src}", f"--output={out}"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  assert conv.returncode == 0, conv.stderr[-2000:]
  dec = subprocess.run([sys.executable, "-m", "launch.decode", f"--checkpoint={out}", "--prompt_ids=5,17,30;7,8",
                        "--max_new_tokens=8", "--dtype=float32", f"--output_json={js}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert dec.returncode == 0, dec.stderr[-2000:]
  data = json.loads(js.read_text())
  assert data["random_weights"] is False
  cfg = dataclasses.replace(ModelConfig.from_hf_config(src), dtype="float32")
  assert data["generated_ids"] == generate(load_params(src, cfg), cfg, [[5, 17, 30], [7, 8]], 8).tokens
