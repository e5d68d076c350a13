"""Tool calls in a chat model's own format: a grammar that makes it write one, and finding them in
the text it wrote.

A template that takes `tools` teaches the model a format for its calls. Two are read, the format
chosen by the template's text:
- "hermes" (Qwen2.5, Hermes 2/3, and templates written in their style): after optional text, one or
  more `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks;
- "json" (Llama 3.1-3.3's custom tools): the whole reply is `{"name": ..., "parameters": {...}}`
  (after Llama's `<|python_tag|>`, if the model writes one).
With tool_choice "required" or a named function the reply is constrained to one call (`call_grammar`:
a Lark grammar embedding the functions' parameter schemas, so the arguments are valid). With
"auto" the model writes freely and `CallParser` reads its text as it streams: text that is not a
well-formed call to a known function stays content.
"""

import json
import re

from ..engine.constraints import JSON_DEFAULTS, compile_constraint

HERMES, JSON = "hermes", "json"
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


def call_format(template: str) -> str:
    """The call format a chat template teaches: "hermes" if it speaks of <tool_call>, else "json"."""
    return HERMES if HERMES_OPEN in template else JSON


def _arguments_key(fmt):
    return "arguments" if fmt == HERMES else "parameters"


def call_grammar(fmt: str, functions: list) -> str:
    """A Lark grammar (llguidance's) for exactly one call, in format `fmt`, to one of `functions`
    ({"name", "parameters"} each), its arguments an instance of that function's parameter schema."""
    key = _arguments_key(fmt)
    calls = [{"type": "object", "properties": {"name": {"const": f["name"]}, key: f.get("parameters") or {"type": "object"}},
              "required": ["name", key], "additionalProperties": False} for f in functions]
    schema = {"x-guidance": JSON_DEFAULTS, **(calls[0] if len(calls) == 1 else {"anyOf": calls})}
    call = f"call: %json {json.dumps(schema)}"
    if fmt == HERMES:
        return f"start: {json.dumps(HERMES_OPEN + chr(10))} call {json.dumps(chr(10) + HERMES_CLOSE)}\n{call}"
    return f"start: call\n{call}"


def check_parameters(functions: list, where: str) -> None:
    """ValueError naming the function whose parameter schema cannot be enforced."""
    for i, f in enumerate(functions):
        if f.get("parameters") is not None:
            compile_constraint("json_schema", f["parameters"], name=f"{where}[{i}].function.parameters")


class CallParser:
    """One reply's text as it streams: `feed` returns the content that can be shown now (text that
    may still turn out to be a call is held back); `finish` returns the rest of the content and the
    calls found, [{"name", "arguments": JSON text}]."""

    def __init__(self, fmt: str, names):
        self.fmt, self.names = fmt, set(names)
        self.held = ""  # text not shown yet
        self.calling = False  # a call has begun: everything from here is held to the end
        self.plain = False  # (json) the reply is not a call: text passes through

    def feed(self, text: str) -> str:
        if self.plain:
            return text
        self.held += text
        if self.calling:
            return ""
        if self.fmt == JSON:
            start = self.held.lstrip()
            if not start:
                return ""
            if start.startswith("{") or start.startswith(PYTHON_TAG):
                self.calling = True
                return ""
            if PYTHON_TAG.startswith(start):  # may become the tag: wait
                return ""
            self.plain = True
            out, self.held = self.held, ""
            return out
        at = self.held.find(HERMES_OPEN)
        if at >= 0:
            self.calling = True
            out, self.held = self.held[:at], self.held[at:]
            return out
        keep = next((k for k in range(min(len(HERMES_OPEN) - 1, len(self.held)), 0, -1)
                     if self.held.endswith(HERMES_OPEN[:k])), 0)  # may be the start of "<tool_call>"
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out

    def finish(self):
        held, self.held = self.held, ""
        calls = self._calls(held) if self.calling else None
        return ("", calls) if calls else (held, [])

    def _calls(self, text):
        """The calls `text` holds, or None unless all of it is well-formed calls to known functions."""
        if self.fmt == JSON:
            bodies = [text.strip().removeprefix(PYTHON_TAG)]
        else:
            pattern = re.escape(HERMES_OPEN) + r"(.*?)" + re.escape(HERMES_CLOSE)
            bodies = re.findall(pattern, text, re.S)
            if not bodies or re.sub(pattern, "", text, flags=re.S).strip():
                return None
        calls = []
        for body in bodies:
            try:
                call = json.loads(body)
            except ValueError:
                return None
            arguments = call.get(_arguments_key(self.fmt), call.get("arguments")) if isinstance(call, dict) else None
            if isinstance(arguments, str):  # some models write the arguments as JSON text
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    return None
            if call.get("name") not in self.names or not isinstance(arguments, dict):
                return None
            calls.append({"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)})
        return calls
