"""complete --ray: a job on Ray Data writes plain complete's file byte for byte (greedy and seeded,
float32), a killed worker is replaced and its rows rerun (every id once), a stopped job resumes from
OUT.partial, a row that cannot run gets its error in its own line, and BatchCompleter works as any
map_batches class (columns passed through)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama_lite.cli.complete_command import complete
from llama_lite.cli.prompt_files import FileResults, read_prompts
from llama_lite.cluster import BatchCompleter
from llama_lite.cluster.job import run_job
from tests.conftest import ROOT, build_cpu

MODEL = {"dtype": "float32", "device": "cpu", "max_gen_len": 12, "max_batch_size": 4}


def plain(prompts, out, **flags):
    complete(prompts, out=str(out), **{**MODEL, **flags})
    return Path(out).read_bytes()


def ids_of(data: bytes) -> list:
    return [json.loads(line)["id"] for line in data.decode().splitlines()]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 7}], ids=["greedy", "seeded"])
def test_a_job_writes_plain_completes_file(ray_cluster, tiny, prompts, tmp_path, sampling):
    want = plain(prompts, tmp_path / "plain.jsonl", checkpoint=tiny, **sampling)
    complete(prompts, out=str(tmp_path / "ray.jsonl"), checkpoint=tiny, ray="local", workers=2, threads=2, **MODEL, **sampling)
    got = (tmp_path / "ray.jsonl").read_bytes()
    assert ids_of(want) == [f"q{i}" for i in range(96)]
    assert got == want


def test_a_killed_worker_is_replaced_and_every_id_is_written_once(ray_cluster, tiny, prompts, tmp_path):
    want = plain(prompts, tmp_path / "plain.jsonl", checkpoint=tiny, temperature=0.8, seed=3)
    marker = str(tmp_path / "killed")

    class DiesOnce(BatchCompleter):
        """Its first batch past row 40 kills its own process (SIGKILL), once in the whole job."""

        def __call__(self, batch):
            if max(batch["index"]) >= 40:
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
                    os.kill(os.getpid(), signal.SIGKILL)
                except FileExistsError:
                    pass
            return super().__call__(batch)

    records = read_prompts(prompts)
    results = FileResults(tmp_path / "ray.jsonl", prompts)
    run_job(records, 0, results, "local", 2, 2, 4, 12, {"temperature": 0.8}, 3, False,
            {"checkpoint": tiny, "dtype": "float32", "device": "cpu", "seed": 3, "max_seq_len": None}, completer=DiesOnce)
    results.finish()
    assert os.path.exists(marker)  # a worker did die mid-job
    got = (tmp_path / "ray.jsonl").read_bytes()
    assert sorted(ids_of(got)) == sorted(set(ids_of(got))) and len(ids_of(got)) == 96
    assert got == want


def test_a_stopped_job_resumes_from_its_partial_file(ray_cluster, tiny, prompts, tmp_path):
    """SIGTERM of the driver leaves OUT.partial, a prefix of the file; the same command then ends it
    (here in this process, on the session's cluster)."""
    flags = ["--dtype", "float32", "--device", "cpu", "--max_gen_len", "120", "--max_batch_size", "4",
             "--temperature", "0.8", "--seed", "5", "--checkpoint", tiny]
    out = tmp_path / "ray.jsonl"
    partial = tmp_path / "ray.jsonl.partial"
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "complete.py"), prompts, "--out", str(out),
                             "--ray", "local", "--workers", "2", *flags], stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (partial.exists() and partial.read_bytes().count(b"\n") >= 2):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    kept = partial.read_bytes()
    assert not out.exists() and 2 <= kept.count(b"\n") < 96
    want = plain(prompts, tmp_path / "plain.jsonl", checkpoint=tiny, temperature=0.8, seed=5, max_gen_len=120)
    assert want.startswith(kept)
    complete(prompts, out=str(out), checkpoint=tiny, ray="local", workers=2, threads=2, temperature=0.8, seed=5,
             **{**MODEL, "max_gen_len": 120})
    assert out.read_bytes() == want


def test_map_batches_passes_columns_through_and_a_bad_row_gets_its_error(ray_cluster, tiny):
    import ray.data

    rows = [{"id": f"r{i}", "index": i, "prompt": "the he " * (1 + i)} for i in range(6)] + \
           [{"id": "long", "index": 6, "prompt": "x" * 400}]
    done = ray.data.from_items(rows).map_batches(
        BatchCompleter, compute=ray.data.ActorPoolStrategy(size=1), batch_size=4, num_cpus=1,
        fn_constructor_kwargs={"checkpoint": tiny, "dtype": "float32", "device": "cpu", "max_seq_len": None, "threads": 1,
                               "max_gen_len": 8, "seed": 1, "sampling": {"temperature": 0.8}}).take_all()
    by_id = {row["id"]: row for row in done}
    assert sorted(by_id) == sorted(r["id"] for r in rows)
    llm = build_cpu(tiny, max_seq_len=None)
    for i in range(6):
        row = by_id[f"r{i}"]
        ids = llm.tokenizer.encode(rows[i]["prompt"], bos=llm.tokenizer.add_bos, eos=False)
        alone = dict(llm.as_completed([ids], 8, temperature=0.8, seed=1 + i))[0]
        assert (row["generation"], list(row["tokens"]), row["finish_reason"], row["error"]) == \
            (alone["text"], alone["tokens"], alone["finish_reason"], "")
    bad = by_id["long"]
    assert bad["finish_reason"] == "error" and bad["generation"] == "" and "exceeds --max_seq_len" in bad["error"]


def test_flags_that_cannot_run_are_one_error_each(monkeypatch, prompts):
    with pytest.raises(ValueError, match="--workers needs --ray"):
        complete(prompts, workers=2)
    with pytest.raises(ValueError, match="--ray takes local, auto"):
        complete(prompts, ray="")
    with pytest.raises(ValueError, match="--workers must be"):
        complete(prompts, ray="local", workers=0)
    with pytest.raises(ValueError, match="--ray needs a number for --max_gen_len"):
        complete(prompts, ray="local", max_gen_len=None)
    monkeypatch.setitem(sys.modules, "ray.data", None)  # as if the extra were not installed
    with pytest.raises(ValueError, match=r'pip install -e "\.\[ray\]"'):
        complete(prompts, ray="local")
