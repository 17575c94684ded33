"""The V4 control-token strings the chat format writes as text (docs/chat_format.md §1.2).

Prompts are plain strings; the tokenizer matches each of these as one added token, e.g.
`<think>` -> 128821 and `｜DSML｜` -> 128825 (U+FF5C bars, no angle brackets: a DSML tag is
`<` + `｜DSML｜` + ordinary BPE).
"""

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
DSML_ASCII = "|DSML|"  # the model sometimes writes ASCII bars; the parser accepts both

# `task` field of a user message -> token appended after it (internal "quick instruction" tasks).
TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}
