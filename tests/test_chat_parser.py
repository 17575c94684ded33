"""parse_completion and StreamParser: the inverse of the encoder, chunking-invariant, fail-closed.

Completions come from the generated corpus rendered by the encoder (every assistant turn), checked
against the original messages and against DeepSeek's own parser; malformed ones are hand-written,
one per failure mode that other stacks shipped (docs/chat_format.md §3).
"""

import io
import json
import random

import pytest

import chat_corpus
from dsv4_jax.chat import (ContentDelta, DSMLError, EventPrinter, ParseError, ReasoningDelta, StreamParser,
                           ToolCall, encode_messages, format_event, merge_deltas, parse_completion,
                           to_message)
from dsv4_jax.chat.dsml import arguments_dict
from dsv4_jax.chat.tokens import TASK_TOKENS

EOS = "<｜end▁of▁sentence｜>"
D = "｜DSML｜"
CORPUS = chat_corpus.generate(n=600, seed=0)
ENCODE_ARGS = ("thinking_mode", "reasoning_effort", "drop_thinking", "add_default_bos_token")


@pytest.fixture(scope="module")
def official():
    return chat_corpus.load_official_encoder()


def _assistant_turns():
    """(completion text, thinking mode, original assistant message) for every assistant turn."""
    turns = []
    for case in CORPUS:
        msgs = (case["context"] or []) + case["messages"]
        kwargs = {k: case[k] for k in ENCODE_ARGS}
        for i, msg in enumerate(msgs):
            if msg["role"] != "assistant" or i == 0:
                continue
            before, through = encode_messages(msgs[:i], **kwargs), encode_messages(msgs[:i + 1], **kwargs)
            assert through.startswith(before)
            # an answer to a task carries no reasoning even in thinking mode
            after_task = before.endswith(tuple(TASK_TOKENS.values()))
            mode = "chat" if after_task else case["thinking_mode"]
            turns.append((through[len(before):], mode, msg))
    return turns


TURNS = _assistant_turns()


def _expected(msg, mode):
    return {
        "content": msg.get("content") or "",
        "reasoning_content": (msg.get("reasoning_content") or "") if mode == "thinking" else "",
        "tool_calls": [(c["function"]["name"], arguments_dict(c["function"]["arguments"]))
                       for c in msg.get("tool_calls") or []],
    }


def _stream(text, mode, cuts):
    """Events from feeding `text` cut at the sorted positions `cuts`, plus finish()."""
    parser, events, last = StreamParser(mode), [], 0
    for cut in list(cuts) + [len(text)]:
        events += parser.feed(text[last:cut])
        last = cut
    return events + parser.finish()


def _whole(text, mode):
    return merge_deltas(_stream(text, mode, []))


def _no_markup_in_text(events):
    for e in events:
        if isinstance(e, (ReasoningDelta, ContentDelta)):
            assert D not in e.text and "|DSML|" not in e.text, e


# ----------------------------------------------------------------------------- inverse of the encoder


def test_corpus_has_enough_turns():
    assert len(TURNS) > 1000
    assert sum(bool(m.get("tool_calls")) for _, _, m in TURNS) > 300
    assert sum(len(m.get("tool_calls") or []) > 1 for _, _, m in TURNS) > 50
    assert sum(mode == "chat" for _, mode, _ in TURNS) > 100
    assert sum(not c.endswith(EOS) for c, _, _ in TURNS) > 5  # wo_eos turns: no EOS to end on


def test_parse_inverts_encode_on_every_assistant_turn():
    for text, mode, msg in TURNS:
        got = parse_completion(text, mode)
        calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got["tool_calls"]]
        assert got.pop("role") == "assistant"
        got["tool_calls"] = calls
        assert got == _expected(msg, mode), text


def test_parse_matches_official_parser(official):
    for text, mode, _ in TURNS:
        if not text.endswith(EOS):
            continue  # the official parser insists on EOS; ours accepts a stripped completion
        assert parse_completion(text, mode) == official.parse_message_from_completion_text(text, mode), text


