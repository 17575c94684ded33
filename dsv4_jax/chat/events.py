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


@dataclasses.dataclass(frozen=True)
class Stopped:
    """Generation stopped (`why`, e.g. "at the token limit") while a block was open (`where`, e.g.
    "inside the reasoning"): the text is cut short, not malformed. See `cut_short`."""
    why: str
    where: str


Event = Union[ReasoningDelta, ContentDelta, ToolCall, ParseError, Stopped]

# The parser's errors for a block still open when the output ends start with this ("output ended inside the
# reasoning: no </think>", "output ended inside the tool_calls block: ...").
_ENDED_INSIDE = "output ended "


def cut_short(events: Iterable[Event], why: str) -> list[Event]:
    """The events of a completion whose generation stopped before the model ended it (`why`: "at the token
    limit", ...): the parser's "output ended inside ..." errors become `Stopped` events. Errors about text
    the parser rejects stay `ParseError`s."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, ParseError) and event.message.startswith(_ENDED_INSIDE):
            event = Stopped(why, event.message[len(_ENDED_INSIDE):].split(":", 1)[0])
        out.append(event)
    return out


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
    under "[answer]", one line per tool call, per error (under "[errors]") and for a stop inside a
    block (under "[stopped]"). Call it with each batch of events."""

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
                self._enter("tool calls" if isinstance(event, ToolCall) else
                            "stopped" if isinstance(event, Stopped) else "errors")
                self._write(format_event(event) + "\n")
        self.stream.flush()


def format_event(event: Event) -> str:
    """One event as a line of text."""
    if isinstance(event, ToolCall):
        return f"#{event.index} {event.name}({event.arguments})"
    if isinstance(event, ParseError):
        return f"malformed output: {event.message}"
    if isinstance(event, Stopped):
        return f"stopped {event.why} {event.where}"
    return event.text
