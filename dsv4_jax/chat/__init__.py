"""DeepSeek-V4 chat format: prompt encoding, DSML tool calls, and output parsing.

    prompt = encode_messages(messages, thinking_mode="thinking")   # str; tok.encode(prompt)
    msg = parse_completion(text, thinking_mode="thinking")         # whole completion
    p = StreamParser(thinking_mode="thinking"); p.feed(chunk); p.finish()   # streamed

docs/chat_format.md describes the format. No jax here: this package is plain Python.
"""

from dsv4_jax.chat.conversation import attach_tools, chat_prompt, load_chat
from dsv4_jax.chat.dsml import DSMLError
from dsv4_jax.chat.encoder import encode_messages
from dsv4_jax.chat.events import (ContentDelta, Event, EventPrinter, ParseError, ReasoningDelta, ToolCall,
                                  format_event, merge_deltas, to_message)
from dsv4_jax.chat.parser import StreamParser, parse_completion

__all__ = [
    "encode_messages", "parse_completion", "StreamParser", "DSMLError",
    "ReasoningDelta", "ContentDelta", "ToolCall", "ParseError", "Event",
    "merge_deltas", "to_message", "format_event", "EventPrinter",
    "chat_prompt", "attach_tools", "load_chat",
]
