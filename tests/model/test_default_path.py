"""The default path: measured once per machine and model shape, remembered, reported; the compiled
step built by another process and loaded without the compiler; the same greedy text in a process that
starts cold (the same numbers eagerly while the child builds), one that loads the built step, and across the switch."""

import json
import os
import subprocess
import sys

import pytest
import torch

from llama_lite import Llama, path_choice
from llama_lite.model.kernels import Int4Linear
from tests.conftest import ROOT
from tests.tiny_gguf import write_tiny_gguf

PROMPTS = ["The history of the city of Rome begins", "def is_prime(n):"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache of its own (no choice or compiled step yet), the default model still where it is."""
    monkeypatch.setenv("LLAMA_LITE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_choice_is_measured_once_and_said(smollm_path, cache, capsys):
    llm = Llama.build(smollm_path, max_seq_len=128, max_batch_size=2, device="cpu", compile=False)
    files = list((cache / "paths").glob("*.json"))
    assert len(files) == 1 and llm.path.measured and llm.path.path in ("int4", "float32")
    assert f"llama_lite: {llm.path.path} is this machine's path: its layer products" in capsys.readouterr().err
    stored = json.loads(files[0].read_text())
    assert stored["path"] == llm.path.path and stored["figures"]["float32 products, 1 row(s)"] > 0
    again = Llama.build(smollm_path, max_seq_len=64, max_batch_size=1, device="cpu", compile=False)
    assert again.path == llm.path and "is this machine's path" not in capsys.readouterr().err  # read, not measured


@pytest.mark.parametrize("path", ["int4", "float32"])
def test_the_stored_choice_decides_the_weights(smollm_path, cache, path):
    """What the choice file says is what loads: int4 layers (float32 activations, bfloat16 into the kernel), or float32 with
    the thin product (eager, bit for bit: no compiled step is started for it)."""
    probe = Llama.build(smollm_path, max_seq_len=64, max_batch_size=1, device="cpu", compile=False)
    file = next((cache / "paths").glob("*.json"))
    path_choice.write(file, path_choice.PathChoice(path, "set by the test", {"x": 1.0}, verified=True))
    llm = Llama.build(smollm_path, max_seq_len=64, max_batch_size=1, device="cpu")
    assert llm.path.why == "set by the test"
    if path == "int4":
        assert isinstance(llm.model.layers[0].attention.wqkv, Int4Linear)
        if llm.compiling is not None:  # the step it started building: not this test's (minutes beside the rest of the suite)
            llm.compiling.kill()
    else:
        assert llm.model.norm.weight.dtype == torch.float32 and llm.model.thin_decode
        assert llm.model.decode_step is None and llm.model.compiled_later is None
    del probe


def test_what_is_asked_for_is_not_measured(smollm_path, cache):
    llm = Llama.build(smollm_path, max_seq_len=64, max_batch_size=1, device="cpu", dtype="float32")
    assert (llm.path.path, llm.path.why) == ("float32", "asked for (dtype='float32')")
    assert not (cache / "paths").exists()


COLD_THEN_WARM = """
import json, sys, torch
from llama_lite import Llama
llm = Llama.build(sys.argv[1], max_seq_len=128, max_batch_size=2, device="cpu", quantize="int4", seed=0,
                  threads=2)  # the artifact is keyed by threads: the default (idle cores) can differ between the runs
cold, threads = type(llm.model.decode_step).__name__, [torch.get_num_threads()]
texts = [c["generation"] for c in llm.text_completion(sys.argv[2:], max_gen_len=12, temperature=0)]
if llm.compiling is not None:
    llm.compiling.wait()  # built: the next request (nothing running) switches to it
    texts2 = [c["generation"] for c in llm.text_completion(sys.argv[2:], max_gen_len=12, temperature=0)]
    assert texts2 == texts, (texts, texts2)
threads.append(torch.get_num_threads())
print(json.dumps({"cold": cold, "now": type(llm.model.decode_step).__name__, "texts": texts, "threads": threads,
                  "compiler": any(m in sys.modules for m in ("torch._dynamo", "torch._inductor")),
                  "compiling": llm.compiling is not None}))
"""


def test_a_cold_start_builds_in_another_process_and_the_text_stays(tmp_path, cache):
    """A first start decodes eagerly and leaves the compile to a child (on the cores the child leaves:
    beside it, every operation of threads sharing its cores waits for them); a later request in the same
    process, and a fresh process, run the built step without importing the compiler: same text."""
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", weight_type="Q4_1")
    prompts = ["the he", "hello there"]

    def run():
        done = subprocess.run([sys.executable, "-c", COLD_THEN_WARM, str(tiny), *prompts], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, "LLAMA_LITE_CACHE": str(cache)}, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.splitlines()[-1]), done.stderr

    first, err = run()
    logs = "".join(f.read_text()[-1500:] for f in (cache / "compiled").glob("*.log"))
    assert first["cold"] == "EagerStep" and first["compiling"] and first["now"] == "AotStep", logs
    assert "compiling the decode step in another process" in err
    assert first["threads"] == [1, 2]  # one core left to the child's two processes while it built, then both
    second, err = run()
    assert second == {**first, "cold": "AotStep", "compiling": False, "compiler": False, "threads": [2, 2]}, err
    assert first["compiler"] is False  # the parent never imported it, even while its child compiled


    # the compile process's check of a measured choice: the whole compiled step timed against float32's
    from llama_lite import precompile
    from llama_lite.settings import BuildSettings

    settings = BuildSettings(checkpoint=str(tiny), max_seq_len=128, max_batch_size=2, device="cpu", quantize="int4",
                             compile=False)
    model = Llama.build(**{f: getattr(settings, f) for f in ("checkpoint", "max_seq_len", "max_batch_size", "device",
                                                              "quantize", "compile")}).model
    folder = next((cache / "compiled").glob("*/graphs.json")).parent
    checked = precompile.verify(path_choice.PathChoice("int4", "its products", {"int4 products, 1 row(s)": 1.0}), model,
                                folder, settings)
    assert checked.verified and checked.path in ("int4", "float32") and checked.figures["int4 products, 1 row(s)"] == 1.0
    assert checked.figures["int4 compiled step, 1 row(s)"] > 0 and checked.figures["float32 eager step, 2 row(s)"] > 0
    assert checked.why.startswith(f"its compiled step {'beat' if checked.path == 'int4' else 'lost to'} float32's eager one")


def test_a_killed_builds_leftovers_are_swept_and_a_live_ones_kept(tmp_path):
    """A build killed outright (kill -9, a power cut) leaves FOLDER.PID.partial; the next build of that
    folder removes it, but never a partial folder whose process still runs (a build at work beside it)."""
    from llama_lite.model.aot_build import sweep_dead_builds

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folder = tmp_path / "0123abcd"
    dead, alive, other = (tmp_path / f"0123abcd.{gone.pid}.partial", tmp_path / f"0123abcd.{os.getpid()}.partial",
                          tmp_path / f"99ffee.{gone.pid}.partial")
    for partial in (dead, alive, other):
        (partial / "sub").mkdir(parents=True)
        (partial / "sub" / "graph.pt2").write_bytes(b"half")
    sweep_dead_builds(folder)
    assert not dead.exists() and alive.is_dir() and other.is_dir()  # another folder's leftovers are its own build's to sweep
