"""Training data: plain text packed into fixed-length rows, or V4 chat JSONL masked to the assistant turns.

    ds = load_dataset("botchan.txt", tok, seq_len=256)                    # or fmt="chat" for a .jsonl
    it = BatchIterator(ds.train, batch_size=8, seed=0)
    batch = next(it)       # {"tokens": [B, S] int32, "loss_mask": [B, S] int32}
    it.position            # {"epoch": 0, "index": 8, "seed": 0, "n_rows": 344}: JSON, saved with a checkpoint
    BatchIterator(ds.train, 8, seed=0, position=saved)                  # continues with the very next batch

`loss_mask[b, t] = 1` when token t is a target: the loss predicts it from tokens[b, :t]. Position 0 is
never a target.

- text: the file is one document, `[BOS] + tok.encode(text) + [EOS]`, cut into rows of `seq_len`
  tokens; every token but a row's first is a target.
- chat: one JSON object per line with an OpenAI-style `messages` list (and optionally `tools`), rendered
  by our V4 encoder (dsv4_jax/chat, docs/chat_format.md §2); one conversation per row, padded (rows are not
  packed: the model has no document mask). The mask covers the assistant turns as rendered (answer,
  tool calls, the closing EOS; the `reasoning</think>` part only with `train_reasoning`), never the
  prompt, the user turns or the `<｜Assistant｜><think>` transition the prompt already holds. A
  conversation longer than `seq_len` is cut (counted in `DataStats.truncated`).

Held-out split: every k-th row (k = round(1 / eval_fraction)), so eval covers the whole file (the tail of
a text is often boilerplate). Bad input raises `DataError` naming the file (and line) before any compute.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator

import numpy as np

from dsv4_jax.chat import encoder as chat_encoder
from dsv4_jax.chat.tokens import ASSISTANT, BOS, THINK_END

FORMATS = ("text", "chat")


class DataError(ValueError):
  """Input data that cannot be trained on; the message names the file, line and what is wrong."""


@dataclasses.dataclass(frozen=True)
class Rows:
  """Fixed-length training rows: tokens [N, S] int32, loss_mask [N, S] int32 (1 = a target token)."""
  tokens: np.ndarray
  loss_mask: np.ndarray

  def __len__(self) -> int:
    return int(self.tokens.shape[0])

  def take(self, idx) -> "Rows":
    return Rows(self.tokens[idx], self.loss_mask[idx])


@dataclasses.dataclass(frozen=True)
class DataStats:
  path: str
  fmt: str
  seq_len: int
  n_tokens: int          # tokens in the rows (padding excluded)
  n_targets: int         # tokens under loss_mask, train + eval
  truncated: int = 0     # chat conversations cut at seq_len (and kept)
  dropped: int = 0       # chat conversations with no assistant token before seq_len (left out)

  def __str__(self):
    cut = f", {self.truncated} conversations cut at {self.seq_len}" if self.truncated else ""
    cut += f", {self.dropped} left out (no answer within {self.seq_len} tokens)" if self.dropped else ""
    return f"{self.path}: {self.fmt}, {self.n_tokens:,} tokens, {self.n_targets:,} targets{cut}"


@dataclasses.dataclass(frozen=True)
class Dataset:
  train: Rows
  eval: Rows | None
  stats: DataStats


def load_dataset(path: str | os.PathLike, tok, seq_len: int, fmt: str = "text", eval_fraction: float = 0.05,
                 thinking_mode: str = "chat", train_reasoning: bool = True, vocab_size: int | None = None,
                 max_seq_len: int | None = None) -> Dataset:
  """Reads, tokenises and splits `path`; every check runs here, before any model compute.

  `vocab_size` / `max_seq_len`: the model's limits (token ids must fit, `seq_len` must not exceed it).
  """
  path = os.fspath(path)
  if fmt not in FORMATS:
    raise DataError(f"format {fmt!r} is not supported; expected one of {FORMATS}.")
  if seq_len < 2:
    raise DataError(f"seq_len={seq_len}: need at least 2 tokens per row (one input, one target).")
  if max_seq_len is not None and seq_len > max_seq_len:
    raise DataError(f"seq_len={seq_len} is past the model's max_seq_len={max_seq_len}; use a shorter seq_len "
                    "(or a config with a larger max_seq_len).")
  if not 0 <= eval_fraction < 1:
    raise DataError(f"eval_fraction={eval_fraction}: expected a fraction in [0, 1).")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data file {path!r} does not exist.")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if not text.strip():
    raise DataError(f"data file {path!r} is empty.")
  if fmt == "text":
    rows = pack_text(text, tok, seq_len, where=path)
    info = {"n_tokens": rows.tokens.size}
  else:
    rows, info = chat_rows(text, tok, seq_len, thinking_mode, train_reasoning, where=path)
  if vocab_size is not None and int(rows.tokens.max()) >= vocab_size:
    raise DataError(f"{path}: token id {int(rows.tokens.max())} from the tokenizer is past the model's vocab_size="
                    f"{vocab_size}; use the tokenizer the model was built for.")
  train, held_out = split(rows, eval_fraction, where=path)
  stats = DataStats(path, fmt, seq_len, n_targets=int(rows.loss_mask.sum()), **info)
  return Dataset(train, held_out, stats)


def split(rows: Rows, eval_fraction: float, where: str = "data") -> tuple[Rows, Rows | None]:
  """Every k-th row (k = round(1 / eval_fraction)) held out; (train, eval or None)."""
  if eval_fraction == 0:
    return rows, None
  k = max(2, round(1 / eval_fraction))
  is_eval = np.arange(len(rows)) % k == k - 1
  if not is_eval.any():
    raise DataError(f"{where}: {len(rows)} row(s) of data, too few to hold out eval_fraction={eval_fraction} "
                    f"(every {k}th row); add data, use a shorter seq_len or eval_fraction=0.")
  return rows.take(~is_eval), rows.take(is_eval)


# ----------------------------------------------------------------------------- text


def pack_text(text: str, tok, seq_len: int, where: str = "text") -> Rows:
  """`[BOS] + tok.encode(text) + [EOS]` cut into rows of `seq_len` tokens (the last partial row dropped)."""
  ids = [tok.bos_id] if tok.bos_id is not None else []
  ids += _encode_long(tok, text)
  ids += [tok.eos_id] if tok.eos_id is not None else []
  n = len(ids) // seq_len
  if n == 0:
    raise DataError(f"{where}: {len(ids)} tokens, fewer than one row of seq_len={seq_len}.")
  tokens = np.asarray(ids[: n * seq_len], np.int32).reshape(n, seq_len)
  mask = np.ones_like(tokens)
  mask[:, 0] = 0
  return Rows(tokens, mask)


def _encode_long(tok, text: str, block: int = 1 << 20) -> list[int]:
  """tok.encode in blocks of about `block` characters cut after a newline (bounded tokenizer memory)."""
  out, start = [], 0
  while start < len(text):
    end = len(text) if len(text) - start <= block else text.rfind("\n", start, start + block) + 1
    end = end if end > start else min(len(text), start + block)
    out += tok.encode(text[start:end])
    start = end
  return out


# ----------------------------------------------------------------------------- chat


def chat_segments(messages: list[dict], thinking_mode: str = "chat", drop_thinking: bool = True) -> list[tuple[str, str]]:
  """The V4 rendering of a conversation as (kind, text) pieces, kind "prompt" | "reasoning" | "answer".

  `"".join(text) == encode_messages(messages, thinking_mode, drop_thinking=drop_thinking)` (tested): the
  same turns as the encoder's loop, with each assistant turn split into its `reasoning</think>` head and
  the rest (content, DSML tool calls, EOS).
  """
  E = chat_encoder
  if thinking_mode not in E.THINKING_MODES:
    raise ValueError(f"thinking_mode must be one of {E.THINKING_MODES}, got {thinking_mode!r}")
  full = E._order_tool_results(E._merge_tool_results(messages))
  thinking = thinking_mode == "thinking"
  drop = drop_thinking and not any(m.get("tools") for m in full)
  if thinking and drop:
    full = E._drop_old_thinking(full)
  last_user = E._last_user_index(full)
  out = [("prompt", BOS)]
  for i, msg in enumerate(full):
    text = E._render_turn(full, i, thinking, drop, last_user)
    if msg["role"] == "assistant":
      after_task = i > 0 and full[i - 1].get("task") is not None
      head = (msg.get("reasoning_content") or "") + THINK_END
      if thinking and not after_task and (not drop or i > last_user):     # as _render_turn decides
        assert text.startswith(head), "encoder and chat_segments disagree on the reasoning part"
        out += [("reasoning", head), ("answer", text[len(head):])]
      else:
        out.append(("answer", text))
    else:
      out.append(("prompt", text))
    out.append(("prompt", E._transition(full, i, thinking, drop, last_user)))
  return [(k, t) for k, t in out if t]


def encode_chat(messages: list[dict], tok, thinking_mode: str = "chat",
                train_reasoning: bool = True) -> tuple[list[int], list[int]]:
  """(token ids, loss mask) of one conversation. Pieces are tokenised one by one; every cut between
  them sits next to a control token, so the ids equal `tok.encode(encode_messages(...))`."""
  trained = {"answer"} | ({"reasoning"} if train_reasoning else set())
  ids, mask = [], []
  pieces = chat_segments(messages, thinking_mode)
  merged: list[list] = []
  for kind, text in pieces:                       # consecutive pieces of the same mask value: one encode
    m = int(kind in trained)
    if merged and merged[-1][0] == m:
      merged[-1][1] += text
    else:
      merged.append([m, text])
  for m, text in merged:
    piece = tok.encode(text)
    ids += piece
    mask += [m] * len(piece)
  return ids, mask


def chat_rows(text: str, tok, seq_len: int, thinking_mode: str = "chat", train_reasoning: bool = True,
              where: str = "chat") -> tuple[Rows, dict]:
  """One row per JSONL line (blank lines skipped), padded -> (rows, {"n_tokens" (before padding),
  "truncated" (cut at seq_len), "dropped" (no assistant token left within seq_len)})."""
  try:
    tok.token_to_id(ASSISTANT)
  except KeyError:
    raise DataError(f"{where}: the chat format needs a tokenizer with the V4 control tokens ({ASSISTANT!r} is "
                    f"not one of {tok!r}'s); use the DeepSeek-V4 tokenizer (--tokenizer unset) or --format=text.")
  pad = _pad_id(tok)
  toks, masks, info = [], [], {"n_tokens": 0, "truncated": 0, "dropped": 0}
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    messages = _messages(line, f"{where}:{n}")
    try:
      ids, mask = encode_chat(messages, tok, thinking_mode, train_reasoning)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
      raise DataError(f"{where}:{n}: not valid messages: {e}") from None
    cut = len(ids) > seq_len
    ids, mask = ids[:seq_len], mask[:seq_len]
    if not any(mask[1:]):
      info["dropped"] += 1                      # nothing left to learn from (its answer is past seq_len)
      continue
    info["truncated"] += cut
    info["n_tokens"] += len(ids)
    toks.append(ids + [pad] * (seq_len - len(ids)))
    masks.append(mask + [0] * (seq_len - len(mask)))
  if not toks:
    raise DataError(f"{where}: no conversation with an assistant token within seq_len={seq_len}.")
  mask = np.asarray(masks, np.int32)
  mask[:, 0] = 0
  return Rows(np.asarray(toks, np.int32), mask), info


def _messages(line: str, where: str) -> list[dict]:
  """The messages of one JSONL line: {"messages": [...], "tools": [...]?} or a bare list of messages."""
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}).") from None
  messages = obj.get("messages") if isinstance(obj, dict) else obj
  if not isinstance(messages, list) or not messages:
    raise DataError(f"{where}: expected an object with a non-empty 'messages' list (OpenAI style); got "
                    f"{_excerpt(line)}.")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in chat_encoder.ROLES:
      role = m.get("role") if isinstance(m, dict) else None
      raise DataError(f"{where}: message {i} has role {role!r}; expected one of {chat_encoder.ROLES}.")
    content = m.get("content")
    if content is not None and not isinstance(content, (str, list)):
      raise DataError(f"{where}: message {i} content is a {type(content).__name__}; expected a string, a list "
                      "of content parts or null.")
  if not any(m["role"] == "assistant" for m in messages):
    raise DataError(f"{where}: no assistant message, so nothing to train on.")
  if isinstance(obj, dict) and obj.get("tools"):
    from dsv4_jax.chat import attach_tools
    messages = attach_tools(messages, obj["tools"])
  return messages


def _excerpt(s: str, n: int = 60) -> str:
  return repr(s if len(s) <= n else s[:n] + "...")


def _pad_id(tok) -> int:
  for i in (tok.pad_id, tok.eos_id):
    if i is not None:
      return int(i)
  return 0


# ----------------------------------------------------------------------------- batches


class BatchIterator:
  """Endless, deterministic batches of `batch_size` rows: each epoch a fresh permutation drawn from
  (seed, epoch), batches running on across epoch ends. `position` is all the state there is."""

  def __init__(self, rows: Rows, batch_size: int, seed: int = 0, position: dict | None = None,
               shuffle: bool = True):
    if batch_size < 1:
      raise DataError(f"batch_size={batch_size}: expected >= 1.")
    self.rows, self.batch_size, self.seed, self.shuffle = rows, batch_size, int(seed), shuffle
    self.epoch, self.index = 0, 0
    if position is not None:
      self._restore(position)
    self._order_epoch, self._order = None, None

  def _restore(self, p: dict) -> None:
    if int(p["n_rows"]) != len(self.rows) or int(p["seed"]) != self.seed:
      raise DataError(f"the saved data position is for {p['n_rows']} rows with seed {p['seed']}, but the data now "
                      f"has {len(self.rows)} rows with seed {self.seed}: resume with the same --data, seq_len, "
                      "tokenizer, eval fraction and seed (or start a new workdir).")
    self.epoch, self.index = int(p["epoch"]), int(p["index"])

  @property
  def position(self) -> dict:
    return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n_rows": len(self.rows)}

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._order_epoch != epoch:
      n = len(self.rows)
      self._order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n))
      self._order_epoch = epoch
    return self._order

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    idx = []
    while len(idx) < self.batch_size:
      order = self._permutation(self.epoch)
      take = min(self.batch_size - len(idx), len(order) - self.index)
      idx.extend(order[self.index: self.index + take])
      self.index += take
      if self.index == len(order):
        self.epoch, self.index = self.epoch + 1, 0
    return as_batch(self.rows.take(np.asarray(idx)))


def as_batch(rows: Rows) -> dict:
  return {"tokens": rows.tokens, "loss_mask": rows.loss_mask}


def eval_batches(rows: Rows, batch_size: int) -> list[dict]:
  """All of `rows` in order, in batches of `batch_size` (the last one filled with masked-out rows)."""
  out = []
  for s in range(0, len(rows), batch_size):
    part = rows.take(np.arange(s, min(s + batch_size, len(rows))))
    short = batch_size - len(part)
    if short:
      part = Rows(np.concatenate([part.tokens, np.repeat(part.tokens[:1], short, 0)]),
                  np.concatenate([part.loss_mask, np.zeros((short,) + part.loss_mask.shape[1:], np.int32)]))
    out.append(as_batch(part))
  return out


def shipped_assets(config_name: str) -> tuple[str | None, str | None]:
  """(checkpoint dir, SentencePiece model) shipped for a small config in dsv4_jax/assets/NAME/ (the demo model
  and the tokenizer it was trained with), each None when absent."""
  root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", config_name)
  ckpt = root if os.path.isfile(os.path.join(root, "dsv4_manifest.json")) else None
  tok = os.path.join(root, "tokenizer.model")
  return ckpt, tok if os.path.isfile(tok) else None


def default_tokenizer_path(config_name: str) -> str | None:
  """The SentencePiece model a small config was trained with (None: DeepSeek-V4's own tokenizer)."""
  return shipped_assets(config_name)[1]


__all__ = ["DataError", "Rows", "DataStats", "Dataset", "load_dataset", "split", "pack_text", "chat_segments",
           "encode_chat", "chat_rows", "BatchIterator", "eval_batches", "as_batch", "shipped_assets",
           "default_tokenizer_path", "FORMATS"]
