"""The fast paths against the plain one: the low-precision CPU path (a GGUF's 4-bit blocks kept 4-bit,
its embedding and head bfloat16, the whole decode step compiled ahead of time), the compiled step in
float32, and int8 weight-only quantization; plus the kernels alone. Each is compiled once per machine
(the artifacts stay in the cache)."""

import functools
import sys

import pytest
import torch
import torch.nn.functional as F

from llama_lite import Llama, SamplingParams
from llama_lite.loading.gguf_file import dequantize, int4_values, open_gguf
from llama_lite.model import integer_kernels, kernels
from llama_lite.model.kernels import Int4Linear, Int8Head, Int8Linear, matvec, quantize_int4, quantize_int8
from tests.conftest import INT4, build_cpu
from tests.tiny_gguf import write_tiny_gguf

PROMPTS = ["The history of the city of Rome begins", "def is_prime(n):",
           "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n"]


build = functools.partial(build_cpu, max_seq_len=256, max_batch_size=4)


@pytest.fixture(scope="session")
def fast(int4_compiled):
    """The int4 path (what the default picks where it measures fastest), with its compiled step."""
    return int4_compiled


@pytest.fixture(scope="module")
def fast_eager(smollm_path):
    return Llama.build(smollm_path, compile=False, **INT4)


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    """float32 compiled, eager and compiled, on a random 2-layer model: its graph is compiled layer by
    layer, so SmolLM2's 30 take ~4 minutes where 2 take ~40 s, for the same code. (Its greedy tokens'
    top two logits lie >= 0.016 apart, far beyond the 2e-4 the compiled sums may move them.)"""
    path = write_tiny_gguf(tmp_path_factory.mktemp("tiny32") / "tiny.gguf", dim=128, hidden=256)
    return build(path), build(path, compile=True)


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


def teacher_forced_agreement(reference, other):
    """On the reference model's greedy replies, fed whole: at how many positions the other model picks
    the same next token, of how many, and the largest logit gap in standard deviations."""
    agree = total = 0
    worst = 0.0
    for ids in encode(reference):
        reply, _ = reference.generate([ids], 32, temperature=0)
        with torch.inference_mode():
            seq = torch.tensor([ids + reply[0]])
            ref, got = (m.model(seq, 0)[0, len(ids) - 1 :] for m in (reference, other))
        agree += (ref.argmax(-1) == got.argmax(-1)).sum().item()
        total += ref.shape[0]
        worst = max(worst, ((got - ref).abs().max() / ref.std()).item())
    return agree, total, worst


# --- the default path ---------------------------------------------------------------------------------

def test_int4_path_keeps_the_gguf_blocks_and_compiles(fast):
    from llama_lite.model.aot_step import AotStep

    model = fast.model
    assert model.norm.weight.dtype == torch.float32  # activations float32: only the kernels' inputs are bfloat16
    attention, feed_forward = model.layers[0].attention, model.layers[0].feed_forward
    assert isinstance(attention.wqkv, Int4Linear) and attention.wq is None  # q, k, v fused into one product
    assert isinstance(feed_forward.w13, Int4Linear) and isinstance(feed_forward.w2, Int4Linear)
    assert isinstance(model.output, Int8Head)  # the Q8_0 head as int8 rows: one kernel for any rows
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()  # still tied: one copy
    assert isinstance(model.decode_step, AotStep) and fast.path.path == "int4"


def test_the_int8_head_holds_the_stored_head_to_half_a_step(fast, smollm_path):
    """The head's int8 rows times their scales are the GGUF's (tied) Q8_0 weights, each within half its
    row's step; the embedding looks up the same numbers."""
    head = fast.model.output
    stored = dequantize(next(t for t in open_gguf(smollm_path).tensors if t.name == "token_embd.weight"))
    values = head.weight.float() * head.scale
    assert ((values - stored).abs() <= head.scale / 2 * (1 + 1e-6)).all()
    tokens = torch.tensor([0, 7, 49151])
    assert torch.equal(fast.model.tok_embeddings(tokens), values[tokens])