def test_string_vs_json_parameters():
    text = ("</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
            '<｜DSML｜parameter name="s" string="true">1</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="n" string="false">1</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="t" string="true">true</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="b" string="false">true</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="o" string="false">{"a": [1, null]}</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="q" string="true">say "hi"\n<now></｜DSML｜parameter>\n'
            "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS)
    (call,) = parse_completion(text, "thinking")["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {
        "s": "1", "n": 1, "t": "true", "b": True, "o": {"a": [1, None]}, "q": 'say "hi"\n<now>'}


# ----------------------------------------------------------------------------- chunking invariance


def _split_sample():
    """Completions worth splitting everywhere: tool calls, unicode, both modes, no EOS."""
    rng = random.Random(1)
    with_calls = [t for t in TURNS if t[2].get("tool_calls")]
    plain = [t for t in TURNS if not t[2].get("tool_calls")]
    no_eos = [t for t in TURNS if not t[0].endswith(EOS)]
    return rng.sample(with_calls, 50) + rng.sample(plain, 20) + no_eos[:5]


@pytest.mark.parametrize("k", range(75))
def test_every_split_point_gives_the_same_events(k):
    text, mode, msg = _split_sample()[k]
    whole = _whole(text, mode)
    assert not any(isinstance(e, ParseError) for e in whole)
    for cut in range(len(text) + 1):
        assert merge_deltas(_stream(text, mode, [cut])) == whole, (text, cut)


def test_random_multiway_splits_of_every_turn():
    rng = random.Random(2)
    for text, mode, _ in TURNS:
        whole = _whole(text, mode)
        for _ in range(3):
            cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(2, 12))))
            events = _stream(text, mode, cuts)
            _no_markup_in_text(events)
            assert merge_deltas(events) == whole, (text, cuts)


def test_char_by_char_and_tool_call_emitted_when_invoke_closes():
    text = ("plan: call both</think>Checking.\n\n<｜DSML｜tool_calls>\n"
            '<｜DSML｜invoke name="get_weather">\n'
            '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
            '<｜DSML｜invoke name="now">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>' + EOS)
    parser, seen = StreamParser("thinking"), []
    for i, ch in enumerate(text):
        for event in parser.feed(ch):
            seen.append(event)
            if isinstance(event, ToolCall):  # exactly when the closing '>' of the invoke arrives
                assert text[:i + 1].endswith("</｜DSML｜invoke>")
    seen += parser.finish()
    _no_markup_in_text(seen)
    assert merge_deltas(seen) == [ReasoningDelta("plan: call both"), ContentDelta("Checking."),
                                  ToolCall("get_weather", '{"city": "Paris"}', 0), ToolCall("now", "{}", 1)]


def test_text_is_held_back_only_while_it_could_be_markup():
    p = StreamParser("chat")
    assert p.feed("a < b, x\n\n<｜DS") == [ContentDelta("a < b, x")]
    assert p.feed("ML｜tool") == []
    assert p.feed("_calls>\n") == []
    p = StreamParser("chat")
    assert p.feed("tail\n") == [ContentDelta("tail")]
    assert p.feed("x<") == [ContentDelta("\nx")]
    assert p.finish() == [ContentDelta("<")]
    p = StreamParser("thinking")
    assert p.feed("hmm</thi") == [ReasoningDelta("hmm")]
    assert p.feed("nk>ok") == [ContentDelta("ok")]


# ----------------------------------------------------------------------------- fail closed

def param(value, attrs='name="a" string="true"'):
    return f"<{D}parameter {attrs}>{value}</{D}parameter>"


def invoke(name_attr, *params):
    return f"<{D}invoke{name_attr}>\n" + "\n".join(params) + f"\n</{D}invoke>"


def block(*invokes):
    return f"\n\n<{D}tool_calls>\n" + "\n".join(invokes) + f"\n</{D}tool_calls>" + EOS


INVOKE_OK = invoke(' name="ok"', param("A"))
F = ' name="f"'
OPEN_BLOCK = f"r</think>\n\n<{D}tool_calls>\n"

