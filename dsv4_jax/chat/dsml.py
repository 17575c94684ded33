"""DSML, V4's markup for tool calls: rendering calls into it and parsing one `invoke` back.

    \\n\\n<｜DSML｜tool_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">1</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

`string="true"` values are raw text with no escaping; `string="false"` values are JSON.
docs/chat_format.md §2.4. The parser accepts the ASCII `|DSML|` spelling too, and is strict about
everything else: a malformed invoke raises `DSMLError` rather than becoming an empty call.
"""

from __future__ import annotations

import json
import re

from dsv4_jax.chat.templates import to_json
from dsv4_jax.chat.tokens import DSML, DSML_ASCII

BLOCK = "tool_calls"


class DSMLError(ValueError):
    """Malformed DSML in model output, or a tool call the encoder cannot render."""


# ----------------------------------------------------------------------------- rendering


def arguments_dict(arguments) -> dict:
    """Tool-call `arguments` as a dict: a JSON string (OpenAI form) or already a dict.

    A string that is not JSON at all is kept whole as one string parameter "arguments", as
    DeepSeek's encoder does. (DeepSeek's encoder also does that to a *dict*, rendering
    `name="arguments" string="false"`; we render the dict's own keys, which is what was meant.)
    """
    if arguments is None:
        return {}
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str):
        raise DSMLError("tool-call arguments must be a JSON object string or a dict, "
                        f"got {type(arguments).__name__}")
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return {"arguments": arguments}
    if not isinstance(parsed, dict):
        raise DSMLError(f"tool-call arguments must be a JSON object, got {arguments!r}")
    return parsed


def render_invoke(name: str, arguments) -> str:
    params = "\n".join(
        f'<{DSML}parameter name="{key}" string="{"true" if isinstance(value, str) else "false"}">'
        f'{value if isinstance(value, str) else to_json(value)}</{DSML}parameter>'
        for key, value in arguments_dict(arguments).items())
    return f'<{DSML}invoke name="{name}">\n{params}\n</{DSML}invoke>'


def render_tool_calls(tool_calls: list[dict]) -> str:
    """The block an assistant turn ends with, from OpenAI-style tool calls, leading "\\n\\n" included."""
    invokes = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or "name" not in function:
            raise DSMLError("each tool call must look like {'function': {'name': ..., 'arguments': ...}}, "
                            f"got {call!r}")
        invokes.append(render_invoke(function["name"], function.get("arguments")))
    return f"\n\n<{DSML}{BLOCK}>\n" + "\n".join(invokes) + f"\n</{DSML}{BLOCK}>"


# ----------------------------------------------------------------------------- parsing

SPELLINGS = (DSML, DSML_ASCII)
_D = "(?:" + "|".join(re.escape(s) for s in SPELLINGS) + ")"
_INVOKE_OPEN = re.compile(rf"<{_D}invoke\b([^>]*)>")
_INVOKE_CLOSE = re.compile(rf"</{_D}invoke>")
_PARAM_OPEN = re.compile(rf"<{_D}parameter\b([^>]*)>")
_PARAM_CLOSE = re.compile(rf"</{_D}parameter>")
_ANY_DSML = re.compile(_D)
_NAME_ATTR = re.compile(r'\s+name="([^"]*)"\s*')
_PARAM_ATTRS = re.compile(r'\s+name="([^"]*)"\s+string="(true|false)"\s*')
_SPACE = re.compile(r"\s*")


def tag(name: str, spelling: str = DSML, closing: bool = False) -> str:
    return f"<{'/' if closing else ''}{spelling}{name}>"


def excerpt(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def parse_invoke(segment: str) -> tuple[str, str]:
    """(name, arguments JSON string) from `segment`: optional whitespace, then one
    `<｜DSML｜invoke name="...">…</｜DSML｜invoke>` ending the segment.

    Raises DSMLError on a missing or empty name, a parameter without `name` / `string`, an unclosed
    parameter, DSML inside a value (a half-written closing tag), a duplicate parameter, a
    `string="false"` value that is not JSON, or any other text between the tags.
    """
    pos = _SPACE.match(segment).end()
    opening = _INVOKE_OPEN.match(segment, pos)
    if opening is None:
        raise DSMLError(f"expected <{DSML}invoke name=\"...\"> in the tool_calls block, "
                        f"got {excerpt(segment[pos:])}")
    name_attr = _NAME_ATTR.fullmatch(opening.group(1))
    if name_attr is None or not name_attr.group(1):
        raise DSMLError(f"invoke tag without a tool name: {excerpt(opening.group(0))}")
    name = name_attr.group(1)
    pos = opening.end()
    params: dict[str, str] = {}  # name -> JSON text of the value
    while True:
        pos = _SPACE.match(segment, pos).end()
        closing = _INVOKE_CLOSE.match(segment, pos)
        if closing:
            if segment[closing.end():].strip():
                raise DSMLError(f"unexpected text after invoke {name!r}: {excerpt(segment[closing.end():])}")
            break
        param = _PARAM_OPEN.match(segment, pos)
        if param is None:
            raise DSMLError(f"unexpected text inside invoke {name!r}: {excerpt(segment[pos:])}")
        attrs = _PARAM_ATTRS.fullmatch(param.group(1))
        if attrs is None:
            raise DSMLError(f"parameter tag in invoke {name!r} needs name=\"...\" and string=\"true|false\": "
                            f"{excerpt(param.group(0))}")
        key, is_string = attrs.group(1), attrs.group(2) == "true"
        close = _PARAM_CLOSE.search(segment, param.end())
        if close is None:
            raise DSMLError(f"parameter {key!r} of invoke {name!r} is not closed")
        value = segment[param.end():close.start()]
        if _ANY_DSML.search(value):
            raise DSMLError(f"DSML markup inside the value of parameter {key!r} of invoke {name!r}: "
                            f"{excerpt(value)}")
        if key in params:
            raise DSMLError(f"duplicate parameter {key!r} in invoke {name!r}")
        if is_string:
            params[key] = to_json(value)
        else:
            try:
                json.loads(value)
            except ValueError:
                raise DSMLError(f"parameter {key!r} of invoke {name!r} has string=\"false\" but its value is "
                                f"not JSON: {excerpt(value)}") from None
            params[key] = value  # kept as written, as DeepSeek's decoder does
        pos = close.end()
    arguments = "{" + ", ".join(f"{to_json(k)}: {v}" for k, v in params.items()) + "}"
    return name, arguments