def test_kept_values_are_the_stored_blocks(smollm_path):
    """int4 (Q4_1) values times their scales plus offsets are the dequantized weights."""
    reader = open_gguf(smollm_path)
    t = next(t for t in reader.tensors if t.tensor_type.name == "Q4_1")
    q, scale, offset = int4_values(t)
    weight = q.float() * scale.repeat_interleave(32, dim=1) + offset.repeat_interleave(32, dim=1)
    assert torch.equal(weight, dequantize(t)), t.name


def test_int4_kernel_computes_the_stored_weights():
    """The int4 kernel gives x @ (q * scale + offset)^T up to the rounding of x to 8 bits a group, and
    exactly the integer sums PyTorch's operators compute (to float32 rounding); quantize_int4 rounds
    each weight to its group's nearest level."""
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    q, scale, offset = quantize_int4(w)
    weight = q.float() * scale.repeat_interleave(32, 1) + offset.repeat_interleave(32, 1)
    assert ((weight - w).abs() <= scale.repeat_interleave(32, 1) / 2 + 1e-6).all()
    layer = Int4Linear(64, 96)
    layer.weight, layer.scales = integer_kernels.pack(q, scale, offset)
    assert integer_kernels.native(), "the int4 kernel did not build"
    x = torch.randn(5, 64)
    stored = q.float() * scale.half().float().repeat_interleave(32, 1) + offset.half().float().repeat_interleave(32, 1)
    expected = x @ stored.T  # the scales and offsets are held in float16, as GGUF stores them
    assert (layer(x) - expected).abs().max() <= 0.02 * expected.abs().max()
    assert (layer(x) - integer_kernels._q4_mm_in_torch(x, layer.weight, layer.scales)).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64-v2"])
def test_integer_kernels_give_the_same_bits_on_every_instruction_set(march):
    """The kernels built for AVX2 (x86-64-v3) and for plain SSE (x86-64-v2) compute what this CPU's build
    does, bit for bit: the integer sums are exact and the float terms added in one order. So the AVX2
    code is checked on any machine; a row's outputs are the same alone and beside others; and the int8
    product's sums are PyTorch's `_int_mm`'s."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("an x86 CPU with AVX2 runs these builds")
    namespace = "llama_lite_" + march.replace("-", "_")
    if not hasattr(getattr(torch.ops, namespace), "q4_mm"):
        torch.ops.load_library(str(integer_kernels._built(march, namespace)))
    other = getattr(torch.ops, namespace)
    torch.manual_seed(1)
    packed, scales = integer_kernels.pack(*quantize_int4(torch.randn(160, 96)))
    x = torch.randn(9, 96)
    x[2, :32] = 0  # a group of zeros: step 0
    assert integer_kernels.native()
    here = torch.ops.llama_lite.q4_mm(x, packed, scales)
    assert torch.equal(other.q4_mm(x, packed, scales), here)
    for row in range(9):
        assert torch.equal(torch.ops.llama_lite.q4_mm(x[row:row + 1], packed, scales)[0], here[row])
    w = torch.randint(-128, 128, (200, 100), dtype=torch.int8)  # a width that leaves a tail past 64 and 32
    w[0, :] = -128
    x8 = torch.randint(-127, 128, (17, 100), dtype=torch.int8)
    sums = torch._int_mm(x8, w.t())
    for rows in (1, 5, 17):  # the kernel's own loop up to 5 rows (a block of 4 and a tail), _int_mm from 6
        assert torch.equal(torch.ops.llama_lite.int8_mm(x8[:rows], w), sums[:rows])
        assert torch.equal(other.int8_mm(x8[:rows], w), sums[:rows])
    assert torch.equal(torch.ops.llama_lite.int8_mm(x8[3:4], w)[0], sums[3])


@pytest.mark.skipif(not kernels.tiles_pay(), reason="prompt tiles run where the CPU multiplies bfloat16 tiles (AMX)")
def test_prompt_tiles_multiply_the_kernels_weights_alike_whatever_else_is_in_the_tile():
    """Inside prompt_tiles an int4 layer multiplies the stored weights (read back from the kernel's packed
    layout, rounded to bfloat16), in a GEMM of a whole tile: a row's output is the same bits beside any
    other rows and wherever it sits, and close to the kernel's."""
    torch.manual_seed(0)
    q, scale, offset = quantize_int4(torch.randn(192, 64))
    layer = Int4Linear(64, 192)
    layer.weight, layer.scales = integer_kernels.pack(q, scale, offset)
    weights = q.float() * scale.half().float().repeat_interleave(32, 1) + offset.half().float().repeat_interleave(32, 1)
    assert torch.equal(layer.dequantized(), weights.bfloat16().T)
    x, other = torch.randn(5, 64), torch.randn(kernels.PROMPT_TILE, 64)
    with kernels.prompt_tiles(layer):
        alone = layer(x)
        beside = layer(torch.cat((other[:7], x, other[7:20])))[7:12]
        last = layer(torch.cat((other[: kernels.PROMPT_TILE - 5], x)))[-5:]
    assert torch.equal(alone, beside) and torch.equal(alone, last)
    kernel = layer(x).float()
    assert (alone.float() - kernel).abs().max() <= 0.02 * kernel.abs().max()


