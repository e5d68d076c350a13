"""The checkpoint families people have, against transformers on the same random weights: Llama 3.x
(llama3 RoPE scaling), Qwen2/2.5 (q/k/v biases) and Mistral, each as a Hugging Face folder and as
a GGUF written the way llama.cpp's converter writes it (Q/K permuted for "llama", rotate-half rows
kept for "qwen2", Llama 3's scaling as rope_freqs.weight). Prompts run past the scaled RoPE's
original context, so scaling that is missing or wrong changes the logits."""

import copy
import functools
import json

import numpy as np
import pytest
import torch

from llama_lite import CheckpointError
from llama_lite.model.rope import RopeScaling, inverse_frequencies
from tests.conftest import build_cpu
from tests.tiny_gguf import byte_alphabet

transformers = pytest.importorskip("transformers")

ORIGINAL_CONTEXT = 32  # the scaled RoPE's training context: prompts run to twice that
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=ORIGINAL_CONTEXT)
MERGES = ["h e", "t he"]

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + "
    "' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

# name -> transformers class and config, GGUF architecture and pre-tokenizer, special tokens (the
# vocabulary starts with them), bos / eos / the checkpoint's declared stop tokens, chat template and
# the other special tokens it writes (which stop generation too: a reply that opens a turn has ended).
FAMILIES = {
    "llama3": dict(
        cls="LlamaForCausalLM", config=dict(rope_theta=10000.0, rope_scaling=LLAMA3_SCALING, rms_norm_eps=1e-5),
        arch="llama", pre="llama-bpe",
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        bos="<|begin_of_text|>", eos="<|eot_id|>", stops=["<|end_of_text|>", "<|eot_id|>"], template=LLAMA3_TEMPLATE,
        template_stops=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]),
    "qwen2": dict(
        cls="Qwen2ForCausalLM", config=dict(rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
        arch="qwen2", pre="qwen2",
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None, eos="<|im_end|>", stops=["<|im_end|>", "<|endoftext|>"], template=QWEN2_TEMPLATE,
        template_stops=["<|im_start|>"]),
    "mistral": dict(
        cls="MistralForCausalLM", config=dict(rope_theta=1000000.0, rms_norm_eps=1e-5, sliding_window=None),
        arch="llama", pre="gpt-2",
        specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        bos="<s>", eos="</s>", stops=["</s>"], template=MISTRAL_TEMPLATE, template_stops=["<s>", "[INST]", "[/INST]"]),
}


def vocabulary(family):
    return FAMILIES[family]["specials"] + byte_alphabet() + ["he", "the"]


def stop_ids(family):
    f = FAMILIES[family]
    return {vocabulary(family).index(t) for t in f["stops"] + f["template_stops"]}


