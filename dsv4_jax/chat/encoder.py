"""OpenAI-style messages -> the DeepSeek-V4 prompt string (docs/chat_format.md §2).

Renders exactly what DeepSeek's `encoding_dsv4.py` (sha256 bdbd57c1…) renders, checked byte for
byte in tests/test_chat_encoder.py; the one intended difference is that tool-call arguments given
as a dict are rendered as their keys (DeepSeek's encoder wraps the whole dict in one parameter).

Shape of a prompt, thinking mode:

    BOS [max-effort preamble] system [## Tools…] <｜User｜>question<｜Assistant｜><think>
        reasoning</think>answer[\\n\\n<｜DSML｜tool_calls>…]<｜end▁of▁sentence｜>
    <｜User｜><tool_result>…</tool_result>…<｜Assistant｜><think>

There are no `<｜Assistant｜>`/`<think>` tokens inside an assistant turn: they belong to the
transition written after the user turn before it. In chat mode that transition is
`<｜Assistant｜></think>` and turns carry no reasoning.
"""

from __future__ import annotations

import copy

from dsv4_jax.chat import dsml
from dsv4_jax.chat.templates import REASONING_EFFORT_MAX, response_format_block, to_json, tools_block
from dsv4_jax.chat.tokens import (ASSISTANT, BOS, EOS, LATEST_REMINDER, TASK_TOKENS, THINK_END, THINK_START,
                                  USER)

THINKING_MODES = ("chat", "thinking")
REASONING_EFFORTS = (None, "high", "max")  # only "max" changes the prompt
ROLES = ("system", "developer", "user", "tool", "assistant", "latest_reminder")


def encode_messages(messages: list[dict], thinking_mode: str = "thinking", context: list[dict] | None = None,
                    drop_thinking: bool = True, add_default_bos_token: bool = True,
                    reasoning_effort: str | None = None) -> str:
    """The V4 prompt for `messages`.

    Args:
      messages: OpenAI-style dicts. Roles: system, developer, user (optional `task`), assistant
        (`content`, `reasoning_content`, `tool_calls` with JSON-string or dict arguments), tool
        (`tool_call_id`, `content`), latest_reminder. `tools` and `response_format` ride on the
        system or developer message.
      thinking_mode: "thinking" (the prompt ends inside `<think>`) or "chat".
      context: messages already rendered earlier; only `messages` is rendered, as a continuation
        of that prefix, with no BOS.
      drop_thinking: drop reasoning (and developer turns) before the last user turn. Ignored, i.e.
        reasoning is kept across turns, whenever any message carries tools.
      add_default_bos_token: start with BOS (when there is no context).
      reasoning_effort: None, "high" or "max"; "max" adds a preamble in thinking mode.
    """
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}")
    context = _merge_tool_results(context or [])
    turns = _merge_tool_results(messages)
    full = _order_tool_results(context + turns)
    thinking = thinking_mode == "thinking"
    # Tools mean agentic, interleaved thinking: reasoning must survive later turns.
    drop = drop_thinking and not any(m.get("tools") for m in full)
    if thinking and drop:
        start = len(_drop_old_thinking(context))
        full = _drop_old_thinking(full)
    else:
        start = len(context)
    prompt = BOS if add_default_bos_token and not context else ""
    if thinking and reasoning_effort == "max" and start == 0 and full:
        prompt += REASONING_EFFORT_MAX
    last_user = _last_user_index(full)
    for i in range(start, len(full)):
        prompt += _render_turn(full, i, thinking, drop, last_user)
        prompt += _transition(full, i, thinking, drop, last_user)
    return prompt


# ----------------------------------------------------------------------------- preprocessing


def _merge_tool_results(messages: list[dict]) -> list[dict]:
    """Turns every user/tool message into a user turn of `blocks`; V4 has no tool role.

    Tool results join the user turn before them (a plain user turn too), and a user message joins
    a preceding user turn unless that one carries a `task`. Only content, task and wo_eos survive
    on a user turn (so `tools` on a user message have no effect, as in DeepSeek's encoder).
    """
    merged: list[dict] = []
    for msg in messages:
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"unknown message role {role!r}; expected one of {ROLES}")
        prev = merged[-1] if merged and merged[-1]["role"] == "user" else None
        if role == "tool":
            block = {"type": "tool_result", "id": msg.get("tool_call_id") or "",
                     "content": msg.get("content")}
            if prev is not None:
                prev["blocks"].append(block)
            else:
                merged.append({"role": "user", "blocks": [block]})
        elif role == "user":
            block = {"type": "text", "content": msg.get("content")}
            if prev is not None and prev.get("task") is None:
                prev["blocks"].append(block)
            else:
                task = msg.get("task")
                if task is not None and task not in TASK_TOKENS:
                    raise ValueError(f"unknown task {task!r} on a user message; "
                                     f"expected one of {sorted(TASK_TOKENS)}")
                turn = {"role": "user", "blocks": [block]}
                turn.update({k: msg[k] for k in ("task", "wo_eos") if k in msg})
                merged.append(turn)
        else:
            merged.append(copy.deepcopy(msg))
    return merged


