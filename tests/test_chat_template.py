"""Chat templates come from downloaded files: they render, but cannot reach Python or the disk."""

import pytest

from llama_lite.chat_template import render_chat
from tests.tiny_gguf import CHATML

DIALOG = [{"role": "user", "content": "Hi"}]


def test_renders_with_the_generation_prompt():
    assert render_chat(CHATML, DIALOG) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__['os'].system('echo pwned') }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{% set x = messages.append(1) %}",  # the immutable sandbox refuses mutation
        "{{ raise_exception('this model only takes user turns') }}",
        "{% for %}",  # a syntax error
    ],
)
def test_hostile_or_broken_templates_fail_cleanly(template):
    with pytest.raises(ValueError, match="chat template failed"):
        render_chat(template, DIALOG)


def test_file_reads_are_impossible():
    with pytest.raises(ValueError, match="chat template failed"):
        render_chat("{% include '/etc/passwd' %}", DIALOG)
