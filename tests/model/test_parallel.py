"""Model parallel under torchrun (fairscale layers, gloo on CPU): the same tokens and logits as one
process, every rank in step, each holding about 1/world of the weights."""

import json
import os
import subprocess
import sys

import pytest
import torch

from llama_lite import Llama
from llama_lite.model import parallel
from tests.conftest import ROOT
from tests.tiny_gguf import write_tiny_gguf

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:",
    "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
]


def torchrun(nproc, *args, stdin=None):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # three ranks share two cores
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def run_worker(nproc, checkpoint, tmp_path, prompts, max_gen_len=16, device="cpu"):
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    done = torchrun(nproc, "-m", "tests.model.parallel_worker", checkpoint, tmp_path / "prompts.json",
                    tmp_path / "out", max_gen_len, device)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in range(nproc)]


def alone(checkpoint, prompts, max_gen_len=16):
    llm = Llama.build(checkpoint, max_seq_len=256, max_batch_size=4, device="cpu", dtype="float32", seed=7)
    ids = [llm.tokenizer.encode(p, False, False) for p in prompts]
    with torch.inference_mode():
        first = llm.model(torch.tensor([ids[0]]), 0)[0, -1]
    greedy, _ = llm.generate(ids, max_gen_len, temperature=0)
    sampled, _ = llm.generate(ids, 8, temperature=0.9, top_p=0.95)
    return greedy, sampled, first, sum(p.numel() for p in llm.model.parameters())


def check(ranks, single, world, same_rng=True):
    greedy, sampled, first, params = single
    for r in ranks:
        assert r["world"] == world
        assert r["greedy"] == greedy  # batched, mixed lengths: token for token
        assert r["sampled"] == ranks[0]["sampled"]  # every rank drew the same tokens
        assert (torch.tensor(r["logits"]) - first).abs().max().item() <= 1e-4
        # Norms are replicated, everything else is split: about 1/world of the weights each.
        assert abs(r["params"] / params - 1 / world) < 0.01
    if same_rng:  # (a CUDA generator draws a different stream from the CPU one)
        assert ranks[0]["sampled"] == sampled  # same seed, same draws as one process


def test_three_ranks_on_smollm_equal_one_process(smollm_path, tmp_path):
    ranks = run_worker(3, smollm_path, tmp_path, PROMPTS)
    check(ranks, alone(smollm_path, PROMPTS), world=3)
    print("world 3 per rank: " + ", ".join(f"{r['seconds']:.1f}s {r['max_rss_mb']:.0f}MB" for r in ranks))


def test_two_ranks_on_a_tiny_model_equal_one_process(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", vocab_kind="llama", n_heads=4, n_kv_heads=2, hidden=96)
    prompts = ["The history of", "A", "Python is a programming language that"]
    check(run_worker(2, path, tmp_path, prompts), alone(path, prompts), world=2)


def test_meta_shards_load_per_rank(tmp_path):
    """Two consolidated.NN.pth shards and two ranks: each rank takes its own shard (the embedding,
    which Llama 2 cut by columns, is merged and re-cut by rows)."""
    from tests.loading.test_formats import HIDDEN, meta_folder

    path = write_tiny_gguf(tmp_path / "tiny.gguf", vocab_kind="llama", n_heads=4, n_kv_heads=2, hidden=HIDDEN)
    folder = meta_folder(Llama.build(path, max_seq_len=64, device="cpu", dtype="float32"), tmp_path / "meta", shards=2)
    prompts = ["The history of", "A", "Python is a programming language that"]
    check(run_worker(2, folder, tmp_path, prompts), alone(folder, prompts), world=2)


def test_complete_under_torchrun_prints_once(smollm_path):
    stdin = "The capital of France is\nHello\n"
    flags = ["--max_gen_len", "8", "--dtype", "float32", "--device", "cpu", "--checkpoint", smollm_path]
    split = torchrun(3, ROOT / "scripts" / "complete.py", "-", *flags, stdin=stdin)
    assert split.returncode == 0, split.stderr[-3000:]
    single = subprocess.run([sys.executable, str(ROOT / "scripts" / "complete.py"), "-", *map(str, flags)],
                            input=stdin, capture_output=True, text=True, timeout=300)
    assert split.stdout == single.stdout and len(split.stdout.splitlines()) == 2


def test_a_world_size_that_does_not_divide_the_model_is_refused_before_loading(smollm_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    loaded = []
    monkeypatch.setattr(parallel, "shard", lambda name, tensor: loaded.append(name))
    with pytest.raises(ValueError, match=r"2 processes cannot split this model .*\[1, 3\]"):
        Llama.build(smollm_path, device="cpu")
    assert loaded == []


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (nccl)")
def test_two_gpus_with_nccl_equal_one_process(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", vocab_kind="llama", n_heads=4, n_kv_heads=2, hidden=96)
    prompts = ["The history of", "A", "Python is a programming language that"]
    check(run_worker(2, path, tmp_path, prompts, device="cuda"), alone(path, prompts), world=2, same_rng=False)
