"""Fuzzing in a fresh process each (tests/fuzz.py): mutated GGUF headers and metadata, mutated files
through Llama.build, and random text and ids through every tokenizer back-end. Only a result,
CheckpointError or ValueError may come out; no case may hang; memory stays bounded."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("mode, cases", [("gguf", 2000), ("build", 300), ("text", 1000)])
def test_fuzz(mode, cases):
    done = subprocess.run([sys.executable, "-m", "tests.fuzz", mode, str(cases)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    print(mode, counts)
    assert counts["cases"] >= cases and counts["refused"] > 0 and counts["accepted"] > 0
    assert counts["max_rss_mb"] < 1500  # no mutated size made it allocate without bound
