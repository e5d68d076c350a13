"""Checkpoint formats against transformers on the same weights: Hugging Face folders (one file,
sharded, tied or not), Meta folders (one shard or two), and every common GGUF tensor type."""

import functools
import json
import shutil

import pytest
import torch

from llama_lite import CheckpointError
from llama_lite.loading.meta_folder import meta_hidden_dim
from tests.conftest import build_cpu
from tests.tiny_gguf import SHIPPED_SP_MODEL, write_tiny_gguf

transformers = pytest.importorskip("transformers")

TOKENS = torch.tensor([[1, 5, 900, 42, 7, 3000, 12, 4095], [1, 77, 78, 79, 80, 81, 82, 83]])
# Meta's SwiGLU width for dim 64 with multiple_of 16 and ffn_dim_multiplier 1.3: int(1.3 * 170) -> 224
META = dict(dim=64, multiple_of=16, ffn_dim_multiplier=1.3)
HIDDEN = meta_hidden_dim(**META)


def close(ours, ref, tol=1e-4):
    return (ours - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())


def hf_model(tie=False, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=HIDDEN,
        vocab_size=4096, rms_norm_eps=1e-5, rope_theta=5000.0, max_position_embeddings=256, tie_word_embeddings=tie,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms start at ones and projections are tiny: make all count
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return model


def save_hf(model, folder, **kwargs):
    model.save_pretrained(folder, **kwargs)
    shutil.copy(SHIPPED_SP_MODEL, folder / "tokenizer.model")
    return folder


def logits(llm, tokens=TOKENS):
    with torch.inference_mode():
        return llm.model(tokens, 0)


def reference(model, tokens=TOKENS):
    with torch.inference_mode():
        return model(tokens).logits


build = functools.partial(build_cpu, max_seq_len=64, max_batch_size=2)


# --- Hugging Face folders ---------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True])
def test_hf_folder_matches_transformers(tmp_path, tie):
    """Also proves the Q/K permutation from HF's rotate-half layout back to Meta's pairs."""
    model = hf_model(tie=tie)
    llm = build(save_hf(model, tmp_path))
    assert close(logits(llm), reference(model))
    assert (llm.model.output.weight.data_ptr() == llm.model.tok_embeddings.weight.data_ptr()) == tie
    assert llm.model.params.rope_theta == 5000.0 and abs(llm.model.params.norm_eps - 1e-5) < 1e-12


def test_sharded_hf_folder_matches_transformers(tmp_path):
    model = hf_model(seed=1)
    folder = save_hf(model, tmp_path, max_shard_size="300KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2
    assert close(logits(build(folder)), reference(model))


def test_hf_folder_in_bfloat16_loads(tmp_path):
    folder = save_hf(hf_model(seed=2).to(torch.bfloat16), tmp_path)
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert close(logits(build(folder)), reference(model))  # bf16 weights, fp32 compute on both sides


def test_hf_rope_scaling_of_other_kinds_is_refused(tmp_path):
    folder = save_hf(hf_model(), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500000.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="RoPE scaling 'yarn' is not supported"):
        build(folder)


# --- Meta folders -------------------------------------------------------------------------------------

def meta_folder(llm, folder, shards=1):
    """A Meta checkpoint of `llm`'s weights, split like Meta's model-parallel save when shards > 1:
    column-parallel weights by rows, row-parallel ones and Llama 2's embedding by columns."""
    folder.mkdir()
    p = llm.model.params
    (folder / "params.json").write_text(json.dumps(dict(
        dim=p.dim, n_layers=p.n_layers, n_heads=p.n_heads, n_kv_heads=p.n_kv_heads, vocab_size=-1,
        multiple_of=META["multiple_of"], ffn_dim_multiplier=META["ffn_dim_multiplier"], norm_eps=p.norm_eps,
        rope_theta=p.rope_theta,
    )))
    state = {k: v.clone() for k, v in llm.model.state_dict().items()}
    state["rope.freqs"] = torch.ones(p.dim // p.n_heads // 2)  # Meta's files carry it; it is ignored
    for rank in range(shards):
        part = {}
        for name, tensor in state.items():
            kind = name.split(".")[-2]
            dim = 0 if kind in ("wq", "wk", "wv", "w1", "w3", "output") else 1 if kind in ("wo", "w2", "tok_embeddings") else None
            part[name] = tensor if dim is None else tensor.chunk(shards, dim=dim)[rank].clone()
        torch.save(part, folder / f"consolidated.{rank:02d}.pth")
    shutil.copy(SHIPPED_SP_MODEL, folder / "tokenizer.model")
    return folder


def test_meta_folder_matches_transformers(tmp_path):
    model = hf_model(seed=3)
    from_hf = build(save_hf(model, tmp_path / "hf"))
    meta = build(meta_folder(from_hf, tmp_path / "meta"))
    assert meta.model.params.hidden_dim == HIDDEN == 224
    assert close(logits(meta), reference(model))
    assert meta.tokenizer.bos_id == 1 and meta.tokenizer.add_bos


def test_two_meta_shards_equal_one(tmp_path):
    from_hf = build(save_hf(hf_model(seed=4), tmp_path / "hf"))
    one = build(meta_folder(from_hf, tmp_path / "one"))
    two = build(meta_folder(from_hf, tmp_path / "two", shards=2))
    assert len(list((tmp_path / "two").glob("consolidated.*.pth"))) == 2
    assert torch.equal(logits(one), logits(two))


def test_pth_with_pickled_code_is_refused(tmp_path):
    import os

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    folder = meta_folder(build(save_hf(hf_model(), tmp_path / "hf")), tmp_path / "meta")
    torch.save({"output.weight": torch.zeros(4096, 64), "evil": Exploit()}, folder / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="not a readable weights-only checkpoint"):
        build(folder)
    assert not (tmp_path / "pwned").exists()


# --- GGUF tensor types --------------------------------------------------------------------------------

GGUF_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("weight_type", GGUF_TYPES)
def test_gguf_tensor_types_match_transformers(tmp_path, weight_type):
    """gguf-py quantizes the legacy types itself; the k-quants (which it cannot write) are random
    valid blocks. transformers dequantizes with its own code: the logits must agree."""
    path = write_tiny_gguf(tmp_path / f"{weight_type}.gguf", dim=256, hidden=512, weight_type=weight_type)
    ours = logits(build(path), TOKENS % 261)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    assert close(ours, reference(model.eval(), TOKENS % 261))


def test_gguf_with_mixed_types_matches_transformers(tmp_path):
    import gguf

    mix = ["Q8_0", "Q4_1", "F16", "Q6_K", "Q4_K", "F32", "Q5_0"]
    path = write_tiny_gguf(tmp_path / "mixed.gguf", dim=256, hidden=512, weight_type=mix)
    assert {t.tensor_type.name for t in gguf.GGUFReader(path).tensors} == set(mix)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    assert close(logits(build(path), TOKENS % 261), reference(model.eval(), TOKENS % 261))


def test_unsupported_gguf_type_names_tensor_and_type(tmp_path, monkeypatch):
    import gguf.quants

    path = write_tiny_gguf(tmp_path / "q.gguf", weight_type="Q5_0")  # a type only gguf-py unpacks

    def cannot(data, qtype):
        raise NotImplementedError(qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", cannot)
    with pytest.raises(CheckpointError, match=r"tensor token_embd.weight has type Q5_0"):
        build(path)


# --- detection errors ---------------------------------------------------------------------------------

def test_detection_errors_name_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither params.json .* nor config.json"):
        build(tmp_path / "empty")
    only_params = tmp_path / "meta"
    only_params.mkdir()
    (only_params / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4}))
    with pytest.raises(CheckpointError, match="no consolidated.*pth weights"):
        build(only_params)
    hf = save_hf(hf_model(), tmp_path / "hf")
    with pytest.raises(CheckpointError, match="one file of a checkpoint folder"):
        build(hf / "model.safetensors")
    whole = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError) as info:
        build(hf)
    assert "model.safetensors" in str(info.value) and "\n" not in str(info.value)
    (hf / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        build(hf)


def test_shape_that_disagrees_with_the_config(tmp_path):
    folder = save_hf(hf_model(), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 256
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="tensors do not match its metadata.*feed_forward"):
        build(folder)
