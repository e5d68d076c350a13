"""Threads beyond the cores: torch's threads wait for each other after every operation, so asking for
more than the process may use slows every step; the build says so once, with both numbers and the fix."""

import pytest
import torch

from llama_lite import Llama
from llama_lite.model.devices import usable_cores
from tests.tiny_gguf import write_tiny_gguf


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _build(path, threads):
    return Llama.build(path, device="cpu", dtype="float32", max_seq_len=64, max_batch_size=1, threads=threads)


def test_threads_beyond_the_usable_cores_warn_once(tmp_path, capsys, restore_threads):
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    cores = usable_cores()
    llm = _build(tiny, cores + 3)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("llama_lite:") and "thread" in line]
    assert len(lines) == 1, err
    assert f"{cores + 3} threads" in lines[0] and f"{cores} core" in lines[0], lines[0]
    assert "--threads" in lines[0] and f"threads={cores}" in lines[0], lines[0]  # the fix, in both spellings
    assert llm.threads == cores + 3  # a warning, not a refusal: the user may know better
    llm.text_completion(["he the"], max_gen_len=3, temperature=0)
    assert "thread" not in capsys.readouterr().err  # said once, at the build, not per request


def test_threads_within_the_usable_cores_say_nothing(tmp_path, capsys, restore_threads):
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    _build(tiny, usable_cores())
    _build(tiny, None)
    assert "thread" not in capsys.readouterr().err