def _order_tool_results(messages: list[dict]) -> list[dict]:
    """Puts the tool results of a user turn in the order of the latest assistant's tool calls
    (matched by id); text blocks keep their places. Unknown ids sort first, stably."""
    order: dict[str, int] = {}
    for msg in messages:
        if msg["role"] == "assistant" and msg.get("tool_calls"):
            order = {}
            for i, call in enumerate(msg["tool_calls"]):
                call_id = call.get("id") or (call.get("function") or {}).get("id")
                if call_id:
                    order[call_id] = i
        elif msg["role"] == "user" and order:
            results = [b for b in msg["blocks"] if b["type"] == "tool_result"]
            if len(results) > 1:
                results = iter(sorted(results, key=lambda b: order.get(b["id"], 0)))
                msg["blocks"] = [next(results) if b["type"] == "tool_result" else b for b in msg["blocks"]]
    return messages


def _last_user_index(messages: list[dict]) -> int:
    return max((i for i, m in enumerate(messages) if m["role"] in ("user", "developer")), default=-1)


def _drop_old_thinking(messages: list[dict]) -> list[dict]:
    """Before the last user turn: assistant turns lose their reasoning, developer turns go."""
    last_user = _last_user_index(messages)
    kept = []
    for i, msg in enumerate(messages):
        if i >= last_user or msg["role"] in ("user", "system", "tool", "latest_reminder"):
            kept.append(msg)
        elif msg["role"] == "assistant":
            kept.append({k: v for k, v in msg.items() if k != "reasoning_content"})
    return kept


# ----------------------------------------------------------------------------- rendering


def _text(content) -> str:
    """Message content as text: a string, None, or a list of OpenAI content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n\n".join(p.get("text", "") if p.get("type") == "text" else f"[Unsupported {p.get('type')}]"
                           for p in content)
    return to_json(content)


def _extras(msg: dict) -> str:
    out = ""
    if msg.get("tools"):
        out += "\n\n" + tools_block(msg["tools"])
    if msg.get("response_format"):
        out += "\n\n" + response_format_block(msg["response_format"])
    return out


def _render_block(block: dict) -> str:
    if block["type"] == "tool_result":
        return f"<tool_result>{_text(block['content'])}</tool_result>"
    return _text(block["content"])


def _render_turn(messages: list[dict], i: int, thinking: bool, drop: bool, last_user: int) -> str:
    msg = messages[i]
    role = msg["role"]
    if role == "system":
        return _text(msg.get("content")) + _extras(msg)
    if role == "developer":
        if not msg.get("content"):
            raise ValueError(f"developer message {i} has no content")
        return USER + _text(msg["content"]) + _extras(msg)
    if role == "user":
        return USER + "\n\n".join(_render_block(b) for b in msg["blocks"])
    if role == "latest_reminder":
        return LATEST_REMINDER + _text(msg.get("content"))
    # assistant
    after_task = i > 0 and messages[i - 1].get("task") is not None  # task answers carry no thinking
    reasoning = ""
    if thinking and not after_task and (not drop or i > last_user):
        reasoning = (msg.get("reasoning_content") or "") + THINK_END
    calls = dsml.render_tool_calls(msg["tool_calls"]) if msg.get("tool_calls") else ""
    return reasoning + _text(msg.get("content")) + calls + ("" if msg.get("wo_eos") else EOS)


def _transition(messages: list[dict], i: int, thinking: bool, drop: bool, last_user: int) -> str:
    """What opens the model's turn after message i: written only before an assistant turn, a
    latest_reminder, or at the end of the prompt."""
    if i + 1 < len(messages) and messages[i + 1]["role"] not in ("assistant", "latest_reminder"):
        return ""
    msg = messages[i]
    task = msg.get("task")
    if task is not None and task not in TASK_TOKENS:
        raise ValueError(f"unknown task {task!r} on message {i}; expected one of {sorted(TASK_TOKENS)}")
    if task == "action":
        return ASSISTANT + (THINK_START if thinking else THINK_END) + TASK_TOKENS[task]
    if task is not None:
        return TASK_TOKENS[task]
    if msg["role"] in ("user", "developer"):
        opens_thinking = thinking and (not drop or i >= last_user)
        return ASSISTANT + (THINK_START if opens_thinking else THINK_END)
    return ""
