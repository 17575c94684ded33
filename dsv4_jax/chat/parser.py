"""Parsing V4 output: reasoning, content and DSML tool calls, streamed or whole.

The completion starts where the prompt stopped: inside `<think>` in thinking mode, after
`</think>` in chat mode (docs/chat_format.md §2.2). `StreamParser` is a small state machine over a
buffer (docs/chat_format.md §3 lists what went wrong elsewhere, and tests/test_chat_parser.py
has a regression test for each):

* It decides only on text that cannot change meaning with more input: any tail that could still
  grow into a marker is held back, so every way of chunking a text gives the same events once
  adjacent deltas are merged.
* A tool call is emitted only when its `</｜DSML｜invoke>` arrives, complete and validated.
* Text after `<｜DSML｜tool_calls>` is protocol, never content; DSML anywhere else (a stray invoke,
  a closing tag) ends text output: the rest becomes one `ParseError` quoting where it began.
* It fails closed: malformed invokes, unclosed blocks and leftovers become `ParseError` events.
* Both `｜DSML｜` and ASCII `|DSML|` are accepted, and a tool block may open before `</think>`.
"""

from __future__ import annotations

from dsv4_jax.chat import dsml
from dsv4_jax.chat.events import ContentDelta, Event, ParseError, ReasoningDelta, ToolCall, to_message
from dsv4_jax.chat.tokens import EOS, THINK_END


def _both(*templates: str) -> tuple[str, ...]:
    return tuple(t.format(D=d) for t in templates for d in dsml.SPELLINGS)


_OPEN = _both("\n\n<{D}tool_calls>", "<{D}tool_calls>")
_STRAY = _both("</{D}", "<{D}", "{D}")
_CLOSE_INVOKE = _both("</{D}invoke>")
_CLOSE_BLOCK = _both("</{D}tool_calls>")

# state -> the markers that end a stretch of text in that state
_MARKERS = {
    "reasoning": (THINK_END, EOS) + _OPEN + _STRAY,
    "content": (EOS,) + _OPEN + _STRAY,
    "tools": (EOS,) + _CLOSE_INVOKE + _CLOSE_BLOCK,
    "after_tools": (EOS,),
    "stray": (EOS,),
    "done": (),
}


def _scan(buf: str, markers: tuple[str, ...], final: bool, start: int = 0) -> tuple[int, str | None]:
    """(position, marker) of the first marker in `buf` that no further input can change, or
    (hold, None): no marker yet, and buf[hold:] might still become one (hold == len(buf) if not).

    Earliest start wins, then the longest marker. A complete match is not final while a marker
    could still complete at or before its start ("<｜DSML｜" may become "<｜DSML｜tool_calls>").
    No marker starts before `start` (the caller searched there already).
    """
    best_pos, best = len(buf), None
    for marker in markers:
        pos = buf.find(marker, start)
        if pos >= 0 and (pos < best_pos or (pos == best_pos and len(marker) > len(best))):
            best_pos, best = pos, marker
    hold = len(buf)
    if not final and markers:
        longest = max(map(len, markers))
        for at in range(max(0, len(buf) - longest + 1), len(buf)):
            tail = buf[at:]
            if any(len(m) > len(tail) and m.startswith(tail) for m in markers):
                hold = at
                break
    if best is not None and best_pos < hold:
        return best_pos, best
    return min(hold, best_pos), None


