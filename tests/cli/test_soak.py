"""Long runs keep flat memory: complete.py on 1,000 prompts and a 200-turn piped chat (a tiny model,
so the runs take seconds; what could leak is the loop around the model, not the model)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.slow


def rss_samples(command, stdin_text):
    """Run `command`, feeding stdin, and sample its resident memory (MB) every 20 ms."""
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc.stdin.write(stdin_text)
    proc.stdin.close()
    samples = []
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            samples.append(int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024)
        except (OSError, StopIteration):
            pass
        time.sleep(0.02)
    assert proc.wait() == 0, proc.stderr.read()[-2000:]
    return samples


def assert_flat(samples, label):
    """The second half of the run may not use more memory than the first (which includes start-up,
    loading and warming the allocator): a leak per prompt or turn would show there."""
    assert len(samples) > 20, f"{label}: the run was too short to measure"
    first = max(samples[: len(samples) // 2])
    second = max(samples[len(samples) // 2 :])
    print(f"{label}: {len(samples)} samples, first-half peak {first:.0f} MB, second-half peak {second:.0f} MB")
    assert second - first < 10, f"{label}: memory grew from {first:.0f} MB to {second:.0f} MB"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("soak") / "tiny.gguf")


def test_complete_1000_prompts_flat_memory(tiny, tmp_path):
    prompts = "".join(f"prompt number {n} about something\n" for n in range(1000))
    command = [sys.executable, str(ROOT / "scripts" / "complete.py"), "-", "--out", str(tmp_path / "out.jsonl"),
               "--checkpoint", str(tiny), "--max_gen_len", "16", "--max_seq_len", "128", "--dtype", "float32",
               "--device", "cpu", "--temperature", "0.8", "--seed", "1"]
    assert_flat(rss_samples(command, prompts), "complete.py x1000")
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 1000


def test_200_turn_chat_flat_memory(tiny):
    turns = "".join(f"turn {n}: tell me more\n" + ("/reset\n" if n % 97 == 96 else "") for n in range(200))
    command = [sys.executable, str(ROOT / "scripts" / "chat.py"), "--checkpoint", str(tiny), "--max_gen_len", "24",
               "--max_seq_len", "256", "--dtype", "float32", "--device", "cpu", "--seed", "1"]
    assert_flat(rss_samples(command, turns), "chat.py x200 turns")
