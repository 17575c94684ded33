"""The launch scripts speak with one voice (launch/common.py): an expected failure is one `error: ...` line on
stderr with exit code 2, a bug keeps its traceback, the log stays at WARNING unless --verbosity asks, a
--max_new_tokens stop inside the reasoning is not "malformed output", and pyproject declares what the package
imports. CLI checks run the scripts in subprocesses (each pays the jax import): keep their number small."""
import io
import json
import os
import re
import struct
import subprocess
import sys
import tomllib

import pytest

from dsv4_jax.chat import ParseError, StreamParser
from dsv4_jax.chat.events import EventPrinter, Stopped, cut_short, format_event
from dsv4_jax.config import config_names
from launch import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSL_DEBUG_OR_INFO = re.compile(r"^[ID]\d{4} ", re.M)     # absl's prefix of INFO / DEBUG lines: I1202 09:57:39...


def _run(*args, env=None, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env=env or dict(os.environ, JAX_PLATFORMS="cpu"))


def _first_line(text: str) -> str:
  return text.strip().splitlines()[0] if text.strip() else ""


# ---- one-line errors ------------------------------------------------------------------------------------

def test_convert_truncated_shard_is_one_error_line(tmp_path):
  src = tmp_path / "ckpt"
  src.mkdir()
  (src / "config.json").write_text(json.dumps({
      "model_type": "deepseek_v4", "vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 7,
      "num_attention_heads": 4, "head_dim": 96, "qk_rope_head_dim": 32, "q_lora_rank": 64, "o_groups": 2,
      "o_lora_rank": 64, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
      "compress_ratios": [0, 0, 4, 8, 4, 8, 4, 0]}))
  header = json.dumps({"embed.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
  (src / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(20))   # 64 promised
  r = _run("-m", "launch.convert", f"--input={src}", f"--output={tmp_path / 'out'}")
  assert r.returncode == 2, r.stderr[-2000:]
  assert _first_line(r.stderr).startswith("error: ") and "truncated" in _first_line(r.stderr), r.stderr
  assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_convert_missing_flags_is_one_error_line():
  r = _run("-m", "launch.convert")
  assert r.returncode == 2, r.stderr[-2000:]
  assert _first_line(r.stderr).startswith("error: flag --input=None"), r.stderr
  assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flag, expect", [
    ("--config=nosuch", "error: no config named 'nosuch': use one of " + ", ".join(config_names())),
    ("--prompt_ids=", "error: --prompt_ids='': empty prompt"),
    ("--config.nosuch_field=1", "error: the config has no field 'nosuch_field'"),
])
def test_decode_bad_input_is_one_error_line(flag, expect):
  args = [flag] if flag.startswith("--config=") else ["--config=tiny", flag]
  r = _run("-m", "launch.decode", *args)
  assert r.returncode == 2, r.stderr[-2000:]
  assert _first_line(r.stderr).startswith(expect), r.stderr
  assert "Traceback" not in r.stderr and "Errno" not in r.stderr


def test_decode_is_quiet_by_default():
  """jax's backend probing logs INFO ("Unable to initialize backend 'tpu'") when JAX_PLATFORMS is unset: none
  of it shows. The run fails cleanly before allocating (the pro config fits no single machine)."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  r = _run("-m", "launch.decode", "--config=pro", "--prompt_ids=5,17", "--max_new_tokens=4", env=env)
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1].startswith("error: config 'pro'") and "needs" in r.stderr
  assert not ABSL_DEBUG_OR_INFO.search(r.stderr), r.stderr
  assert "Traceback" not in r.stderr


SCRIPT = """
import logging, sys
from absl import logging as absl_logging
from launch import common

def main(argv):
  logging.getLogger("some.library").info("library chatter")
  absl_logging.info("absl chatter")
  if "--bug" in argv:
    raise TypeError("a genuine bug")
  raise ValueError("bad input: change X")