def test_compiled_default_computes_what_the_eager_default_does(fast, fast_eager):
    """The compiled step calls ATen's kernels wherever its own loops would round otherwise, so a process
    decoding eagerly until its compile finishes (compile=False here: the same EagerStep) gets the
    compiled step's logits bit for bit: a prompt fed whole, one token at a time and beside other rows,
    and the greedy tokens, one by one and as a batch on the engine."""
    from llama_lite.model.aot_step import AotStep, EagerStep

    assert isinstance(fast.model.decode_step, AotStep) and isinstance(fast_eager.model.decode_step, EagerStep)
    ids = torch.tensor([t for p in encode(fast) for t in p] * 4)[:90]
    n = len(ids)
    with torch.inference_mode():
        for llm in (fast, fast_eager):
            model = llm.model
            llm.logits = [model.forward_segments(ids, [(0, 0, n)], torch.arange(n)).clone(),
                          torch.cat([model.forward_segments(ids[i : i + 1], [(1, i, 1)], torch.tensor([0])) for i in range(n)]),
                          model.forward_segments(torch.cat([ids.roll(r) for r in range(3)]), [(r, 0, n) for r in range(3)],
                                                 torch.arange(n)).clone()]
    for compiled, eager in zip(fast.logits, fast_eager.logits):
        assert torch.equal(compiled, eager)
    prompts = encode(fast)
    for ids in prompts:
        assert fast.generate([ids], 24, temperature=0) == fast_eager.generate([ids], 24, temperature=0)
    texts = fast_eager.text_completion(PROMPTS * 2, max_gen_len=16, temperature=0)
    assert fast.text_completion(PROMPTS * 2, max_gen_len=16, temperature=0) == texts


def test_speculation_on_the_compiled_default_keeps_the_greedy_tokens(fast, monkeypatch):
    """The compiled int4 step gives a token the same logits whatever else the step feeds, so guesses
    verified in the several-token graph keep the greedy tokens: with every request guessing
    ("ngram") and with "auto" (which guesses where the build measured that a few more tokens a
    step cost little), the test prompts and a repeating one give the tokens they give
    without speculation, and guesses were accepted."""
    from llama_lite.engine.engine import Engine
    from tests.engine.test_prefix_cache import run

    step = fast.model.decode_step
    assert set(step.step_ms) == set(range(1, 9))  # the build timed 1-8 tokens a step
    # what it timed depends on the machine and what ran beside the build: here guesses are made cheap,
    # so "auto" guesses whatever this machine measured
    monkeypatch.setattr(step, "step_ms", {n: 6.0 + 0.5 * (n - 1) for n in range(1, 9)})
    assert step.draft_budget(1) > 1
    repeating = fast.tokenizer.encode("one two three four five six, one two three four five six, one two", False, False)
    schedule = [(0, ids, SamplingParams(temperature=0, max_tokens=24)) for ids in encode(fast) + [repeating]]
    off, _ = run(Engine(fast.model, fast.tokenizer, fast.generator, speculative="off"), schedule)
    for mode in ("ngram", "auto"):
        speculating = Engine(fast.model, fast.tokenizer, fast.generator, speculative=mode)
        assert run(speculating, schedule)[0] == off, mode
        assert speculating.acceptance.accepted > 0, mode