def hf_model(family, seed=0, **overrides):
    """A tiny random model of the family; norms near one and every weight large enough to matter."""
    f = FAMILIES[family]
    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                 vocab_size=len(vocabulary(family)), max_position_embeddings=256)
    config = getattr(transformers, f["cls"].replace("ForCausalLM", "Config"))(
        **copy.deepcopy({**shape, **f["config"], **overrides}),
    )  # a copy: transformers writes rope_theta into the rope_scaling dict it is given
    torch.manual_seed(seed)
    model = getattr(transformers, f["cls"])(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    return model


def write_tokenizer_files(family, folder):
    """tokenizer.json, tokenizer_config.json (bos, eos, chat template) and generation_config.json
    (the stop tokens), as a Hugging Face repository of the family has them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    f, tokens = FAMILIES[family], vocabulary(family)
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split()) for m in MERGES]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in f["specials"]])
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token=f["bos"], eos_token=f["eos"], chat_template=f["template"])))
    (folder / "generation_config.json").write_text(json.dumps(dict(eos_token_id=[tokens.index(t) for t in f["stops"]])))


def save_hf(model, family, folder, **kwargs):
    model.save_pretrained(folder, **kwargs)
    write_tokenizer_files(family, folder)
    return folder


# Hugging Face block names -> GGUF's (llama.cpp's tensor map).
GGUF_BLOCK_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(weights, n_head):
    """llama.cpp's converter's LlamaModel.permute: HF's rotate-half rows back to interleaved pairs."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def llama_cpp_rope_factors(head_dim, theta, scaling):
    """rope_freqs.weight as llama.cpp's converter computes it for rope_type llama3."""
    import math

    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low_wavelen = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
    high_wavelen = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(scaling["factor"])
        else:
            smooth = (scaling["original_max_position_embeddings"] / wavelen - scaling["low_freq_factor"]) / (
                scaling["high_freq_factor"] - scaling["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(model, family, path, more=None):
    """`model` as llama.cpp's convert_hf_to_gguf.py would write it, with the family's vocabulary;
    `more(writer)` adds metadata."""
    import gguf

    f, c, tokens = FAMILIES[family], model.config, vocabulary(family)
    theta = c.rope_parameters["rope_theta"]
    w = gguf.GGUFWriter(str(path), f["arch"])
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(f["pre"])
    w.add_token_list(tokens)
    w.add_token_types([3] * len(f["specials"]) + [1] * (len(tokens) - len(f["specials"])))
    w.add_token_merges(MERGES)
    if f["bos"]:
        w.add_bos_token_id(tokens.index(f["bos"]))
    w.add_eos_token_id(tokens.index(f["eos"]))
    for stop in f["stops"]:
        if stop != f["eos"]:
            w.add_eot_token_id(tokens.index(stop))
    w.add_add_bos_token(False)
    w.add_chat_template(f["template"])
    head_dim = c.hidden_size // c.num_attention_heads
    if c.rope_parameters.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(head_dim, theta, c.rope_parameters))
    if c.rope_parameters.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_parameters["factor"])
    if more:
        more(w)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    for name, array in state.items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            _, _, block, rest = name.split(".", 3)
            part, kind = rest.rsplit(".", 1)
            if f["arch"] == "llama" and part in ("self_attn.q_proj", "self_attn.k_proj"):  # Qwen2 keeps HF's rows
                array = llama_cpp_permute(array, c.num_attention_heads if "q_proj" in part else c.num_key_value_heads)
            name = f"blk.{block}.{GGUF_BLOCK_NAMES[part]}.{kind}"
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[name]
        w.add_tensor(name, np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


build = functools.partial(build_cpu, max_seq_len=80, max_batch_size=2)  # max_seq_len may be overridden


def prompt(family, n=2 * ORIGINAL_CONTEXT, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(len(FAMILIES[family]["specials"]), len(vocabulary(family)), (1, n), generator=g)


def max_logit_difference(llm, model, tokens):
    with torch.inference_mode():
        return (llm.model(tokens, 0) - model(tokens).logits).abs().max().item()


def hf_greedy(model, ids, n, stops):
    """transformers' greedy continuation of `ids`, cut before the first stop token."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(ids):].tolist()
    return out[: next((i for i, t in enumerate(out) if t in stops), len(out))]


def check_family(llm, model, family):
    """Logits to 1e-4 on a prompt twice the original context, greedy tokens of two prompts of
    different lengths decoded together, and the checkpoint's stop tokens."""
    tokens = prompt(family)
    assert max_logit_difference(llm, model, tokens) < 1e-4
    prompts = [tokens[0].tolist(), prompt(family, n=40, seed=2)[0].tolist()]
    ours, _ = llm.generate(prompts, max_gen_len=12, temperature=0)
    assert ours == [hf_greedy(model, p, 12, llm.tokenizer.stop_ids) for p in prompts]
    assert llm.tokenizer.stop_ids == stop_ids(family)


# --- Hugging Face folders and GGUF files, per family ----------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_hf_folder_matches_transformers(tmp_path, family):
    model = hf_model(family)
    llm = build(save_hf(model, family, tmp_path))
    check_family(llm, model, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_matches_transformers(tmp_path, family):
    model = hf_model(family, seed=3)
    llm = build(write_gguf(model, family, tmp_path / f"{family}.gguf"))
    check_family(llm, model, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_matches_llama_cpp(tmp_path, family):
    """llama.cpp itself reads each GGUF the same way (rope_freqs.weight, qwen2's rotate-half rows and
    biases); its KV cache in float32, as float16 keys would differ by ~0.02."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = write_gguf(hf_model(family, seed=5), family, tmp_path / f"{family}.gguf")
    tokens = prompt(family)
    reference = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)
    reference.eval(tokens[0].tolist())
    with torch.inference_mode():
        ours = build(path).model(tokens, 0)[0]
    assert (ours - torch.from_numpy(np.array(reference.scores[: tokens.shape[1]]))).abs().max().item() < 1e-4


def test_sharded_qwen2_folder_matches_transformers(tmp_path):
    """Biases and un-permuted Q/K rows spread over several safetensors files."""
    model = hf_model("qwen2", seed=4, tie_word_embeddings=False)
    folder = save_hf(model, "qwen2", tmp_path, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2
    assert max_logit_difference(build(folder), model, prompt("qwen2")) < 1e-4


def test_int8_qwen2_keeps_its_biases_unquantized(tmp_path):
    from llama_lite.loading.meta_names import hf_to_meta_rows

    model = hf_model("qwen2")
    llm = build(save_hf(model, "qwen2", tmp_path), quantize="int8")
    ours, theirs = llm.model.layers[1].attention, model.model.layers[1].self_attn
    assert torch.equal(ours.wq.bias, hf_to_meta_rows(theirs.q_proj.bias.detach(), 4))
    assert torch.equal(ours.wv.bias, theirs.v_proj.bias.detach())
    assert (logits := llm.model(prompt("qwen2"), 0)).isfinite().all() and logits.shape == (1, 64, 261)


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_and_stop_tokens_come_from_the_checkpoint(tmp_path, family):
    """The chat prompt's tokens equal transformers' apply_chat_template of the same files, and the
    GGUF (same vocabulary) gives the same tokens and stop ids."""
    folder = save_hf(hf_model(family), family, tmp_path / "hf")
    gguf_llm = build(write_gguf(hf_model(family), family, tmp_path / "m.gguf"))
    dialog = [{"role": "user", "content": "the heat"}, {"role": "assistant", "content": "he"},
              {"role": "user", "content": "then?"}]
    reference = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
        dialog, add_generation_prompt=True, tokenize=True, return_dict=False)
    for llm in (build(folder), gguf_llm):
        assert llm.chat_prompt_tokens(dialog) == reference
        assert llm.tokenizer.stop_ids == stop_ids(family)


# --- RoPE scaling -------------------------------------------------------------------------------------

def test_rope_frequencies_equal_transformers_bit_for_bit():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for scaling, ours in [
        (LLAMA3_SCALING, RopeScaling("llama3", factor=8.0, original_context=ORIGINAL_CONTEXT)),
        ({**LLAMA3_SCALING, "factor": 32.0, "original_max_position_embeddings": 8192}, RopeScaling("llama3", factor=32.0)),
        (dict(rope_type="linear", factor=4.0), RopeScaling("linear", factor=4.0)),
    ]:
        config = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0,
                                          rope_scaling=dict(scaling))
        reference, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config)
        assert torch.equal(inverse_frequencies(64, 500000.0, ours), reference)
    wavelengths = 2 * torch.pi / inverse_frequencies(16, 10000.0)  # the test models: a frequency in each band
    assert (wavelengths < ORIGINAL_CONTEXT / 4).any() and (wavelengths > ORIGINAL_CONTEXT).any()
    assert ((wavelengths >= ORIGINAL_CONTEXT / 4) & (wavelengths <= ORIGINAL_CONTEXT)).any()


def test_linear_rope_scaling_matches_transformers(tmp_path):
    model = hf_model("llama3", rope_scaling=dict(rope_type="linear", factor=4.0))
    for path in (save_hf(model, "llama3", tmp_path), write_gguf(model, "llama3", tmp_path / "linear.gguf")):
        assert max_logit_difference(build(path), model, prompt("llama3")) < 1e-4


def test_meta_use_scaled_rope_is_llama3_scaling(tmp_path):
    from llama_lite.loading.checkpoint import read_checkpoint

    folder = tmp_path / "meta"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(dict(dim=64, n_layers=1, n_heads=4, use_scaled_rope=True)))
    torch.save({"output.weight": torch.zeros(8, 64)}, folder / "consolidated.00.pth")
    assert read_checkpoint(folder).args["rope_scaling"] == RopeScaling("llama3", factor=8.0, high_freq_factor=4.0,
                                                                       low_freq_factor=1.0, original_context=8192)


# --- still refused, each with one line -----------------------------------------------------------------

def test_narrow_sliding_window_is_refused_wide_one_accepted(tmp_path):
    model = hf_model("mistral", sliding_window=4096)
    folder = save_hf(model, "mistral", tmp_path)
    assert max_logit_difference(build(folder), model, prompt("mistral")) < 1e-4  # wider than max_seq_len: no effect
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "sliding_window": 32}))
    with pytest.raises(ValueError, match=r"sliding window of 32 positions.*build with max_seq_len <= 32"):
        build(folder)
    assert build(folder, max_seq_len=32).model.params.sliding_window == 32


def test_other_families_and_variants_are_refused(tmp_path):
    folder = save_hf(hf_model("qwen2"), "qwen2", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    for change, message in [
        (dict(model_type="gemma"), "model_type 'gemma' is not supported; llama_lite runs 'llama', 'mistral', 'qwen2'"),
        (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e6)), "RoPE scaling 'yarn' is not supported"),
        (dict(rope_parameters=dict(rope_type="llama3", factor=8.0, rope_theta=1e6)), "rope_scaling: low_freq_factor"),
    ]:
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=message) as info:
            build(folder)
        assert "\n" not in str(info.value)
    import gguf

    yarn = write_gguf(hf_model("llama3"), "llama3", tmp_path / "yarn.gguf",
                      more=lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN))
    with pytest.raises(CheckpointError, match="RoPE scaling 'yarn' is not supported"):
        build(yarn)
