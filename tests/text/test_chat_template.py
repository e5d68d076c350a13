"""Chat templates come from downloaded files: they render, but cannot reach Python or the disk."""

import pytest

from llama_lite.text.chat_template import render_chat
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


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",  # 1e10 steps
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
        "{{ 'x' * 10**9 }}",
        "{{ [1] * 10**9 }}",
        "{% for i in range(100000) %}{{ 'y' * 90000 }}{% endfor %}",  # 9e9 characters of output
        "{{ 9 ** 99999999 }}",
    ],
)
def test_huge_work_is_stopped_within_a_time_bound(template):
    import time

    started = time.monotonic()
    with pytest.raises(ValueError, match="chat template failed"):
        render_chat(template, DIALOG)
    assert time.monotonic() - started < 5


def test_the_real_template_still_renders_fast(llm):
    import time

    dialog = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] * 50
    started = time.monotonic()
    text = render_chat(llm.tokenizer.chat_template, dialog + [{"role": "user", "content": "bye"}])
    assert text.count("<|im_start|>") == 103 and time.monotonic() - started < 0.5


def test_a_chat_template_override_is_text_or_a_file(tmp_path):
    from llama_lite.text.chat_template import read_chat_template

    text = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = tmp_path / "t.jinja"
    path.write_text(text)
    assert read_chat_template(text) == read_chat_template(path) == read_chat_template(str(path)) == text
    assert read_chat_template(None) is None
    with pytest.raises(FileNotFoundError, match="chat template file .*nope.jinja does not exist"):
        read_chat_template(tmp_path / "nope.jinja")
    with pytest.raises(ValueError, match=r"the chat template does not parse: .* \(line 1\); fix it"):
        read_chat_template("{% for m in messages %}{{ m }}")
    with pytest.raises(ValueError, match="chat_template must be"):
        read_chat_template(5)


def test_a_chat_template_file_that_is_a_folder_empty_or_not_text_is_named_as_such(tmp_path):
    from llama_lite.text.chat_template import read_chat_template

    (tmp_path / "empty.jinja").write_text("  \n")
    (tmp_path / "latin1.jinja").write_bytes("{{ 'caf\xe9' }}".encode("latin-1"))
    cases = [(tmp_path, f"chat template {tmp_path} is a folder; pass a jinja2 chat template file"),
             (tmp_path / "empty.jinja", "chat template file .*empty.jinja is empty; write a jinja2 chat template in it"),
             (tmp_path / "latin1.jinja", "chat template file .*latin1.jinja is not UTF-8 text; save it as UTF-8")]
    for path, message in cases:
        with pytest.raises(ValueError, match=message):
            read_chat_template(path)
