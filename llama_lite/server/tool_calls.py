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
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
OPEN_OBJECT = {"type", "properties", "title", "description", "required", "$schema"}  # keys that add no parameter


def call_format(template: str) -> str:
    """The call format a chat template teaches: "hermes" if it speaks of <tool_call>, else "json"."""
    return HERMES if HERMES_OPEN in template else JSON


def _arguments_key(fmt):
    return "arguments" if fmt == HERMES else "parameters"


def call_grammar(fmt: str, functions: list) -> str:
    """A Lark grammar (llguidance's) for exactly one call, in format `fmt`, to one of `functions`
    ({"name", "parameters"} each), its arguments an instance of that function's parameter schema."""
    call = f"call: %json {json.dumps(call_schema(functions, _arguments_key(fmt)))}"
    if fmt == HERMES:
        return f"start: {json.dumps(HERMES_OPEN + chr(10))} call {json.dumps(chr(10) + HERMES_CLOSE)}\n{call}"
    return f"start: call\n{call}"


def parameters_of(function: dict) -> dict:
    """A function's parameter schema; one that names no parameters (absent, `{}`, or an object schema
    without properties) takes none, as OpenAI reads it: the arguments are `{}`, not whatever object
    the model makes up (a small model copies the tool's own definition from its prompt)."""
    schema = function.get("parameters") or {}
    closed = schema.get("type") == "object" and not schema.get("properties") and not schema.get("required")
    if not schema or (closed and set(schema) <= OPEN_OBJECT):
        return NO_PARAMETERS
    return schema


SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
SCHEMA_VALUES = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
                 "additionalItems", "unevaluatedProperties")


def closed(schema, close: bool = True):
    """`schema` with every object that names its properties closed to others (additionalProperties
    false where it says nothing), as llama.cpp's grammars and OpenAI's strict mode read a tool's
    parameters: else a small model piles up made-up properties until max_tokens."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: closed(s) for name, s in value.items()}
        elif key in SCHEMA_LISTS or key in SCHEMA_VALUES:
            out[key] = closed(value)
        elif key == "allOf" and isinstance(value, list):  # its parts' properties add up: leave each open
            out[key] = [closed(s, close=False) for s in value]
        else:
            out[key] = value  # a keyword's value, or data (const, enum, default), as it is
    if close and isinstance(out.get("properties"), dict) and "additionalProperties" not in out \
            and not {"patternProperties", "unevaluatedProperties", "allOf"} & set(out):
        out["additionalProperties"] = False
    return out


def call_schema(functions: list, key: str = "arguments") -> dict:
    """The JSON Schema of one call, {"name": ..., key: {...}}, to one of `functions`. A parameter
    schema that refers within itself ("$ref": "#/$defs/...", as pydantic writes them) is moved to
    the root's $defs, its references rewritten to point there: embedded as it is, they would not resolve."""
    calls, defs = [], {}
    for i, f in enumerate(functions):
        parameters = closed(parameters_of(f))
        if '"$ref"' in json.dumps(parameters):
            defs[f"parameters{i}"] = _rooted(parameters, f"#/$defs/parameters{i}")
            parameters = {"$ref": f"#/$defs/parameters{i}"}
        calls.append({"type": "object", "properties": {"name": {"const": f["name"]}, key: parameters},
                      "required": ["name", key], "additionalProperties": False})
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {"x-guidance": JSON_DEFAULTS, **({"$defs": defs} if defs else {}), **one}


