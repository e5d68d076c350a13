"""Threads: torch's threads wait for each other after every operation, so asking for more than the
process may use slows every step (the build says so once, with both numbers and the fix), and so
does a thread on a core that niced work shares (fewer are taken, and given back); no count changes a bit."""

import subprocess
import sys
import time

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


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_the_thread_count_changes_no_bit(smollm_path, restore_threads, quantize):
    """A process picks its threads by what else runs, and gives back those it lowered between requests:
    the logprobs of a greedy reply (float32 bit for bit; int4 on its eager step, the compiled one's
    numbers) are the same with one thread and two."""
    llm = Llama.build(smollm_path, device="cpu", max_seq_len=128, max_batch_size=2, quantize=quantize, compile=False,
                      dtype="float32" if quantize is None else None, threads=1)
    prompts = ["The history of the city of Rome begins", "def is_prime(n):"]
    runs = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        runs.append([(c["tokens"], c["logprobs"]) for c in llm.text_completion(prompts, max_gen_len=24, temperature=0,
                                                                              logprobs=True)])
    assert runs[0] == runs[1] == runs[2]


def test_threads_lowered_for_niced_work_come_back_when_it_ends(tmp_path, restore_threads):
    """Beside a niced process (as a background compile) a build computes on the other cores: every
    operation of a thread sharing its core would wait for it. Between requests, once it has gone for a
    second, the threads come back."""
    cores = usable_cores()
    if cores < 2:
        pytest.skip("one core: nothing to lower")
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    hog = subprocess.Popen([sys.executable, "-c", "import os; os.nice(19)\nwhile True: pass"])
    try:
        time.sleep(0.5)  # running
        llm = _build(tiny, None)
        beside = torch.get_num_threads()
    finally:
        hog.kill()
        hog.wait()
    assert beside < cores and llm.model.threads_later is not None
    llm.text_completion(["he the"], max_gen_len=2, temperature=0)  # within the second: not yet
    time.sleep(1.2)
    llm.text_completion(["he the"], max_gen_len=2, temperature=0)
    assert torch.get_num_threads() > beside and llm.model.threads_later is None
