"""The request bodies the server takes, as pydantic models of OpenAI's API: FastAPI validates every
request against them and shows them at /docs. A field that breaks a rule is one line naming it (a
`RequestError`, which the server returns in OpenAI's error body); a field of OpenAI's this server
does not implement is refused unless it holds its default, never silently ignored.
"""

import json
import math
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from ..checks import is_whole
from ..engine.constraints import compile_constraint

MAX_STOPS = 4  # as OpenAI
MAX_TOKENS = 1 << 30


class RequestError(ValueError):
    """A bad request: its one-line message, the field it is about and OpenAI's error code."""

    def __init__(self, message: str, param=None, code=None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def _rule(check):
    """A BeforeValidator running check(value) -> problem or None on a value that is not None."""

    def validate(value, info):
        problem = None if value is None else check(value)
        if problem:
            raise RequestError(f"'{info.field_name}' {problem}, got {value!r}", info.field_name)
        return value

    return BeforeValidator(validate)


def WholeNumber(low, high=None):
    """An optional whole-number field in low..high (high None: no bound above)."""
    allowed = f"in {low}..{high}" if high is not None else f">= {low}"
    ok = lambda x: is_whole(x) and low <= x and (high is None or x <= high)  # noqa: E731
    return Annotated[Optional[int], _rule(lambda x: None if ok(x) else f"must be a whole number {allowed}"),
                     Field(ge=low, le=high)]


def Number(low, high):
    """An optional finite-number field in [low, high]."""

    def check(x):
        fine = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and low <= x <= high
        return None if fine else f"must be a number in [{low}, {high}]"

    return Annotated[Optional[float], _rule(check), Field(ge=low, le=high)]


# JSON true/false only
Flag = Annotated[Optional[bool], _rule(lambda x: None if isinstance(x, bool) else "must be true or false")]


NonEmptyText = Annotated[Optional[str], _rule(lambda x: None if isinstance(x, str) and x else "must be a non-empty string")]


def Unsupported(default=None):
    """An OpenAI field this server does not implement: only its default (or an empty value) passes."""

    def validate(value, info):
        if value is not None and value != default and value != [] and value != {}:
            raise RequestError(f"'{info.field_name}' is not supported by this server; leave it out", info.field_name,
                               "unsupported_parameter")
        return value

    return Annotated[Any, BeforeValidator(validate), Field(description="not supported: only its default is accepted")]


def _stop(value):
    stop = [value] if isinstance(value, str) else value
    well_formed = isinstance(stop, list) and len(stop) <= MAX_STOPS and all(isinstance(s, str) and s for s in stop)
    if stop is not None and not well_formed:
        raise RequestError(f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them, got {value!r}", "stop")
    return stop


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: StrictStr
    description: Optional[StrictStr] = None
    schema_: Optional[Union[dict, bool]] = Field(None, alias="schema")  # none: any JSON value
    strict: Optional[StrictBool] = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise RequestError("response_format of type 'json_schema' needs a 'json_schema': {\"name\", \"schema\"}",
                               "response_format")
        if self.type == "json_schema" and self.json_schema.schema_ is False:  # falsy: the compile ahead passes it by
            try:
                compile_constraint("json_schema", False, name="response_format.json_schema.schema")
            except ValueError as e:
                raise RequestError(str(e), "response_format") from None
        return self

    def constraint(self) -> dict:
        """The SamplingParams fields this format asks for."""
        if self.type == "json_object":
            return {"json_object": True}
        if self.type == "json_schema":
            schema = self.json_schema.schema_
            return {"json_schema": {} if schema is None else schema}
        return {}


class _Request(BaseModel):
    """What both endpoints take."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[StrictStr] = None
    max_tokens: WholeNumber(1, MAX_TOKENS) = None
    temperature: Number(0, 2) = None
    top_p: Number(0, 1) = None
    top_k: WholeNumber(1) = Field(None, description="an extension: sample from the k likeliest tokens")
    stop: Annotated[Union[str, list[str], None], BeforeValidator(_stop)] = None
    seed: WholeNumber(-(2**63), 2**63 - 1) = None
    n: WholeNumber(1, 16) = None
    presence_penalty: Number(-2, 2) = None
    frequency_penalty: Number(-2, 2) = None
    stream: Flag = None
    stream_options: Optional[StreamOptions] = None
    user: Any = Field(None, description="accepted and ignored")
    response_format: Optional[ResponseFormat] = None
    cache_salt: NonEmptyText = Field(
        None, description="an extension: prompt K/V are shared only between requests of the same salt")
    logit_bias: Unsupported() = None
    suffix: Unsupported() = None
    best_of: Unsupported(1) = None
    audio: Unsupported() = None
    modalities: Unsupported() = None
    prediction: Unsupported() = None
    reasoning_effort: Unsupported() = None
    web_search_options: Unsupported() = None
    service_tier: Unsupported() = None
    store: Unsupported(False) = None
    metadata: Unsupported() = None
    functions: Unsupported() = None
    function_call: Unsupported() = None

    @model_validator(mode="before")
    @classmethod
    def _read_body(cls, body):
        """The body as JSON whatever its content type; stream_options only with stream."""
        if isinstance(body, bytes):  # sent as another content type (curl -d sends a form's): read it as JSON
            try:
                body = json.loads(body)
            except ValueError as e:
                raise RequestError(f"the request body is not valid JSON ({e}); send a JSON object") from None
        options = body.get("stream_options") if isinstance(body, dict) else None
        well_formed = options is None or (body.get("stream") is True and isinstance(options, dict)
                                          and not set(options) - {"include_usage"})
        if not well_formed:
            raise RequestError("stream_options must be {\"include_usage\": bool}, and only with stream: true", "stream_options")
        return body

    def sampling(self, default_max_tokens) -> dict:
        """SamplingParams fields of the request (OpenAI's defaults: temperature 1, top_p 1)."""
        return {
            "temperature": 1.0 if self.temperature is None else float(self.temperature),
            "top_p": (1.0 if self.top_p is None else float(self.top_p)) or 1e-9,  # 0: the likeliest token alone
            "top_k": self.top_k,
            "max_tokens": default_max_tokens if self.max_tokens is None else self.max_tokens,
            "stop": tuple(self.stop or ()),
            "seed": self.seed,
            "presence_penalty": float(self.presence_penalty or 0.0),
            "frequency_penalty": float(self.frequency_penalty or 0.0),
            "cache_salt": self.cache_salt,
        }


def _prompt(value):
    if not isinstance(value, (str, list)) or isinstance(value, list) and not value:
        raise RequestError("'prompt' is required: a string, a list of strings, or token ids", "prompt")
    if isinstance(value, list) and not all(is_whole(t) for t in value):
        for i, p in enumerate(value):
            if not isinstance(p, str) and not (isinstance(p, list) and all(is_whole(t) for t in p)):
                raise RequestError(f"prompt {i} must be a non-empty string or a list of token ids, got {p!r}", "prompt")
    return value


class CompletionRequest(_Request):
    prompt: Annotated[Union[str, list[Union[StrictStr, StrictInt, list[StrictInt]]]], BeforeValidator(_prompt)]
    echo: Flag = None
    logprobs: WholeNumber(0, 5) = Field(None, description="the chosen token's log-probability and this many alternatives")
    tools: Unsupported() = None
    tool_choice: Unsupported() = None
    parallel_tool_calls: Unsupported() = None


# --- chat ---------------------------------------------------------------------------------------------

class FunctionCall(BaseModel):
    name: StrictStr
    arguments: StrictStr = Field(description="the arguments as JSON text")


class ToolCall(BaseModel):
    id: Optional[StrictStr] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"] = Field(description="'developer' is taken as 'system'")
    content: Optional[str] = Field(None, description="text, or a list of text parts (joined)")
    name: Optional[StrictStr] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[StrictStr] = None


def _messages(messages):
    """OpenAI's messages checked one by one, text parts joined, 'developer' as 'system'."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    roles = ("system", "developer", "user", "assistant", "tool")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        role, content = message.get("role"), message.get("content")
        if role not in roles:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(repr(r) for r in roles)}, got {role!r}", "messages")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise RequestError(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str) and not (role == "assistant" and content is None and message.get("tool_calls")):
            raise RequestError(f"messages[{i}].content must be a string, got {type(content).__name__}", "messages")
        try:
            (content or "").encode("utf-8")
        except UnicodeEncodeError as e:  # "\ud800" in the JSON: no tokenizer takes it
            raise RequestError(f"messages[{i}].content holds {content[e.start]!r} at {e.start}, a lone surrogate, which "
                               "is not text; send valid Unicode", "messages") from None
        out.append({**message, "role": "system" if role == "developer" else role, "content": content})
    return out


class FunctionDefinition(BaseModel):
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Optional[StrictStr] = None
    parameters: Optional[dict] = Field(None, description="a JSON Schema; with tool_choice 'required' or this function "
                                                         "named, the call's arguments are held to it")
    strict: Optional[StrictBool] = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: StrictStr


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


def _tool_choice(value):
    named = isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict) \
        and isinstance(value["function"].get("name"), str)
    if value not in ("none", "auto", "required") and not named:
        raise RequestError("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
                           f"{{\"name\": ...}}}}, got {value!r}", "tool_choice")
    return value


ToolChoice = Annotated[Union[Literal["none", "auto", "required"], NamedToolChoice, None], BeforeValidator(_tool_choice)]


class ChatRequest(_Request):
    messages: Annotated[list[ChatMessage], BeforeValidator(_messages)]
    logprobs: Flag = None
    top_logprobs: WholeNumber(0, 20) = None
    max_completion_tokens: WholeNumber(1, MAX_TOKENS) = None
    tools: Optional[list[Tool]] = None
    tool_choice: ToolChoice = Field(None, description="default 'auto' when tools are given")
    parallel_tool_calls: Flag = Field(None, description="accepted; a constrained reply holds one call")

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        names = [t.function.name for t in self.tools or []]
        choice = self.tool_choice
        if choice is not None and choice != "none" and not names:
            raise RequestError("tool_choice needs 'tools' to choose from", "tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise RequestError(f"tool_choice names function '{choice.function.name}', which is not among the tools "
                               f"({', '.join(names)})", "tool_choice")
        if self.functions_offered() and self.response_format is not None and self.response_format.type != "text":
            raise RequestError("response_format and tools cannot be used together; send tool_choice 'none' or no "
                               "response_format", "response_format")
        return self

    def functions_offered(self) -> list:
        """The function definitions the template is given (none with tool_choice 'none')."""
        return [] if self.tool_choice == "none" else [t.function for t in self.tools or []]

    def functions_forced(self) -> list:
        """The functions a reply must call: all for 'required', one when named, none otherwise."""
        if self.tool_choice == "required":
            return self.functions_offered()
        if isinstance(self.tool_choice, NamedToolChoice):
            return [f for f in self.functions_offered() if f.name == self.tool_choice.function.name]
        return []

    def dialog(self) -> list:
        """The messages as a chat template takes them (transformers' shape: a call's arguments as a dict)."""
        dialog = []
        for i, m in enumerate(self.messages):
            message = {"role": m.role, "content": m.content}
            if m.tool_calls:
                message["tool_calls"] = [{"id": c.id, "type": "function",
                                          "function": {"name": c.function.name, "arguments": _arguments(c, i)}}
                                         for c in m.tool_calls]
            if m.role == "tool":
                message.update(tool_call_id=m.tool_call_id, name=m.name)
            dialog.append(message)
        return dialog

    def template_tools(self) -> "list | None":
        """The offered functions in OpenAI's tool shape, for the chat template; None without any."""
        offered = self.functions_offered()
        return [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in offered] or None


def _arguments(call, i):
    try:
        return json.loads(call.function.arguments)
    except ValueError:
        raise RequestError(f"messages[{i}].tool_calls: the arguments of '{call.function.name}' are not valid JSON",
                           "messages") from None


def _union_tag(part) -> bool:
    """Whether a place in pydantic's error location names a member of a union ('str', 'list[int]')
    rather than a field."""
    return isinstance(part, str) and ("[" in part or "-" in part or part in ("str", "int", "float", "bool", "dict", "list"))


def error_of(error: dict) -> RequestError:
    """A pydantic (or FastAPI) validation error as one RequestError: our own rules' messages as they
    are, the others in a line naming the field's place."""
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, RequestError):
        return cause
    loc = [part for part in error.get("loc", ()) if part != "body" and not _union_tag(part)]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    kind = error.get("type")
    if kind == "json_invalid":
        detail = f" ({cause})" if cause else ""
        return RequestError(f"the request body is not valid JSON{detail}; send a JSON object")
    if not loc:
        return RequestError("the request body must be a JSON object (sent with Content-Type: application/json)")
    if kind == "extra_forbidden" and len(loc) == 1:
        return RequestError(f"unrecognized request argument '{loc[0]}'", loc[0], "unrecognized_argument")
    if kind == "missing":
        return RequestError(f"'{where}' is required", str(loc[0]))
    return RequestError(f"'{where}': {error.get('msg', 'is invalid')}, got {error.get('input')!r}", str(loc[0]))
