"""The Transformer against transformers' LlamaForCausalLM on the same GGUF weights, and its KV cache
against the cache-free full-sequence forward."""

import pytest
import torch

from llama_lite import ModelArgs, Transformer

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n<|im_start|>assistant\n",
    "Quantum entanglement is a phenomenon in which the quantum states of two or more objects "
    "are linked, so that measuring one of them instantly tells you about the others.",
]


@torch.inference_mode()
def test_logits_match_transformers(llm, hf_model):
    """Proves the GGUF Q/K layout and RoPE convention: transformers un-permutes Q/K to its
    rotate-half layout, llama_lite keeps GGUF's interleaved one; the logits must agree."""
    worst = 0.0
    for text in PROMPTS:
        ids = llm.tokenizer.encode(text, bos=False, eos=False)
        ours = llm.model(torch.tensor([ids]), 0)
        ref = hf_model(torch.tensor([ids])).logits
        assert ours.shape == ref.shape == (1, len(ids), 49152)
        assert ours.dtype == torch.float32
        worst = max(worst, (ours - ref).abs().max().item())
    print(f"max abs logit difference vs transformers: {worst:.2e}")
    assert worst <= 1e-4


@torch.inference_mode()
def test_batched_forward_matches_transformers(llm, hf_model):
    ids = [llm.tokenizer.encode(t, bos=False, eos=False)[:5] for t in PROMPTS]
    batch = torch.tensor(ids)
    assert (llm.model(batch, 0) - hf_model(batch).logits).abs().max().item() <= 1e-4


@torch.inference_mode()
def test_kv_cache_decode_matches_full_forward(llm):
    ids = llm.tokenizer.encode(PROMPTS[3], bos=False, eos=False)
    full = llm.model(torch.tensor([ids]), 0)
    split = 7
    steps = [llm.model(torch.tensor([ids[:split]]), 0)]
    for pos in range(split, len(ids)):
        steps.append(llm.model(torch.tensor([ids[pos : pos + 1]]), pos))
    cached = torch.cat(steps, dim=1)
    assert (cached - full).abs().max().item() <= 1e-4
    assert torch.equal(cached.argmax(-1), full.argmax(-1))


def tiny_model(**overrides):
    torch.manual_seed(0)
    args = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=101, hidden_dim=96, max_seq_len=32, max_batch_size=3)
    model = Transformer(ModelArgs(**{**args, **overrides}))
    for p in model.parameters():  # ones are a poor test of norms; give them random scales
        torch.nn.init.normal_(p, 0, 0.2)
    return model.eval()


@torch.inference_mode()
def test_tiny_kv_cache_chunks_match_full_forward():
    model = tiny_model()
    tokens = torch.randint(0, 101, (3, 20))
    full = model(tokens, 0)
    chunks = [model(tokens[:, :5], 0), model(tokens[:, 5:6], 5), model(tokens[:, 6:13], 6)]
    chunks += [model(tokens[:, p : p + 1], p) for p in range(13, 20)]
    assert (torch.cat(chunks, 1) - full).abs().max().item() < 1e-5
    last = model(tokens[:, :9], 0, last_only=True)
    assert last.shape == (3, 1, 101)
    assert (last[:, 0] - full[:, 8]).abs().max().item() < 1e-5


@torch.inference_mode()
def test_rows_do_not_interact():
    model = tiny_model()
    tokens = torch.randint(0, 101, (3, 10))
    together = model(tokens, 0)
    alone = model(tokens[1:2], 0)
    assert (together[1:2] - alone).abs().max().item() < 1e-5