common.run(main)
"""


@pytest.mark.parametrize("args, rc, info, traceback", [
    ([], 2, False, False),                # default: WARNING; the expected error is one line
    (["-v", "1", "--", "--bug"], 1, True, True),   # --verbosity asks for the log; a bug keeps its traceback
])
def test_common_run_log_level_and_errors(args, rc, info, traceback):
  r = _run("-c", SCRIPT, *args)
  assert r.returncode == rc, r.stderr[-2000:]
  assert ("library chatter" in r.stderr and "absl chatter" in r.stderr) == info, r.stderr
  assert ("Traceback" in r.stderr) == traceback, r.stderr
  if rc == 2:
    assert r.stderr.strip().splitlines() == ["error: bad input: change X"]
  else:
    assert "TypeError: a genuine bug" in r.stderr


# ---- in-process: the helpers ----------------------------------------------------------------------------

def test_config_argv_resolves_names_and_refuses_unknown_ones(tmp_path):
  tiny = os.path.join(common.CONFIG_DIR, "tiny.py")
  own = tmp_path / "mine.py"
  own.write_text("")
  argv = ["prog", "--config=tiny", "--config.dtype=float32", "--config", "flash:x", f"--config={own}", "--",
          "--config=nosuch"]
  assert common.config_argv(argv) == ["prog", f"--config={tiny}", "--config.dtype=float32", "--config",
                                      os.path.join(common.CONFIG_DIR, "flash.py") + ":x", f"--config={own}", "--",
                                      "--config=nosuch"]
  with pytest.raises(common.UsageError, match=r"no config named 'nosuch': use one of .*flash.*tiny"):
    common.config_argv(["prog", "--config=nosuch"])
  with pytest.raises(common.UsageError, match="no config named"):
    common.config_argv(["prog", "--config", "configs/nosuch.py"])


def test_error_line_is_one_line():
  assert common.error_line(ValueError("a\n  b")) == "error: a b"
  assert common.error_line("x", hint="see --help") == "error: x (see --help)"
  quoted = "Error whilst parsing config file: Traceback (most recent call last):\n  File ...\nTypeError: bad arg\n"
  assert common.error_line(quoted) == "error: Error whilst parsing config file: TypeError: bad arg"
  assert common.error_line(MemoryError()) == "error: MemoryError"


def test_parse_ids():
  assert common.parse_ids("5,17,300;7,8", "--prompt_ids") == [[5, 17, 300], [7, 8]]
  assert common.parse_ids("5, 17,", "--stop_ids", sequences=False) == [5, 17]
  assert common.parse_ids("", "--stop_ids", sequences=False) == []
  for bad in ("", " ", "5;", ";5", "5,;,"):
    with pytest.raises(common.UsageError, match="empty prompt"):
      common.parse_ids(bad, "--prompt_ids")
  with pytest.raises(common.UsageError, match=r"--prompt_ids='5,x': expected comma-separated integers"):
    common.parse_ids("5,x", "--prompt_ids")


# ---- a length stop is not malformed output --------------------------------------------------------------

def _printed(events) -> str:
  out = io.StringIO()
  EventPrinter(out)(events)
  return out.getvalue()


def test_length_stop_inside_the_reasoning_is_not_malformed():
  parser = StreamParser("thinking")
  events = parser.feed("Let me think") + parser.finish()       # the output ends inside the reasoning
  assert any(isinstance(e, ParseError) for e in events)          # the parser alone cannot tell why
  assert "malformed output: output ended inside the reasoning" in _printed(events)   # EOS there: malformed
  cut = cut_short(events, "at the token limit (--max_new_tokens)")
  assert cut[-1] == Stopped("at the token limit (--max_new_tokens)", "inside the reasoning")
  text = _printed(cut)
  assert text.endswith("[stopped]\nstopped at the token limit (--max_new_tokens) inside the reasoning\n")
  assert "malformed" not in text
  assert cut_short([ParseError("text after the tool_calls block: x")], "at the token limit") == \
      [ParseError("text after the tool_calls block: x")]           # text the parser rejects stays malformed
  assert format_event(Stopped("at a --stop_ids token", "inside the tool_calls block")) == \
      "stopped at a --stop_ids token inside the tool_calls block"


def test_show_completion_says_it_stopped_at_the_token_limit():
  from dsv4_jax.runtime import show_completion
  from dsv4_jax.tokenizer import load_tokenizer
  tok = load_tokenizer()
  ids = tok.encode("Let me think about this")
  out = io.StringIO()
  msg = show_completion(tok, ids, "thinking", stream=out, stop_reason="max_new_tokens")
  assert "[stopped]\nstopped at the token limit (--max_new_tokens) inside the reasoning" in out.getvalue()
  assert "malformed" not in out.getvalue() and "errors" not in msg
  out = io.StringIO()
  show_completion(tok, ids + [tok.eos_id], "thinking", stream=out, stop_reason="eos")
  assert "malformed output: output ended inside the reasoning" in out.getvalue()


# ---- pyproject declares what the package imports --------------------------------------------------------

def _files_importing(module: str, package_dirs) -> list[str]:
  pattern = re.compile(rf"^\s*(import|from)\s+{module}\b", re.M)
  hits = []
  for d in package_dirs:
    for base, _, files in os.walk(os.path.join(ROOT, d)):
      hits += [os.path.join(base, f) for f in files
               if f.endswith(".py") and pattern.search(open(os.path.join(base, f), encoding="utf-8").read())]
  return hits


def test_safetensors_is_a_test_dependency_only():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  name = lambda req: re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower()
  assert "safetensors" not in {name(r) for r in project["dependencies"]}
  assert "safetensors" in {name(r) for r in project["optional-dependencies"]["test"]}
  packages = ["dsv4_jax", "launch", "configs", "pallas_kernels"]
  assert _files_importing("safetensors", packages) == []         # dsv4_jax/checkpoint/safetensors_io.py reads them
  assert _files_importing("safetensors", ["tests"])              # the HF oracle does use the package
