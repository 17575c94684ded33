"""Fixed texts of the V4 prompt: the tools block, the response-format block and the
`reasoning_effort="max"` preamble. They are part of the format the model was trained on and must
match DeepSeek's `encoding_dsv4.py` (sha256 bdbd57c1…) byte for byte (docs/chat_format.md §2).
"""

import json

from dsv4_jax.chat.tokens import DSML, THINK_END, THINK_START

# Placed right after BOS, in thinking mode only, when reasoning_effort == "max".
REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve "
    "the root cause, rigorously stress-testing your logic against all potential paths, edge cases, "
    "and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)

_TOOLS_HEADER = "\n".join([
    "## Tools",
    "",
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "
    f'"<{DSML}tool_calls>" block like the following:',
    "",
    f"<{DSML}tool_calls>",
    f'<{DSML}invoke name="$TOOL_NAME">',
    f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>',
    "...",
    f"</{DSML}invoke>",
    f'<{DSML}invoke name="$TOOL_NAME2">',
    "...",
    f"</{DSML}invoke>",
    f"</{DSML}tool_calls>",
    "",
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, '
    'booleans, arrays, objects), pass the value in JSON format and set `string="false"`.',
    "",
    f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning "
    f"inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.",
    "",
    f"Otherwise, output directly after {THINK_END} with tool calls or final response.",
    "",
    "### Available Tool Schemas",
    "",
    "",
])

_TOOLS_FOOTER = ("\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke "
                 "tool calls.\n")


def to_json(value) -> str:
    """The JSON spelling used everywhere in the prompt: default separators, unicode kept."""
    return json.dumps(value, ensure_ascii=False)


def tools_block(tools: list[dict]) -> str:
    """'## Tools' section for OpenAI-style tools ({"type": "function", "function": {...}})."""
    schemas = []
    for tool in tools:
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
            raise ValueError("each tool must be OpenAI-style {'type': 'function', 'function': {...}}, "
                             f"got {tool!r}")
        schemas.append(to_json(tool["function"]))
    return _TOOLS_HEADER + "\n".join(schemas) + _TOOLS_FOOTER


def response_format_block(response_format) -> str:
    return ("## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
            + to_json(response_format))