def test_forward_beyond_the_cache_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        model(torch.zeros(1, 33, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        model(torch.zeros(4, 1, dtype=torch.long), 0)


def test_gqa_grouping_matches_repeated_heads():
    """Query head h must read kv head h // n_rep (transformers' and Meta's repeat_kv): a model with
    n_kv_heads=2 equals one with 8 kv heads whose K/V rows repeat each kv head 4 times."""
    gqa = tiny_model()
    mha = tiny_model(n_kv_heads=8)
    state = gqa.state_dict()
    head_dim = 8
    for i in range(2):
        for name in ("wk", "wv"):
            w = state[f"layers.{i}.attention.{name}.weight"].view(2, head_dim, 64)  # (n_kv_heads, head_dim, dim)
            state[f"layers.{i}.attention.{name}.weight"] = w.repeat_interleave(4, dim=0).reshape(64, 64)
    mha.load_state_dict(state)
    tokens = torch.randint(0, 101, (2, 12))
    with torch.inference_mode():
        assert (gqa(tokens, 0) - mha(tokens, 0)).abs().max().item() < 1e-5


@torch.inference_mode()
@pytest.mark.parametrize("seqlen", [1, 3])
def test_sequences_in_any_rows_at_their_own_positions_equal_each_alone(seqlen):
    """forward_segments (the engine's call): sequences prefilled into scattered cache rows, then fed
    together each at its own position, give bit for bit what each gets alone through forward()."""
    model = tiny_model(max_batch_size=6)
    tokens = torch.randint(0, 101, (3, 20))
    rows, starts = [4, 0, 2], [4, 11, 7]
    for row, start, seq in zip(rows, starts, tokens):
        model.forward_segments(seq[:start], [(row, 0, start)], torch.tensor([start - 1]))
    step = torch.cat([seq[start : start + seqlen] for seq, start in zip(tokens, starts)])  # (3 * seqlen,)
    together = model.forward_segments(step, [(r, s, seqlen) for r, s in zip(rows, starts)], torch.arange(3 * seqlen))
    for i, (start, seq) in enumerate(zip(starts, tokens)):
        alone = model(seq[None, : start + seqlen], 0)[0, start:]  # (seqlen, vocab)
        assert torch.equal(together[i * seqlen : (i + 1) * seqlen], alone)


def test_rows_past_the_cache_are_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        model.forward_segments(torch.zeros(2, dtype=torch.long), [(3, 0, 1), (0, 0, 1)], torch.arange(2))
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        model.forward_segments(torch.zeros(2, dtype=torch.long), [(0, 3, 1), (1, 32, 1)], torch.arange(2))


def test_kv_cache_memory_is_zero_private_and_resident_only_where_written():
    """The cache's CPU tensors read as zeros, hold what is written, and take no memory before that
    (a 100 MB cache read whole stays out of the resident set)."""
    import os

    from llama_lite.model.kv_cache import zeros_resident_when_written

    def resident_mb():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    linux = os.path.exists("/proc/self/statm")
    before = resident_mb() if linux else 0.0
    cache = zeros_resident_when_written((64, 3, 2049, 64), torch.float32, "cpu")  # 100 MB
    assert cache.sum().item() == 0.0
    cache[5, :, 7] = 2.0
    assert cache.sum().item() == 2.0 * 3 * 64 and cache[4].abs().sum().item() == 0.0
    if linux:
        assert resident_mb() - before < 20


@pytest.mark.parametrize("n_rep", [1, 3, 4])
def test_a_querys_attention_in_the_step_does_not_depend_on_the_slots_beside_it(n_rep):
    """The compiled step's attention (decode_step.grid_attention) for one query alone and beside 1-7 other
    slots of its row, bit for bit: what a decoding token or a guess gets must not depend on how many
    guesses share its row (MKL on a Zen 4 EPYC rounded a product of 3 rows otherwise than one of 6), nor
    on how far the call's keys reach beyond its own (one product over 384 keys rounded otherwise than
    over 256, where all but 256 weighed nothing)."""
    from llama_lite.model.decode_step import grid_attention

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 8, n_rep, 64, generator=gen)  # (rows, kv heads, slots, n_rep, head_dim)
    keys, values = (torch.randn(2, 3, 512, 64, generator=gen) for _ in range(2))
    visible = torch.ones(2, 8, 4, 128, dtype=torch.bool)  # (rows, slots, key blocks, 128)
    visible[..., 2:, :] = False
    visible[..., 1, 100:] = False  # sees 228 keys
    alone = grid_attention(q[:, :, :1], keys[:, :, :256], values[:, :, :256], visible[:, :1, :2])
    for slots in range(1, 9):
        for blocks in (2, 3, 4):
            width = 128 * blocks
            got = grid_attention(q[:, :, :slots], keys[:, :, :width], values[:, :, :width], visible[:, :slots, :blocks])
            assert torch.equal(got[:, :, :1], alone), (slots, blocks)
