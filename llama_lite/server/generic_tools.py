"""Tool calls for a chat model whose template takes no tools (SmolLM2's): llama-server's "generic"
format.

The tools are described in the system message (after the user's own, if any) and the reply is held
to JSON that is either a call, `{"tool_call": {"name": ..., "arguments": {...}}}`, or an answer,
`{"response": "..."}` (tool_choice "auto"; "required" and a named function allow the call only).
`GenericParser` reads it back: a call becomes `tool_calls`, an answer's text `content`, streamed
as it is written. Past calls and tool results go back into the dialog as the same JSON, as text,
so any template renders them.
"""

import json
import re

from ..engine.constraints import JSON_DEFAULTS
from .tool_calls import CallParser, call_schema, parameters_of, partial_call, read_call

GENERIC = "generic"
ANSWER = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
          "additionalProperties": False}
ANSWER_START = re.compile(r'\s*\{\s*"response"\s*:\s*"')
CALL_START = re.compile(r'\s*\{\s*"tool_calls?"\s*:\s*')


def generic_instructions(tools: list, answer: bool) -> str:
    """What the system message says of `tools` (OpenAI's shape) and of the reply's JSON."""
    described = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
                  "parameters": parameters_of(t["function"])} for t in tools]
    lines = ["You can call these tools:", *(json.dumps(d, ensure_ascii=False) for d in described), "",
             'To call one, respond with JSON: {"tool_call": {"name": "<tool name>", "arguments": {...}}}']
    if answer:
        lines.append('To reply to the user instead, respond with JSON: {"response": "<your reply>"}')
    return "\n".join(lines)


def generic_dialog(dialog: list, tools: "list | None", answer: bool = True) -> list:
    """`dialog` for a template without tools: the tools described in the system message (merged
    with the user's), assistant calls written as the JSON the model replies with, and tool results
    as user messages of JSON (a template need not know the "tool" role)."""
    out = []
    for message in dialog:
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in message["tool_calls"]]
            reply = {"tool_call": calls[0]} if len(calls) == 1 else {"tool_calls": calls}
            message = {"role": "assistant", "content": json.dumps(reply, ensure_ascii=False)}
        elif message["role"] == "tool":
            result = {"tool": message.get("name"), "tool_call_id": message.get("tool_call_id"), "content": message["content"]}
            message = {"role": "user", "content": json.dumps({"tool_response": result}, ensure_ascii=False)}
        out.append(message)
    if tools:
        described = generic_instructions(tools, answer)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{described}"}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def generic_grammar(functions: list, answer: bool) -> str:
    """A Lark grammar (llguidance's) for the reply: a call to one of `functions`, or (`answer`) a
    call or an answer."""
    one = call_schema(functions)
    one.pop("x-guidance")
    defs = one.pop("$defs", {})  # at the root, where the parameters' rewritten references point
    call = {"type": "object", "properties": {"tool_call": one}, "required": ["tool_call"], "additionalProperties": False}
    schema = {"x-guidance": JSON_DEFAULTS, **({"$defs": defs} if defs else {}), **({"anyOf": [call, ANSWER]} if answer else call)}
    return f"start: reply\nreply: %json {json.dumps(schema)}"


class GenericParser:
    """One generic-format reply as it streams, with CallParser's `feed` and `finish`: an answer's
    text is shown as it is written (decoded from its JSON string), a call is held to the end."""

    def __init__(self, names):
        self.names, self.partial = set(names), False  # a generic reply is always held to its JSON
        self.held = ""  # the reply's JSON so far
        self.answer_at = None  # where the answer's string begins in `held`, once known
        self.decoded = 0  # characters of `held` past answer_at already shown

    def feed(self, text: str) -> str:
        self.held += text
        if self.answer_at is None:
            start = ANSWER_START.match(self.held)
            if start is None:
                return ""
            self.answer_at = start.end()
        body = self.held[self.answer_at + self.decoded:]
        end = _string_end(body)
        self.decoded += end
        return json.loads(f'"{body[:end]}"', strict=False)

    def finish(self, cut: bool = False):
        held, self.held = self.held, ""
        if self.answer_at is not None:
            body = held[self.answer_at + self.decoded:]
            return json.loads(f'"{body[:_string_end(body)]}"', strict=False), []
        try:
            reply = json.loads(held)
        except ValueError:
            reply = None
        if isinstance(reply, dict) and isinstance(reply.get("tool_call"), dict):
            bodies = [reply["tool_call"]]
        elif isinstance(reply, dict) and isinstance(reply.get("tool_calls"), list):
            bodies = reply["tool_calls"]
        else:  # the grammar allows nothing else: a reply ended early (max_tokens, a stop string)
            return self._cut(held)
        calls = [read_call(json.dumps(b), self.names, "arguments") for b in bodies]
        return ("", calls) if calls and None not in calls else (held, [])

    def _cut(self, held):
        """A reply max_tokens ended mid-call: the call as far as it got (nothing, before its name; the
        grammar allows no other JSON, so none is ever shown)."""
        start = CALL_START.match(held)  # else cut before it said call or answer: nothing to show
        call = partial_call(held[start.end():], self.names) if start else None
        self.partial = True
        return "", [call] if call else []


def _string_end(body: str) -> int:
    """How much of `body` (a JSON string's inside, maybe cut anywhere, maybe followed by its closing
    quote) decodes now: up to the closing quote, or the last whole escape before the cut."""
    i = 0
    while i < len(body) and body[i] != '"':
        step = 1
        if body[i] == "\\":
            step = 6 if body[i + 1: i + 2] == "u" else 2
            if step == 6 and 0xD800 <= int(body[i + 2: i + 6].ljust(4, "0"), 16) < 0xDC00:
                step = 12  # a surrogate pair's first half: decoded with its second
        if i + step > len(body):
            break
        i += step
    return i


def reply_parser(fmt: str, names, forced: bool = False):
    """The parser of a reply offered tools in format `fmt` (`forced`: a grammar makes it one call)."""
    return GenericParser(names) if fmt == GENERIC else CallParser(fmt, names, forced)