def test_the_compiled_step_takes_prompts_alike_however_they_come(fast):
    """Prompt tokens go through the compiled step too, a chunk through a prompt graph: a prompt's logits
    are bit for bit the same fed whole (longer than one call takes), in long pieces (tiled like the
    whole where tiles pay, kernels.tiles_pay), or beside other rows' prompts in a step of more tokens
    than one call takes, and with the head run only on the tokens asked for; in short pieces (the int4
    kernel's products) they are the bits of the prompt decoded one token at a time, and those pick the
    long pieces' next tokens. So on the
    engine, with the prefix cache and prompts cut into chunks by a small step budget, each request,
    short or long, gets the tokens it gets alone."""
    from llama_lite.engine.engine import Engine
    from tests.engine.test_prefix_cache import run

    model = fast.model
    assert model.decode_step.takes_prompts  # the build found its graphs alike
    ids = torch.tensor([t for p in encode(fast) for t in p] * 8)[:150]
    n = len(ids)
    with torch.inference_mode():
        def logits(segments, tokens):
            return model.forward_segments(tokens, segments, torch.arange(len(tokens))).clone()

        whole = logits([(0, 0, n)], ids)
        long_pieces = torch.cat([logits([(1, a, 50)], ids[a : a + 50]) for a in range(0, n, 50)])
        short_pieces = torch.cat([logits([(3, a, len(ids[a : a + 5]))], ids[a : a + 5]) for a in range(0, n, 5)])
        one_by_one = torch.cat([logits([(2, i, 1)], ids[i : i + 1]) for i in range(n)])
        assert 4 * n > model.decode_step.most_tokens
        beside = logits([(row, 0, n) for row in range(4)], torch.cat([ids.roll(row) for row in range(4)]))
        # the head runs only where logits are wanted: calls with none wanted, and none at all
        some = torch.tensor([n - 1, 3, 77])
        picked = model.forward_segments(ids, [(0, 0, n)], some).clone()
        nothing = model.forward_segments(ids, [(0, 0, n)], some[:0])
    assert (model.tiled_chunks is None or model.tiled_chunks <= 50) and n > kernels.PROMPT_TILE  # tiles: AMX only
    assert torch.equal(whole, long_pieces) and torch.equal(whole, beside[:n]) and torch.equal(short_pieces, one_by_one)
    assert (whole.argmax(-1) == one_by_one.argmax(-1)).float().mean() >= 0.95
    assert (whole - one_by_one).abs().max() < one_by_one.std()
    assert torch.equal(picked, whole[some]) and nothing.shape == (0, whole.shape[1])

    prompts = encode(fast)
    long = ids[:110].tolist()  # tiled, in chunks of tiled_chunks or more when the budget cuts it
    params = SamplingParams(temperature=0, max_tokens=12)
    for budget, first in ((6, prompts[2]), (60, long)):
        shared = first + prompts[0]  # begins with another request's prompt: the prefix cache reuses its K/V
        schedule = [(0, first, params), (0, prompts[1], params), (3, shared, params)]
        alone = [run(Engine(fast.model, fast.tokenizer, fast.generator, prefix_cache=False), [(0, p, params)])[0][0]
                 for _, p, _ in schedule]
        together, cached = run(Engine(fast.model, fast.tokenizer, fast.generator, max_step_tokens=budget), schedule)
        assert together == alone and cached[2] > 0, budget


def assert_close_to_float32(llm, other, label, capsys):
    """other's teacher-forced next tokens agree with the float32 model's on 90% of the test prompts'
    positions, and no logit strays a whole standard deviation (printed: the figures docs/performance.md quotes)."""
    agree, total, worst = teacher_forced_agreement(llm, other)
    with capsys.disabled():
        print(f"\n{label} vs float32: next-token agreement {agree}/{total}, max |logit gap| {worst:.2f} std")
    assert agree >= 0.9 * total
    assert worst < 1.0


def test_default_stays_close_to_the_float32_model(llm, fast_eager, capsys):
    assert_close_to_float32(llm, fast_eager, "int4", capsys)


