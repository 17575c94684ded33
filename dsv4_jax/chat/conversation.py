"""Building a conversation for the launch script: a prompt from text or a chat file.

    prompt = chat_prompt("What is 2+2?", system="Be brief.", thinking_mode="chat")
    prompt = chat_prompt(load_chat("chat.json"))        # messages (+ tools) from JSON
"""

from __future__ import annotations

import copy
import json
import os

from dsv4_jax.chat.encoder import encode_messages


def attach_tools(messages: list[dict], tools: list[dict]) -> list[dict]:
    """`tools` attached to the leading system/developer message, or to a new empty system message
    put first (V4 carries tools on a message, as vLLM does for request-level tools)."""
    messages = copy.deepcopy(messages)
    if messages and messages[0].get("role") in ("system", "developer"):
        messages[0]["tools"] = list(messages[0].get("tools") or []) + list(tools)
    else:
        messages.insert(0, {"role": "system", "content": "", "tools": list(tools)})
    return messages


def load_chat(path: str | os.PathLike) -> list[dict]:
    """Messages from a JSON file: a list of messages, or {"messages": [...], "tools": [...]}."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        tools = data.get("tools")
        return attach_tools(data["messages"], tools) if tools else data["messages"]
    raise ValueError(f"{path}: expected a JSON list of messages or an object with a 'messages' list")


def chat_prompt(chat: str | list[dict], *, system: str | None = None, tools: list[dict] | None = None,
                thinking_mode: str = "thinking", reasoning_effort: str | None = None) -> str:
    """The V4 prompt for a single user text or a list of messages, ready for `tok.encode`."""
    messages = [{"role": "user", "content": chat}] if isinstance(chat, str) else list(chat)
    if system is not None:
        messages = [{"role": "system", "content": system}] + messages
    if tools:
        messages = attach_tools(messages, tools)
    return encode_messages(messages, thinking_mode=thinking_mode, reasoning_effort=reasoning_effort)
