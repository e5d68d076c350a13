"""Dialogs to prompt text with a checkpoint's own jinja2 chat template.

Templates come inside downloaded files, so they are untrusted: they render in jinja2's immutable
sandbox, which refuses attribute walks such as `__class__.__subclasses__` and cannot touch files.
"""

from datetime import datetime

ROLES = ("system", "user", "assistant")


def check_dialog(dialog) -> None:
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError("a dialog must be a non-empty list of {'role': ..., 'content': ...} messages")
    for i, message in enumerate(dialog):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} of the dialog must be {{'role': one of {ROLES}, 'content': str}}, got {message!r}")


def render_chat(template: str, dialog: list, *, bos_token: str = "", eos_token: str = "") -> str:
    """The prompt text for `dialog`, ending with the assistant's turn opened (add_generation_prompt)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    check_dialog(dialog)

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=list(dialog), add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token
        )
    except Exception as e:  # SecurityError from the sandbox, syntax errors, a template's own TypeError...
        raise ValueError(f"the checkpoint's chat template failed: {type(e).__name__}: {e}") from None