def test_a_failed_compile_says_why(smollm_path, monkeypatch, tmp_path):
    """compile=True waits for the compile process; its failure is one line with the child's reason."""
    from llama_lite import precompile

    monkeypatch.setenv("LLAMA_LITE_CACHE", str(tmp_path))  # nothing built there
    monkeypatch.setattr(precompile, "command", lambda *args: [sys.executable, "-c", "raise SystemExit('no C++ compiler here')"])
    with pytest.raises(RuntimeError, match="compiling the decode step failed: no C\\+\\+ compiler here"):
        Llama.build(smollm_path, max_seq_len=128, max_batch_size=1, device="cpu", quantize="int4", compile=True)


def rounded_to_8_bits(module, args):
    """A forward pre-hook: the input rounded to int8 per group of 32 and back, as the int4 kernel rounds it."""
    x = args[0]
    groups = x.unflatten(-1, (-1, 32))
    step = groups.abs().amax(-1, keepdim=True) / 127
    return (torch.round(groups / torch.where(step > 0, step, 1)) * step).flatten(-2),


def test_quantize_int4_on_a_float_checkpoint(tmp_path):
    """quantize="int4" computes what float32 computes on the 4-bit weights it made with each product's
    input rounded to 8 bits a group (as the kernel does), up to the rounding bfloat16 brings anyway
    (the embedding and head, the float16 scales)."""
    from tests.loading.test_formats import TOKENS, hf_model, save_hf

    model = hf_model()
    int4 = build(save_hf(model, tmp_path / "float"), max_seq_len=64, quantize="int4", dtype=None, compile=False)
    assert isinstance(int4.model.layers[0].attention.wqkv, Int4Linear)
    assert not isinstance(int4.model.output, Int4Linear)  # the head and embedding keep bfloat16
    with torch.no_grad():  # the same model with every layer matrix replaced by its 4-bit values, in float32
        for layer in model.model.layers:
            for linear in (*layer.self_attn.children(), *layer.mlp.children()):
                if isinstance(linear, torch.nn.Linear):
                    q, scale, offset = quantize_int4(linear.weight)
                    scale, offset = scale.half().float(), offset.half().float()  # held in float16, as GGUF holds them
                    linear.weight.copy_(q.float() * scale.repeat_interleave(32, 1) + offset.repeat_interleave(32, 1))
    folder = save_hf(model, tmp_path / "4-bit values")
    with torch.inference_mode():
        exact, rounded = (build(folder, max_seq_len=64, dtype=d).model(TOKENS, 0) for d in ("float32", "bfloat16"))
        reference = build(folder, max_seq_len=64, dtype="float32").model
        for layer in reference.layers:
            for linear in (*layer.attention.children(), *layer.feed_forward.children()):
                if isinstance(linear, kernels.Linear):
                    linear.register_forward_pre_hook(rounded_to_8_bits)
        exact = reference(TOKENS, 0)
        got = int4.model(TOKENS, 0)
    gap, bfloat16_gap = (((x - exact).abs().max() / exact.std()).item() for x in (got, rounded))
    assert gap < 1.5 * bfloat16_gap, f"{gap} vs {bfloat16_gap}: more than bfloat16's own rounding"
    assert (got.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9
    with pytest.raises(ValueError, match="int4"):
        build(tmp_path / "float", quantize="int4", dtype="float16")


# --- float32 compiled --------------------------------------------------------------------------------

def test_compiled_float32_decode_equals_eager(tiny32):
    """Same greedy tokens (one by one, batched, continuous) and decode-step logits within 2e-4."""
    llm, compiled32 = tiny32
    prompts = encode(llm)
    for ids in prompts:
        eager, _ = llm.generate([ids], 24, temperature=0)
        assert compiled32.generate([ids], 24, temperature=0)[0] == eager
        gap = (step_logits(compiled32, ids, eager[0]) - step_logits(llm, ids, eager[0])).abs().max().item()
        assert gap <= 2e-4, gap  # float32 sums in another order
    assert compiled32.generate(prompts, 24, temperature=0)[0] == llm.generate(prompts, 24, temperature=0)[0]
    texts = llm.text_completion(PROMPTS * 2, max_gen_len=16, temperature=0)
    assert compiled32.text_completion(PROMPTS * 2, max_gen_len=16, temperature=0) == texts


# --- int8 ---------------------------------------------------------------------------------------------

def test_int8_stays_close_to_the_float_model(llm, int8, capsys):
    assert_close_to_float32(llm, int8, "int8", capsys)


def test_int8_memory_is_a_quarter(llm, int8):
    def matrix_bytes(model):  # every weight matrix once (the tied embedding and output are one tensor)
        tensors = [*model.parameters(), *model.buffers()]
        return sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors if t.dim() == 2 and t.numel() > 100_000}.values())

    assert matrix_bytes(int8.model) < 0.26 * matrix_bytes(llm.model)


