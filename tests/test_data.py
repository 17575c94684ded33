"""dsv4_jax/data.py: text packing, chat masking (the loss covers exactly the assistant turns), the held-out
split, resumable batches, and a clear error for each kind of bad input. No JAX compute here."""
import json
import os

import numpy as np
import pytest

import chat_corpus
from dsv4_jax import data
from dsv4_jax.chat import encode_messages
from dsv4_jax.chat.tokens import ASSISTANT, BOS, EOS, THINK_END, THINK_START, USER
from dsv4_jax.tokenizer import load_tokenizer

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
BOTCHAN = os.path.join(ASSETS, "botchan.txt")
SP_MODEL = os.path.join(ASSETS, "botchan_en_bpe_1000.model")


@pytest.fixture(scope="module")
def sp():
  return load_tokenizer(SP_MODEL)


@pytest.fixture(scope="module")
def v4():
  return load_tokenizer()


def _write(tmp_path, name, text):
  p = tmp_path / name
  p.write_text(text, encoding="utf-8")
  return str(p)


# ----------------------------------------------------------------------------- text


def test_pack_text_is_the_token_stream_cut_into_rows(sp):
  text = open(BOTCHAN, encoding="utf-8").read()
  rows = data.pack_text(text, sp, 64)
  stream = [sp.bos_id] + sp.encode(text) + [sp.eos_id]
  assert rows.tokens.dtype == np.int32 and rows.tokens.shape == (len(stream) // 64, 64)
  np.testing.assert_array_equal(rows.tokens.ravel(), stream[: rows.tokens.size])
  assert (rows.loss_mask[:, 0] == 0).all() and (rows.loss_mask[:, 1:] == 1).all()


def test_load_dataset_holds_out_every_kth_row(sp):
  ds = data.load_dataset(BOTCHAN, sp, 128, eval_fraction=0.1, vocab_size=1000, max_seq_len=512)
  every = data.pack_text(open(BOTCHAN, encoding="utf-8").read(), sp, 128)
  k = 10
  np.testing.assert_array_equal(ds.eval.tokens, every.tokens[k - 1::k])
  assert len(ds.train) + len(ds.eval) == len(every)
  assert ds.stats.n_tokens == every.tokens.size
  assert data.load_dataset(BOTCHAN, sp, 128, eval_fraction=0).eval is None


# ----------------------------------------------------------------------------- chat


def _masked_text(tok, ids, mask):
  """The masked tokens decoded, one string per contiguous run."""
  runs, cur = [], []
  for i, m in zip(ids, mask):
    if m:
      cur.append(i)
    elif cur:
      runs.append(tok.decode(cur))
      cur = []
  if cur:
    runs.append(tok.decode(cur))
  return runs


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!", "reasoning_content": "A greeting."},
    {"role": "user", "content": "What is 1+1?"},
    {"role": "assistant", "content": "2", "reasoning_content": "One plus one."},
]


def test_chat_mask_covers_the_assistant_turns_chat_mode(v4):
  ids, mask = data.encode_chat(CONVERSATION, v4, "chat")
  assert ids == v4.encode(encode_messages(CONVERSATION, "chat"))
  # Chat mode renders no reasoning: each assistant turn is its content + EOS, opened by the prompt's
  # <｜Assistant｜></think> transition (never trained).
  assert _masked_text(v4, ids, mask) == ["Hello!" + EOS, "2" + EOS]
  prompt = v4.decode([i for i, m in zip(ids, mask) if not m])
  assert prompt == BOS + "Be brief." + USER + "Hi there" + ASSISTANT + THINK_END + USER + "What is 1+1?" + \
      ASSISTANT + THINK_END


def test_chat_mask_thinking_mode_with_and_without_reasoning(v4):
  ids, mask = data.encode_chat(CONVERSATION, v4, "thinking", train_reasoning=True)
  assert ids == v4.encode(encode_messages(CONVERSATION, "thinking"))
  # drop_thinking: the first answer (before the last user turn) loses its reasoning; the last keeps it.
  assert _masked_text(v4, ids, mask) == ["Hello!" + EOS, "One plus one." + THINK_END + "2" + EOS]
  ids2, mask2 = data.encode_chat(CONVERSATION, v4, "thinking", train_reasoning=False)
  assert ids2 == ids
  assert _masked_text(v4, ids2, mask2) == ["Hello!" + EOS, "2" + EOS]
  assert v4.decode(ids[: ids.index(v4.token_to_id(THINK_START)) + 1]).endswith(ASSISTANT + THINK_START)


def _controls(tok):
  return [t for t in tok.special_tokens if t.startswith("<｜") or t in (THINK_START, THINK_END)]


@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_chat_segments_match_the_encoder_on_the_corpus(v4, mode):
  """Over generated conversations (tools, tool results, tasks, reminders, unicode): the segments join to
  the encoder's prompt; the masked tokens decode to exactly the assistant segments; and where every cut
  sits next to a control token (every ordinary turn) the ids are the encoder's prompt tokenised whole."""
  controls = _controls(v4)
  cases = [c for c in chat_corpus.generate(300, seed=1) if not c["context"] and c["reasoning_effort"] is None
           and c["add_default_bos_token"] and c["drop_thinking"]
           and any(m.get("role") == "assistant" for m in c["messages"])]
  whole = 0
  for c in cases:
    msgs = c["messages"]
    segs = data.chat_segments(msgs, mode)
    prompt = encode_messages(msgs, mode)
    assert "".join(t for _, t in segs) == prompt
    ids, mask = data.encode_chat(msgs, v4, mode)
    assert v4.decode(ids) == prompt
    trained = "".join(t for k, t in segs if k != "prompt")
    assert "".join(_masked_text(v4, ids, mask)) == trained
    cuts_clean = all(any(a.endswith(x) for x in controls) or any(b.startswith(x) for x in controls)
                     for (ka, a), (kb, b) in zip(segs, segs[1:]) if (ka == "prompt") != (kb == "prompt"))
    if cuts_clean:
      assert ids == v4.encode(prompt)
      whole += 1
  assert whole > 0.8 * len(cases) > 40


