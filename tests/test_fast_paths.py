"""The speed levers against the plain path: the compiled decode step (compile=True) and int8
weight-only quantization (quantize="int8"), on the default model, plus the int8 kernels alone."""

import pytest
import torch
import torch.nn.functional as F

from llama_lite import Llama
from llama_lite.kernels import Int8Linear, matvec, quantize_int8

PROMPTS = ["The history of the city of Rome begins", "def is_prime(n):",
           "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n"]


def build(path, **kw):
    return Llama.build(path, max_seq_len=256, max_batch_size=3, dtype="float32", device="cpu", **kw)


@pytest.fixture(scope="module")
def compiled(smollm_path):
    return build(smollm_path, compile=True)


@pytest.fixture(scope="module")
def int8(smollm_path):
    return build(smollm_path, quantize="int8")


def encode(llm):
    return [llm.tokenizer.encode(t, False, False) for t in PROMPTS]


@torch.inference_mode()
def step_logits(llm, ids, continuation):
    """Logits of a prefill of `ids`, then of each token of `continuation` fed one at a time (decode steps)."""
    steps = [llm.model(torch.tensor([ids]), 0, last_only=True)]
    for j, token in enumerate(continuation):
        steps.append(llm.model(torch.tensor([[token]]), len(ids) + j))
    return torch.cat(steps, dim=1)[0]  # (1 + len(continuation), vocab)


def test_compiled_decode_equals_eager(llm, compiled):
    """Same greedy tokens (one by one, batched, continuous) and decode-step logits within 2e-4."""
    prompts = encode(llm)
    for ids in prompts:
        eager, _ = llm.generate([ids], 24, temperature=0)
        assert compiled.generate([ids], 24, temperature=0)[0] == eager
        gap = (step_logits(compiled, ids, eager[0]) - step_logits(llm, ids, eager[0])).abs().max().item()
        assert gap <= 2e-4, gap  # float32 sums in another order; logits reach ~30
    assert compiled.generate(prompts, 24, temperature=0)[0] == llm.generate(prompts, 24, temperature=0)[0]
    texts = llm.text_completion(PROMPTS * 2, max_gen_len=16, temperature=0)
    assert compiled.text_completion(PROMPTS * 2, max_gen_len=16, temperature=0) == texts


def test_int8_stays_close_to_the_float_model(llm, int8, capsys):
    """Teacher-forced on the float32 model's greedy replies, the int8 model picks the same next token
    at most positions, and its logits stay close (relative to their spread)."""
    agree = total = 0
    worst = 0.0
    for ids in encode(llm):
        reply, _ = llm.generate([ids], 32, temperature=0)
        with torch.inference_mode():  # teacher-forced: one forward over prompt + reply, the logits from the prompt's end
            seq = torch.tensor([ids + reply[0]])
            ref, got = (m.model(seq, 0)[0, len(ids) - 1 :] for m in (llm, int8))
        agree += (ref.argmax(-1) == got.argmax(-1)).sum().item()
        total += ref.shape[0]
        worst = max(worst, ((got - ref).abs().max() / ref.std()).item())
    with capsys.disabled():
        print(f"\nint8 vs float32: next-token agreement {agree}/{total}, max |logit gap| {worst:.2f} std")
    assert agree >= 0.9 * total
    assert worst < 1.0


def test_int8_compiled_equals_int8_eager(smollm_path, int8):
    fast = build(smollm_path, quantize="int8", compile=True)
    for ids in encode(int8):
        eager, _ = int8.generate([ids], 16, temperature=0)
        assert fast.generate([ids], 16, temperature=0)[0] == eager
        assert (step_logits(fast, ids, eager[0]) - step_logits(int8, ids, eager[0])).abs().max().item() <= 1e-3


def test_int8_memory_is_a_quarter(llm, int8):
    def matrix_bytes(model):  # every weight matrix once (the tied embedding and output are one tensor)
        tensors = [*model.parameters(), *model.buffers()]
        return sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors if t.dim() == 2 and t.numel() > 100_000}.values())

    assert matrix_bytes(int8.model) < 0.26 * matrix_bytes(llm.model)


def test_int8_kernels():
    torch.manual_seed(0)
    w = torch.randn(300, 96)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (300,)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()  # rounding error only
    layer = Int8Linear(96, 300, dtype=torch.float32)
    layer.weight.copy_(q)
    layer.scale.copy_(scale)
    x = torch.randn(4, 96)
    assert torch.allclose(layer(x), F.linear(x, q.float() * scale[:, None]), atol=1e-4)
    assert torch.allclose(matvec(x[:1], q, scale), layer(x[:1]), atol=1e-4)  # the compiled path's formula


def test_bad_lever_arguments(smollm_path):
    with pytest.raises(ValueError, match="quantize"):
        build(smollm_path, quantize="int4")
    with pytest.raises(ValueError, match="compile"):
        build(smollm_path, compile="yes")