MALFORMED = {
    # name: (completion in thinking mode, error text, tool calls still emitted)
    "invoke without name": ("r</think>" + block(invoke("")), "without a tool name", 0),
    "invoke with empty name": ("r</think>" + block(invoke(' name=""')), "without a tool name", 0),
    "parameter without string attribute (sglang #39435)": (
        "r</think>" + block(invoke(F, param("1", 'name="a"'))),
        'needs name="..." and string="true|false"', 0),
    "parameter without name": (
        "r</think>" + block(invoke(F, param("1", 'string="true"'))), 'needs name="..."', 0),
    "parameter with string=maybe": (
        "r</think>" + block(invoke(F, param("1", 'name="a" string="maybe"'))), 'string="true|false"', 0),
    "parameter missing the DSML token (sglang #39435)": (
        "r</think>" + block(invoke(F, '<parameter name="a" string="true">1</parameter>')),
        "unexpected text inside invoke 'f'", 0),
    "bad JSON in a non-string parameter": (
        "r</think>" + block(invoke(F, param("{a: 1}", 'name="a" string="false"'))), "not JSON", 0),
    "partial JSON value (sglang #39632)": (
        "r</think>" + block(invoke(F, param("[1, 2", 'name="a" string="false"'))), "not JSON", 0),
    "duplicate parameter": (
        "r</think>" + block(invoke(F, param("1"), param("2"))), "duplicate parameter 'a'", 0),
    "unclosed parameter": (
        "r</think>" + block(invoke(F, f'<{D}parameter name="a" string="true">1')),
        "parameter 'a' of invoke 'f' is not closed", 0),
    "closing tag without '>' leaks into the value (vllm #53227)": (
        "r</think>" + block(invoke(F, f'<{D}parameter name="path" string="true">/tmp/x</{D}parameter',
                                   param("y", 'name="b" string="true"'))),
        "DSML markup inside the value of parameter 'path'", 0),
    "unclosed invoke at the end (sglang finish)": (
        OPEN_BLOCK + f"<{D}invoke{F}>\n" + param("1") + "\n", "output ended inside the tool_calls block", 0),
    "unclosed block at EOS": (
        OPEN_BLOCK + INVOKE_OK + "\n" + EOS, "end of sentence inside the tool_calls block", 1),
    "unclosed block at the end": (OPEN_BLOCK + INVOKE_OK, "output ended inside", 1),
    "empty block": ("r</think>" + block(""), "empty tool_calls block", 0),
    "garbage before an invoke": ("r</think>" + block("junk " + INVOKE_OK), "expected <｜DSML｜invoke", 0),
    "garbage before the block closes": (
        "r</think>" + block(INVOKE_OK, "junk"), "unclosed or malformed invoke", 1),
    "invoke inside an unclosed invoke": (
        "r</think>" + block(f"<{D}invoke{F}>", INVOKE_OK), "unexpected text inside invoke 'f'", 0),
    "malformed invoke then a good one (sglang #34600)": (
        "r</think>" + block(invoke(' name="bad"', f"<{D}parameter>x</{D}parameter>"), INVOKE_OK),
        "invoke 'bad'", 1),
    "stray invoke in content, no tool_calls wrapper": (
        "r</think>Sure." + invoke(F, param("1")) + EOS, "DSML markup outside a tool_calls block", 0),
    "stray closing tag in the reasoning": (
        f"think </{D}tool_calls> more</think>answer" + EOS, "DSML markup outside a tool_calls block", 0),
    "stray ASCII DSML in content (cline #13348)": (
        'r</think>Calling <|DSML|invoke name="f">', "DSML markup outside a tool_calls block", 0),
    "bare DSML token in content": (f"r</think>a {D} b" + EOS, "DSML markup outside", 0),
    "text after the tool block": ("r</think>" + block(INVOKE_OK)[:-len(EOS)] + "and more" + EOS,
                                  "text after the tool_calls block", 1),
    "second tool block": ("r</think>" + block(INVOKE_OK)[:-len(EOS)] + block(INVOKE_OK),
                          "text after the tool_calls block", 1),
    "reasoning never closed, EOS": ("still thinking" + EOS, "end of sentence inside the reasoning", 0),
    "reasoning never closed, end": ("still thinking", "output ended inside the reasoning", 0),
    "text after EOS": ("r</think>done" + EOS + "more", "text after the end of sentence", 0),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_output_fails_closed(name):
    text, error, n_calls = MALFORMED[name]
    whole = _whole(text, "thinking")
    errors = [e.message for e in whole if isinstance(e, ParseError)]
    calls = [e for e in whole if isinstance(e, ToolCall)]
    assert any(error in m for m in errors), (errors, whole)
    assert len(calls) == n_calls and all(c.name == "ok" and c.arguments == '{"a": "A"}' for c in calls)
    _no_markup_in_text(whole)
    for cut in range(len(text) + 1):  # the same verdict however the text is chunked
        events = _stream(text, "thinking", [cut])
        _no_markup_in_text(events)
        assert merge_deltas(events) == whole, cut
    with pytest.raises(DSMLError, match="malformed completion"):
        parse_completion(text, "thinking")
    lenient = parse_completion(text, "thinking", strict=False)
    assert lenient["errors"] == errors and len(lenient["tool_calls"]) == n_calls


def test_malformed_parameters_never_become_an_empty_call():
    for text, _, _ in MALFORMED.values():
        msg = parse_completion(text, "thinking", strict=False)
        assert all(c["function"]["arguments"] != "{}" for c in msg["tool_calls"])


def test_stray_markup_ends_text_output():
    msg = parse_completion(MALFORMED["stray closing tag in the reasoning"][0], "thinking", strict=False)
    assert msg["reasoning_content"] == "think " and msg["content"] == "" and msg["tool_calls"] == []
    text = MALFORMED["stray invoke in content, no tool_calls wrapper"][0]
    msg = parse_completion(text, "thinking", strict=False)
    assert msg["content"] == "Sure." and "invoke" in msg["errors"][0]


# ----------------------------------------------------------------------------- accepted variants


def test_ascii_dsml_variant_parses():
    text = ('r</think>\n\n<|DSML|tool_calls>\n<|DSML|invoke name="f">\n'
            '<|DSML|parameter name="a" string="false">[1]</|DSML|parameter>\n'
            f'<{D}parameter name="b" string="true">mixed</{D}parameter>\n'
            "</|DSML|invoke>\n</|DSML|tool_calls>" + EOS)
    msg = parse_completion(text, "thinking")
    assert msg["content"] == "" and msg["tool_calls"] == [
        {"type": "function", "function": {"name": "f", "arguments": '{"a": [1], "b": "mixed"}'}}]


@pytest.mark.parametrize("after", ["", "</think>", "\n</think>\n"])
def test_tool_block_before_think_end(after):
    """vLLM's reasoning parser moves a tool block that opens inside the reasoning out to the tool parser."""
    text = "I should call it.\n\n" + block(INVOKE_OK)[2:-len(EOS)] + after + EOS
    whole = _whole(text, "thinking")
    assert whole == [ReasoningDelta("I should call it."), ToolCall("ok", '{"a": "A"}', 0)]
    for cut in range(len(text) + 1):
        assert merge_deltas(_stream(text, "thinking", [cut])) == whole


def test_values_keep_characters_of_the_closing_tag():
    """sglang #34600: str.rstrip(tag) ate trailing characters of values ("find /tmp" -> "find /")."""
    values = ["find /tmp", "parameter", "meta>", "</", "a|DSM", "DSML", "x｜", ">", ""]
    params = [param(v, f'name="v{i}" string="true"') for i, v in enumerate(values)]
    text = "</think>" + block(invoke(F, *params))
    for cut in range(len(text) + 1):
        (call,) = [e for e in _stream(text, "thinking", [cut]) if isinstance(e, ToolCall)]
        assert json.loads(call.arguments) == {f"v{i}": v for i, v in enumerate(values)}


def test_two_chunk_split_keeps_names_and_calls():
    """sglang #35563: output split into two chunks lost calls and names."""
    text = "r</think>" + block(INVOKE_OK.replace('"ok"', '"get_weather"'), INVOKE_OK)
    cut = text.index("get_wea") + 4
    events = _stream(text, "thinking", [cut])
    assert [e.name for e in events if isinstance(e, ToolCall)] == ["get_weather", "ok"]


def test_completion_without_eos_and_chat_mode():
    assert parse_completion("r</think>answer", "thinking") == {
        "role": "assistant", "content": "answer", "reasoning_content": "r", "tool_calls": []}
    msg = parse_completion("Let me look." + block(INVOKE_OK), "chat")
    assert msg["content"] == "Let me look." and msg["reasoning_content"] == ""
    assert msg["tool_calls"][0]["function"] == {"name": "ok", "arguments": '{"a": "A"}'}
    # in chat mode </think> is ordinary text, as in the official parser
    assert parse_completion("a</think>b" + EOS, "chat")["content"] == "a</think>b"


# ----------------------------------------------------------------------------- API edges and printing


def test_parser_api_edges():
    with pytest.raises(ValueError, match="thinking_mode"):
        StreamParser("fast")
    p = StreamParser("chat")
    assert p.feed("hi") == [ContentDelta("hi")] and p.finish() == [] and p.finish() == []
    with pytest.raises(RuntimeError, match="after finish"):
        p.feed("more")


def test_to_message_and_printing():
    events = [ReasoningDelta("th"), ReasoningDelta("ink"), ContentDelta("Hi"),
              ToolCall("f", '{"a": 1}', 0), ParseError("bad invoke")]
    assert to_message(events) == {"role": "assistant", "content": "Hi", "reasoning_content": "think",
                                  "tool_calls": [{"type": "function",
                                                  "function": {"name": "f", "arguments": '{"a": 1}'}}],
                                  "errors": ["bad invoke"]}
    assert format_event(events[3]) == '#0 f({"a": 1})'
    assert format_event(events[4]) == "malformed output: bad invoke"
    out = io.StringIO()
    printer = EventPrinter(out)
    printer(events[:2])
    printer(events[2:])
    assert out.getvalue() == ('[thinking]\nthink\n[answer]\nHi\n[tool calls]\n#0 f({"a": 1})\n'
                              "[errors]\nmalformed output: bad invoke\n")
    quiet = io.StringIO()
    EventPrinter(quiet, show_reasoning=False)(events[:3])
    assert quiet.getvalue() == "[answer]\nHi"


def test_unknown_tools_are_refused_when_names_are_given():
    text = "r</think>" + block(INVOKE_OK, INVOKE_OK.replace('"ok"', '"rm_rf"'))
    msg = parse_completion(text, "thinking", strict=False, tool_names=["ok"])
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["ok"]
    assert msg["errors"] == ["call to unknown tool 'rm_rf'; known: ['ok']"]
    assert len(parse_completion(text, "thinking")["tool_calls"]) == 2  # no list: any name goes


def test_long_streams_stay_linear(monkeypatch):
    """Token-sized chunks of a long tool value and a long stray tail: no quadratic rescans. Counted, not
    timed: the characters every marker search looks at add up to a small multiple of the text."""
    from dsv4_jax.chat import parser as parser_mod

    scanned = [0]
    real_scan = parser_mod._scan

    def counting_scan(buf, markers, final, start=0):
        scanned[0] += (len(buf) - start) * max(1, len(markers))
        return real_scan(buf, markers, final, start)

    monkeypatch.setattr(parser_mod, "_scan", counting_scan)
    value = "x" * 200_000
    text = "r</think>" + block(invoke(' name="w"', param(value, 'name="t" string="true"')))
    events = _stream(text, "thinking", range(0, len(text), 4))
    assert scanned[0] < 50 * len(text), scanned[0]
    (call,) = [e for e in events if isinstance(e, ToolCall)]
    assert json.loads(call.arguments) == {"t": value}
