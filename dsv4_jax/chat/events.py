"""What the output parser reports, how events fold into an assistant message, and how they print.

A completion is a sequence of events: reasoning and content arrive as text deltas (their
boundaries depend on how the text was chunked, their concatenation does not), a tool call arrives
whole once its invoke closes, and malformed markup arrives as a `ParseError`, never as text.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Iterable, TextIO, Union


@dataclasses.dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclasses.dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, e.g. '{"city": "Paris", "days": 1}'
    index: int  # position among the tool calls of this completion

    def to_openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass(frozen=True)
class ParseError:
    message: str


Event = Union[ReasoningDelta, ContentDelta, ToolCall, ParseError]


def merge_deltas(events: Iterable[Event]) -> list[Event]:
    """Joins adjacent deltas of the same kind: the chunking-independent form of a stream."""
    out: list[Event] = []
    for event in events:
        if out and isinstance(event, (ReasoningDelta, ContentDelta)) and type(out[-1]) is type(event):
            out[-1] = type(event)(out[-1].text + event.text)
        else:
            out.append(event)
    return out


def to_message(events: Iterable[Event]) -> dict:
    """The assistant message the events describe (DeepSeek's parser's shape), plus "errors"
    when there were any."""
    events = list(events)
    message = {
        "role": "assistant",
        "content": "".join(e.text for e in events if isinstance(e, ContentDelta)),
        "reasoning_content": "".join(e.text for e in events if isinstance(e, ReasoningDelta)),
        "tool_calls": [e.to_openai() for e in events if isinstance(e, ToolCall)],
    }
    errors = [e.message for e in events if isinstance(e, ParseError)]
    if errors:
        message["errors"] = errors
    return message


class EventPrinter:
    """Writes a stream of events for a terminal: reasoning under a "[thinking]" header, content
    under "[answer]", one line per tool call and per error. Call it with each batch of events."""

    def __init__(self, stream: TextIO | None = None, show_reasoning: bool = True):
        self.stream = stream if stream is not None else sys.stdout
        self.show_reasoning = show_reasoning
        self._section: str | None = None
        self._line_open = False  # the last write did not end a line

    def _write(self, text: str) -> None:
        if text:
            self.stream.write(text)
            self._line_open = not text.endswith("\n")

    def _enter(self, section: str) -> None:
        if section != self._section:
            self._write(("\n" if self._line_open else "") + f"[{section}]\n")
            self._section = section

    def __call__(self, events: Iterable[Event]) -> None:
        for event in events:
            if isinstance(event, ReasoningDelta):
                if self.show_reasoning:
                    self._enter("thinking")
                    self._write(event.text)
            elif isinstance(event, ContentDelta):
                self._enter("answer")
                self._write(event.text)
            else:
                self._enter("tool calls" if isinstance(event, ToolCall) else "errors")
                self._write(format_event(event) + "\n")
        self.stream.flush()


def format_event(event: Event) -> str:
    """One event as a line of text."""
    if isinstance(event, ToolCall):
        return f"#{event.index} {event.name}({event.arguments})"
    if isinstance(event, ParseError):
        return f"malformed output: {event.message}"
    return event.text
