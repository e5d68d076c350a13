"""Dialogs to prompt text with a checkpoint's own jinja2 chat template (and tools, where it takes them).

Templates come inside downloaded files, so they are untrusted: they render in jinja2's immutable
sandbox, which refuses attribute walks such as `__class__.__subclasses__` and cannot touch files;
string and list repetition, powers and the output's length are capped, and rendering stops after
a time bound, so a template can neither exhaust memory nor loop forever.
"""

import functools
import json
import os
import sys
import time
from datetime import datetime

from ..checks import read_text_file

ROLES = ("system", "user", "assistant", "tool")
TIME_LIMIT_S = 2.0  # real templates render in milliseconds
MAX_REPEAT = 100_000  # the longest string or list a template may build by '*'
MAX_OUTPUT = 4_000_000  # characters: far beyond any context window


def check_dialog(dialog) -> None:
    """A list of {'role', 'content': str} messages; an assistant message that calls tools (Hugging
    Face's shape: 'tool_calls' of {'function': {'name', 'arguments': dict}}) may have no content."""
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError("a dialog must be a non-empty list of {'role': ..., 'content': ...} messages")
    for i, message in enumerate(dialog):
        calls = isinstance(message, dict) and message.get("role") == "assistant" and bool(message.get("tool_calls"))
        if (not isinstance(message, dict) or message.get("role") not in ROLES
                or not (isinstance(message.get("content"), str) or calls and message.get("content") is None)):
            raise ValueError(f"message {i} of the dialog must be {{'role': one of {ROLES}, 'content': str}}, got {message!r}")


def _environment():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise SecurityError("exponent too large")
            if operator == "*":
                for seq, count in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > MAX_REPEAT:
                        raise SecurityError("repetition too large")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # transformers': not HTML-escaped
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _within(seconds, work):
    """work(), stopped with TimeoutError once it runs past `seconds` in template code."""
    deadline = time.monotonic() + seconds

    def check(frame, event, arg):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rendering ran over {seconds:g} s")
        return check if frame.f_code.co_filename == "<template>" else None  # line events: template code only

    previous = sys.gettrace()
    sys.settrace(check)
    try:
        return work()
    finally:
        sys.settrace(previous)


@functools.lru_cache(maxsize=8)
def takes_tools(template: str) -> bool:
    """Whether a template renders a `tools` list (Qwen2.5's, Llama 3.1's and Hermes' do); asked on
    each chat request, so a template is parsed once."""
    from jinja2 import TemplateSyntaxError, meta

    try:
        return "tools" in meta.find_undeclared_variables(_environment().parse(template))
    except TemplateSyntaxError:
        return False


def check_template(template: str) -> None:
    """ValueError (one line) unless `template` is jinja2 that parses."""
    from jinja2 import TemplateSyntaxError

    try:
        _environment().parse(template)
    except TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not parse: {e.message} (line {e.lineno}); fix it") from None


def render_chat(template: str, dialog: list, *, bos_token: str = "", eos_token: str = "", tools=None) -> str:
    """The prompt text for `dialog`, ending with the assistant's turn opened (add_generation_prompt).
    `tools`: OpenAI-style function definitions for a template that takes them (as transformers'
    apply_chat_template passes them)."""
    check_dialog(dialog)
    extra = {} if tools is None else {"tools": tools}
    try:
        compiled = _environment().from_string(template)

        def render():
            pieces, size = [], 0
            for piece in compiled.generate(messages=list(dialog), add_generation_prompt=True,
                                           bos_token=bos_token, eos_token=eos_token, **extra):
                size += len(piece)
                if size > MAX_OUTPUT:
                    raise MemoryError(f"the prompt grew past {MAX_OUTPUT} characters")
                pieces.append(piece)
            return "".join(pieces)

        return _within(TIME_LIMIT_S, render)
    except Exception as e:  # SecurityError from the sandbox, syntax errors, the time bound, a template's own TypeError...
        raise ValueError(f"the checkpoint's chat template failed: {type(e).__name__}: {e}") from None


def read_chat_template(value) -> "str | None":
    """A chat template given as its text or as a file holding it (None: none given)."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ValueError(f"chat_template must be a jinja2 template or a file holding one, got {value!r}")
    text = str(value)
    if not isinstance(value, str) or ("{{" not in text and "{%" not in text):  # a path
        text = read_text_file(value, "chat template", "a jinja2 chat template")
    check_template(text)
    return text
