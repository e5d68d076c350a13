"""What a newcomer meets first: an empty --prompt refused as the API refuses an empty prompt, the
loading bar only for a load that takes a while, and choice errors that spell their choices one way
(quoted Python values in the API, flag values as typed on the command line)."""

import re

import pytest

from llama_lite import Llama
from llama_lite.loading import weights
from tests.cli.test_scripts import FLAGS, assert_fails, in_process
from tests.tiny_gguf import write_tiny_gguf

TINY_FLAGS = [*FLAGS[:-1], "128"]  # the tiny model's context is 256


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("newcomer") / "tiny.gguf")


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_chat_refuses_an_empty_prompt_before_loading(tiny, prompt):
    done = in_process("chat.py", "--prompt", prompt, "--checkpoint", tiny, "--max_gen_len", "4", *TINY_FLAGS)
    assert_fails(done, "--prompt is empty; pass some text, or leave --prompt out to chat a line at a time on stdin")
    assert done.stdout == "" and "loading" not in done.stderr


def test_text_completion_refuses_the_empty_prompt_with_the_same_words(tiny):
    llm = Llama.build(tiny, device="cpu", dtype="float32", max_seq_len=64, max_batch_size=1)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        llm.text_completion([""])


def test_a_quick_load_shows_no_progress_bar(tiny, capsys, monkeypatch):
    monkeypatch.setattr(weights, "PROGRESS_BYTES", 0)  # a file "large" enough for the bar: only its time decides
    Llama.build(tiny, device="cpu", dtype="float32", max_seq_len=64, max_batch_size=1)
    assert "loading" not in capsys.readouterr().err
    monkeypatch.setattr(weights, "PROGRESS_DELAY_S", 0, raising=False)  # a load "slower" than the delay: the bar shows
    Llama.build(tiny, device="cpu", dtype="float32", max_seq_len=64, max_batch_size=1)
    assert "loading" in capsys.readouterr().err


def test_a_one_line_chat_with_the_default_model_prints_only_its_reply(llm, smollm_path):
    done = in_process("chat.py", "--prompt", "Hi", "--max_gen_len", "4", "--checkpoint", smollm_path, *FLAGS)
    assert done.returncode == 0, done.stderr
    [want] = llm.chat_completion([[{"role": "user", "content": "Hi"}]], max_gen_len=4, temperature=0)
    assert done.stdout == want["generation"]["content"] + "\n"
    assert "loading" not in done.stderr, done.stderr


@pytest.mark.parametrize("setting, value, message", [
    ("quantize", "int9", "quantize must be 'int4', 'int8' or None, got 'int9'"),
    ("dtype", "float8", "unknown dtype 'float8'; use 'float32', 'bfloat16', 'float16' or None"),
    ("device", "tpu", "unknown device 'tpu'; use 'cpu', 'cuda' or 'cuda:N'"),
])
def test_api_choice_errors_quote_every_choice(tiny, setting, value, message):
    with pytest.raises(ValueError) as e:
        Llama.build(tiny, max_seq_len=64, max_batch_size=1, **{"device": "cpu", setting: value})
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("flag, value, message", [
    ("--quantize", "int9", "error: --quantize must be int4 or int8, or leave the flag out; got 'int9'"),
    ("--dtype", "float8", "error: unknown --dtype 'float8'; use float32, bfloat16 or float16, or leave the flag out"),
    ("--device", "tpu", "error: unknown --device 'tpu'; use cpu, cuda or cuda:N"),
    ("--dtype", "float16", "error: --quantize int4 runs on a CPU, with float32 or bfloat16 activations; pass --device cpu "
                           "and --dtype float32 or --dtype bfloat16 (or no --dtype), or no --quantize"),  # with --quantize int4
])
@pytest.mark.parametrize("command", ["chat.py", "complete.py"])
def test_cli_choice_errors_spell_choices_as_typed(tiny, command, flag, value, message):
    args = ["--prompt", "hi"] if command == "chat.py" else ["-"]
    others = [a for pair in zip(TINY_FLAGS[::2], TINY_FLAGS[1::2]) if pair[0] != flag for a in pair]
    if value == "float16":
        others += ["--quantize", "int4"]
    done = in_process(command, *args, "--checkpoint", tiny, flag, value, *others, stdin="hi\n")
    assert_fails(done, message)
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(message), line
    assert not re.search(r"'(int4|int8|float32|bfloat16|float16|cpu|cuda|cuda:N)'", line), line  # no value quoted