def test_int8_kernels():
    torch.manual_seed(0)
    w = torch.randn(300, 96)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (300, 1)
    assert ((q.float() * scale - w).abs() <= scale / 2 + 1e-6).all()  # rounding error only
    layer = Int8Linear(96, 300, dtype=torch.float32)
    layer.weight.copy_(q)
    layer.scale.copy_(scale)
    x = torch.randn(4, 96)
    assert torch.allclose(layer(x), F.linear(x, q.float() * scale), atol=1e-4)
    assert torch.allclose(matvec(x[:1], q.float() * scale), layer(x[:1]), atol=1e-4)  # the compiled path's formula


def test_bad_lever_arguments(smollm_path):
    with pytest.raises(ValueError, match="quantize"):
        build(smollm_path, quantize="int3")
    with pytest.raises(ValueError, match="compile"):
        build(smollm_path, compile="yes")


# --- CUDA (where a GPU is present) --------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


@cuda
def test_cuda_compiled_step_matches_transformers_and_eager(tmp_path):
    """On a GPU the compiled step (CUDA graphs) gives the eager greedy tokens, and float32 logits equal
    transformers' to 1e-4."""
    from tests.loading.test_formats import TOKENS, hf_model, reference, save_hf

    model = hf_model()
    folder = save_hf(model, tmp_path)
    eager = Llama.build(folder, max_seq_len=64, max_batch_size=2, device="cuda", dtype="float32", compile=False)
    fast = Llama.build(folder, max_seq_len=64, max_batch_size=2, device="cuda", dtype="float32", compile=True)
    with torch.inference_mode():
        ours = eager.model(TOKENS.cuda(), 0).cpu()
    ref = reference(model)
    assert (ours - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
    prompts = [[1, 5, 900, 42], [1, 77, 78]]
    assert fast.generate(prompts, 24, temperature=0) == eager.generate(prompts, 24, temperature=0)
    assert fast.text_completion(["ab", "cd e"], max_gen_len=12, temperature=0) == \
        eager.text_completion(["ab", "cd e"], max_gen_len=12, temperature=0)


def test_a_tokens_numbers_do_not_depend_on_how_far_its_call_reaches(smollm_path):
    """Past 256 keys, one product over the whole attention width rounded by its width (MKL splits a
    long sum), so a token's logits depended on the furthest token of its call: on what shared its step,
    and on how its prompt was cut. The step sums the values block by block: a sequence fed in calls of
    8 tokens that straddle 256 gets the bits of calls that do not (the eager step: the compiled one's numbers)."""
    llm = Llama.build(smollm_path, max_seq_len=384, max_batch_size=8, device="cpu", quantize="int4", compile=False, seed=0)
    ids = torch.tensor([t for p in encode(llm) for t in p] * 40)[:300]
    step = llm.model.decode_step

    def fed(first_call):
        with torch.inference_mode():
            pieces, at = [], 0
            for size in [first_call] + [8] * len(ids):
                end = min(at + size, len(ids))
                if at < end:
                    pieces.append(step(ids[at:end], [(0, p, 1) for p in range(at, end)], torch.arange(end - at)))
                at = end
            return torch.cat(pieces)

    aligned, straddling = fed(8), fed(4)  # calls 248-255 and 256-263; 252-259
    assert torch.equal(aligned, straddling)