def _rooted(schema, root: str):
    """`schema` with its local references ("#", "#/...") made to point below `root`."""
    if isinstance(schema, list):
        return [_rooted(item, root) for item in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    return {k: root + ref[1:] if k == "$ref" and isinstance(ref, str) and ref.startswith("#") else _rooted(v, root)
            for k, v in schema.items()}


def check_parameters(functions: list, where: str) -> None:
    """ValueError naming the function whose parameter schema cannot be enforced, or is not of an object."""
    for i, f in enumerate(functions):
        if f.get("parameters") is not None:
            compile_constraint("json_schema", f["parameters"], name=f"{where}[{i}].function.parameters")
        kind = (f.get("parameters") or {}).get("type", "object")
        if kind != "object":
            raise ValueError(f"{where}[{i}].function.parameters must be a JSON Schema of type 'object' (the call's "
                             f"arguments are an object), got type {kind!r}; describe each argument as a property")


class CallParser:
    """One reply's text as it streams: `feed` returns the content that can be shown now (text that
    may still turn out to be a call is held back); `finish` returns the rest of the content and the
    calls found, [{"name", "arguments": JSON text}]."""

    def __init__(self, fmt: str, names, forced: bool = False):
        self.fmt, self.names, self.forced = fmt, set(names), forced  # forced: a grammar makes the reply one call
        self.partial = False  # finish found a call cut short
        self.held = ""  # text not shown yet
        self.said = False  # (hermes) text other than white space was shown
        self.calling = False  # a call has begun: everything from here is held to the end
        self.plain = False  # (json) the reply is not a call: text passes through

    def feed(self, text: str) -> str:
        if self.plain:
            return text
        self.held += text
        if self.calling or self.forced:
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
            return self._shown(out)
        keep = next((k for k in range(min(len(HERMES_OPEN) - 1, len(self.held)), 0, -1)
                     if self.held.endswith(HERMES_OPEN[:k])), 0)  # may be the start of "<tool_call>"
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return self._shown(out)

    def _shown(self, out: str) -> str:
        """`out` once the reply has said something: the blank lines a model writes before its call
        are held (and dropped with the call), so that a reply of calls alone has no content."""
        if not self.said and not out.strip():
            self.held = out + self.held
            return ""
        self.said = True
        return out

    def finish(self, cut: bool = False):
        """(the rest of the content, the calls). `cut`: the reply ended early (max_tokens): a call begun
        comes back as far as it got (OpenAI's partial call), never as its format's markup."""
        held, self.held = self.held, ""
        if self.forced:  # all of it is the call, whole or (ended by max_tokens or a stop) cut
            return "", self._calls(held, cut=True) or []
        calls = self._calls(held, cut) if self.calling else None
        return ("", calls) if calls is not None and (calls or cut) else (held, [])

    def _calls(self, text, cut=False):
        """The calls `text` holds, or None unless all of it is well-formed calls to known functions
        (the last one may be partial when `cut`)."""
        if self.fmt == JSON:
            bodies = [text.strip().removeprefix(PYTHON_TAG)]
        else:
            pattern = re.escape(HERMES_OPEN) + r"(.*?)" + re.escape(HERMES_CLOSE)
            bodies = re.findall(pattern, text, re.S)
            rest = re.sub(pattern, "", text, flags=re.S).strip()
            if cut and rest.startswith(HERMES_OPEN) and HERMES_CLOSE not in rest:
                bodies.append(rest[len(HERMES_OPEN):])  # the call max_tokens cut
            elif not bodies or rest:
                return None
        calls = []
        for k, body in enumerate(bodies):
            call = read_call(body, self.names, _arguments_key(self.fmt))
            if call is None and cut and k == len(bodies) - 1:
                call, self.partial = partial_call(body, self.names), True  # None: no name written yet
                return calls + [call] if call else (calls if self.fmt == HERMES else None)
            if call is None:
                return None
            calls.append(call)
        return calls


def read_call(body: str, names, key: str) -> "dict | None":
    """{"name", "arguments": JSON text} of a call's JSON text, or None if it is not a call to one of `names`."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict):
        return None
    arguments = call.get(key, call.get("arguments"))
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if call.get("name") not in names or not isinstance(arguments, dict):
        return None
    return {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}


NAME = re.compile(r'"name"\s*:\s*"([A-Za-z0-9_-]*)(")?')
ARGUMENTS = re.compile(r'"(?:arguments|parameters)"\s*:\s*')


def partial_call(text: str, names) -> "dict | None":
    """The call begun in `text` (JSON cut short): its name (completed when only one function's name
    starts so) and its arguments' JSON text so far; None when no function can be named."""
    name = NAME.search(text)
    if name is None:
        return None
    written = name.group(1)
    matches = [n for n in names if n == written] if name.group(2) else [n for n in names if n.startswith(written)]
    if len(matches) != 1:
        return None
    arguments = ARGUMENTS.search(text, name.end())
    so_far = text[arguments.end():].rstrip() if arguments else ""
    try:  # the arguments were whole (the cut came after them): written as a complete call's are
        value, _ = json.JSONDecoder().raw_decode(so_far)
        so_far = json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else so_far
    except ValueError:
        pass
    return {"name": matches[0], "arguments": so_far}