class StreamParser:
    """Incremental parser for one completion.

        p = StreamParser(thinking_mode="thinking")
        for chunk in chunks:
            events = p.feed(chunk)
        events = p.finish()
    """

    def __init__(self, thinking_mode: str = "thinking", tool_names=None):
        """`tool_names`: if given, a call to any other tool is a ParseError, not a ToolCall."""
        if thinking_mode not in ("chat", "thinking"):
            raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
        self.thinking_mode = thinking_mode
        self.tool_names = None if tool_names is None else frozenset(tool_names)
        self._state = "reasoning" if thinking_mode == "thinking" else "content"
        self._buf = ""
        self._searched = 0  # no marker starts before this offset of self._buf (waiting states)
        self._calls = 0  # tool calls emitted
        self._invokes = 0  # invokes seen in the current block, well-formed or not
        self._block_in_reasoning = False
        self._finished = False

    def feed(self, text: str) -> list[Event]:
        if self._finished:
            raise RuntimeError("StreamParser.feed() after finish()")
        self._buf += text
        return self._run(final=False)

    def finish(self) -> list[Event]:
        """Flushes what is held back and reports whatever is left open."""
        if self._finished:
            return []
        events = self._run(final=True)
        events += self._close()
        self._finished = True
        return events

    # -------------------------------------------------------------------------

    def _run(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while True:
            markers = _MARKERS[self._state]
            pos, marker = _scan(self._buf, markers, final, self._searched)
            if self._state in ("reasoning", "content"):
                delta = (ReasoningDelta if self._state == "reasoning" else ContentDelta)(self._buf[:pos])
                if delta.text:
                    events.append(delta)
                self._buf = self._buf[pos:]
                if marker is None:
                    return events
                self._on_text_marker(marker, events)
                continue
            if marker is None:
                # other states wait for their marker, or for finish(); resume the search near the end
                self._searched = max(0, len(self._buf) - max(map(len, markers), default=0))
                return events
            self._searched = 0
            if self._state == "tools":
                self._on_tools_marker(pos, marker, events)
            else:  # "after_tools" or "stray", at EOS
                self._close_trailing(self._buf[:pos], events)
                self._buf = self._buf[pos + len(marker):]
                self._state = "done"

    def _on_text_marker(self, marker: str, events: list[Event]) -> None:
        """self._buf starts with `marker`, in reasoning or content."""
        if marker in _STRAY:
            self._state = "stray"  # keep the markup in the buffer for the error message
            return
        self._buf = self._buf[len(marker):]
        if marker == THINK_END:
            self._state = "content"
        elif marker == EOS:
            if self._state == "reasoning":
                events.append(ParseError(f"end of sentence inside the reasoning: no {THINK_END}"))
            self._state = "done"
        else:  # a tool_calls block opens
            self._block_in_reasoning = self._state == "reasoning"
            self._invokes = 0
            self._state = "tools"

    def _on_tools_marker(self, pos: int, marker: str, events: list[Event]) -> None:
        before, self._buf = self._buf[:pos], self._buf[pos + len(marker):]
        if marker in _CLOSE_INVOKE:
            self._invokes += 1
            try:
                name, arguments = dsml.parse_invoke(before + marker)
            except dsml.DSMLError as err:
                events.append(ParseError(str(err)))
            else:
                if self.tool_names is not None and name not in self.tool_names:
                    known = sorted(self.tool_names)
                    events.append(ParseError(f"call to unknown tool {name!r}; known: {known}"))
                else:
                    events.append(ToolCall(name, arguments, self._calls))
                    self._calls += 1
        elif marker in _CLOSE_BLOCK:
            if before.strip():
                events.append(ParseError("unclosed or malformed invoke in the tool_calls block: "
                                         + dsml.excerpt(before)))
            elif self._invokes == 0:
                events.append(ParseError("empty tool_calls block"))
            self._state = "after_tools"
        else:  # EOS
            events.append(ParseError("end of sentence inside the tool_calls block"
                                     + (f": {dsml.excerpt(before)}" if before.strip() else "")))
            self._state = "done"

    def _close_trailing(self, text: str, events: list[Event]) -> None:
        """Text between the end of a tool block (or a stray tag) and EOS / the end of output."""
        if self._state == "stray":
            events.append(ParseError(f"DSML markup outside a tool_calls block: {dsml.excerpt(text)}"))
        elif text.strip() not in (("", THINK_END) if self._block_in_reasoning else ("",)):
            events.append(ParseError(f"text after the tool_calls block: {dsml.excerpt(text)}"))

    def _close(self) -> list[Event]:
        """At the end of output, after a final _run."""
        events: list[Event] = []
        if self._state == "reasoning":
            events.append(ParseError(f"output ended inside the reasoning: no {THINK_END}"))
        elif self._state == "tools":
            events.append(ParseError("output ended inside the tool_calls block"
                                     + (f": {dsml.excerpt(self._buf)}" if self._buf.strip() else "")))
        elif self._state in ("after_tools", "stray"):
            self._close_trailing(self._buf, events)
        elif self._state == "done" and self._buf:
            events.append(ParseError(f"text after the end of sentence: {dsml.excerpt(self._buf)}"))
        self._buf = ""
        return events


def parse_completion(text: str, thinking_mode: str = "thinking", strict: bool = True,
                     tool_names=None) -> dict:
    """{"role": "assistant", "content", "reasoning_content", "tool_calls"} from a whole completion
    (with or without the final EOS). Tool calls are OpenAI-style with JSON-string arguments.

    Malformed output raises `dsml.DSMLError` when `strict`; otherwise the message also gets
    "errors": [messages] and keeps only what parsed cleanly. `tool_names` restricts the tools
    that may be called (see StreamParser).
    """
    parser = StreamParser(thinking_mode, tool_names)
    message = to_message(parser.feed(text) + parser.finish())
    if strict and "errors" in message:
        raise dsml.DSMLError("malformed completion: " + "; ".join(message["errors"]))
    return message