def test_chat_rows_pad_truncate_and_mask(tmp_path, v4):
  long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
  short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello " * 30}]}
  path = _write(tmp_path, "c.jsonl", "\n".join(json.dumps(x) for x in (short, short, long)) + "\n\n")
  ds = data.load_dataset(path, v4, 24, fmt="chat", eval_fraction=0)
  # `long` is cut at 24 tokens inside its user turn: nothing to learn, so dropped; `short` is cut and kept.
  assert len(ds.train) == 2 and (ds.stats.truncated, ds.stats.dropped) == (2, 1)
  ids, mask = data.encode_chat(short["messages"], v4)
  np.testing.assert_array_equal(ds.train.tokens[0], ids[:24])
  np.testing.assert_array_equal(ds.train.loss_mask[0], mask[:24])
  path = _write(tmp_path, "d.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "yo"}]}))
  ds = data.load_dataset(path, v4, 64, fmt="chat", eval_fraction=0)
  n = len(data.encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], v4)[0])
  assert (ds.train.tokens[0, n:] == v4.pad_id).all() and (ds.train.loss_mask[0, n:] == 0).all()


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("content, fmt, match", [
    ("", "text", "is empty"),
    ("  \n\n ", "text", "is empty"),
    ("too short", "text", "fewer than one row"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n{not json\n',
     "chat", r"c\.data:2: not valid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n\n'
     '{"messages": [{"role": "robot", "content": "hi"}]}\n', "chat", r"c\.data:3: message 0 has role 'robot'"),
    ('{"text": "no messages here"}\n', "chat", r"c\.data:1: expected an object with a non-empty 'messages'"),
    ('[{"role": "user", "content": "only a question"}]\n', "chat", r"c\.data:1: no assistant message"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}\n', "chat",
     r"c\.data:1: message 0 content is a int"),
    ('{"messages": [{"role": "user", "content": "q", "task": "dance"}, {"role": "assistant", "content": "x"}]}\n',
     "chat", r"c\.data:1: not valid messages: unknown task 'dance'"),
])
def test_bad_data_is_a_clear_error(tmp_path, v4, sp, content, fmt, match):
  path = _write(tmp_path, "c.data", content)
  with pytest.raises(data.DataError, match=match):
    data.load_dataset(path, v4 if fmt == "chat" else sp, 32, fmt=fmt, eval_fraction=0)


def test_other_input_errors(tmp_path, sp, v4):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.load_dataset(str(tmp_path / "missing.txt"), sp, 32)
  with pytest.raises(data.DataError, match=r"seq_len=1024 is past the model's max_seq_len=512"):
    data.load_dataset(BOTCHAN, sp, 1024, max_seq_len=512)
  with pytest.raises(data.DataError, match="past the model's vocab_size=512"):
    data.load_dataset(BOTCHAN, sp, 64, vocab_size=512)
  with pytest.raises(data.DataError, match="needs a tokenizer with the V4 control tokens"):
    data.load_dataset(_write(tmp_path, "c.jsonl", '[{"role": "assistant", "content": "x"}]'), sp, 32, fmt="chat")
  with pytest.raises(data.DataError, match="too few to hold out"):
    data.load_dataset(BOTCHAN, sp, 64, eval_fraction=1e-6)


# ----------------------------------------------------------------------------- batches


def _rows(n, s=4):
  t = np.arange(n * s, dtype=np.int32).reshape(n, s)
  return data.Rows(t, np.ones_like(t))


def test_batches_cover_each_epoch_and_resume_exactly():
  rows = _rows(10)
  it = data.BatchIterator(rows, 4, seed=3)
  first = [next(it)["tokens"][:, 0] // 4 for _ in range(5)]                 # 20 rows: two epochs
  assert sorted(np.concatenate(first)[:10]) == list(range(10))
  assert sorted(np.concatenate(first)[10:]) == list(range(10))
  assert not np.array_equal(np.concatenate(first)[:10], np.concatenate(first)[10:])   # reshuffled
  it = data.BatchIterator(rows, 4, seed=3)
  for _ in range(3):
    next(it)
  saved = json.loads(json.dumps(it.position))
  assert saved == {"epoch": 1, "index": 2, "seed": 3, "n_rows": 10}
  rest = [next(it)["tokens"] for _ in range(4)]
  again = data.BatchIterator(rows, 4, seed=3, position=saved)
  for b in rest:
    np.testing.assert_array_equal(next(again)["tokens"], b)
  with pytest.raises(data.DataError, match="saved data position is for 10 rows"):
    data.BatchIterator(_rows(11), 4, seed=3, position=saved)


def test_eval_batches_pad_with_masked_rows():
  out = data.eval_batches(_rows(5), 4)
  assert [b["tokens"].shape for b in out] == [(4, 4), (4, 4)]
  np.testing.assert_array_equal(out[1]["loss_mask"].sum(axis=1), [4, 0, 0, 0])
