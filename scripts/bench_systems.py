"""The systems scripts/bench.py compares, one runner class each with the same few methods
(encode, generate, many; llama_lite also stream and the engine's requests), and the checkpoints
they load: a cached file, or a random-weight one of a known shape for --device cuda.

System names: llama_lite[:DTYPE][:int8|int4][:compile|nocompile], transformers, llama_cpp.
"""

import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# llama_lite[:DTYPE][:int8|int4][:compile|nocompile]: the dtype of activations (and of weights not kept
# quantized), the levers; plain llama_lite is the default configuration.
ALL_SYSTEMS = ("llama_lite", "llama_lite:nocompile", "llama_lite:float32", "llama_lite:float32:compile",
               "llama_lite:float32:int8:compile", "transformers", "llama_cpp")
DTYPES = ("float32", "bfloat16", "float16")
SHAPES = {  # random-weight checkpoints for --device cuda (transformers' LlamaConfig fields)
    "smollm2": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "llama1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                    intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
}
MAX_SEQ_LEN = 384  # the longest mixed prompt (300) + 64 new tokens fits


def build_options(options) -> dict:
    """Llama.build's levers from a llama_lite system name's options."""
    return {"dtype": next((o for o in options if o in DTYPES), None),
            "quantize": next((o for o in options if o in ("int8", "int4")), None),
            "compile": True if "compile" in options else False if "nocompile" in options else None}


class LlamaLite:
    def __init__(self, path, options, threads, max_batch_size, max_seq_len=MAX_SEQ_LEN, device="cpu"):
        from llama_lite import Llama

        self.llm = Llama.build(path, max_seq_len=max_seq_len, max_batch_size=max_batch_size, device=device,
                               threads=threads, **build_options(options))
        self.stop_ids = self.llm.tokenizer.stop_ids
        self.llm.tokenizer.stop_ids = frozenset({-1})  # no token is -1: end-of-sequence is ignored
        tensors = [*self.llm.model.parameters(), *self.llm.model.buffers()]  # the tied embedding/output counted once:
        self.weight_bytes = sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors if t.dim() == 2}.values())

    def compiled(self):
        """Wait for the compile process this build started, if any, and take its step: whether the
        compiled step runs, its build seconds, and the path picked with why."""
        if self.llm.compiling is not None:
            self.llm.compiling.wait()
            self.llm.model.adopt_compiled_step()
        step = self.llm.model.decode_step
        return {"compiled": step is not None and step.compiled, "compile_s": round(getattr(step, "build_seconds", 0.0) or 0.0, 1),
                "path": self.llm.path.path, "why": self.llm.path.why}

    def stream(self, prompt, n_new):
        """Tokens streamed: n_new when the stream ends by length (no stop id matches here). Its pieces
        are not tokens: one carries several where speculation keeps guesses."""
        pieces = self.llm.stream(prompt, n_new, temperature=0)
        try:
            while True:
                next(pieces)
        except StopIteration as end:
            return n_new if end.value == "length" else 0

    def encode(self, text):
        return self.llm.tokenizer.encode(text, bos=False, eos=False)

    def generate(self, prompts, n_new):
        tokens, _ = self.llm.generate(prompts, n_new, temperature=0)
        return tokens

    def many(self, prompts, n_new):
        from llama_lite import SamplingParams

        return self.many_params(prompts, SamplingParams(temperature=0, max_tokens=n_new))

    def many_params(self, prompts, params):
        """Every prompt as a request on the engine (continuous batching); seconds of steps that fed
        prompt tokens and of steps that only decoded are kept in self.split."""
        engine = self.llm.engine
        tokens = {engine.add(p, params): [] for p in prompts}
        self.split = {"prefill_steps_s": 0.0, "decode_steps_s": 0.0}
        while engine.has_unfinished():
            feeds_prompts = bool(engine.waiting) or any(not r.decoding for r in engine.running)
            started = time.perf_counter()
            for out in engine.step():
                tokens[out.request_id] += out.token_ids
            self.split["prefill_steps_s" if feeds_prompts else "decode_steps_s"] += time.perf_counter() - started
        return list(tokens.values())


class Transformers:
    def __init__(self, path, options, threads, max_batch_size, device="cpu"):
        import torch
        import transformers

        torch.set_num_threads(threads)
        path = Path(path)
        self.torch, self.device = torch, device
        if path.is_dir():  # a random-weight checkpoint (--shape): bfloat16, as llama_lite's default on a GPU
            self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
            self.tokenizer = transformers.LlamaTokenizer(str(path / "tokenizer.model"))
        else:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                           dtype=torch.float32).to(device).eval()
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.batch = 8 if device == "cpu" else 64

    def encode(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, prompts, n_new):
        width = max(map(len, prompts))
        pad = self.tokenizer.pad_token_id or 0
        ids = self.torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)  # left padding
        mask = self.torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        with self.torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                                      do_sample=False, pad_token_id=pad)
        return [row[width:] for row in out.tolist()]

    def many(self, prompts, n_new):
        out = []
        for start in range(0, len(prompts), self.batch):
            out += self.generate(prompts[start : start + self.batch], n_new)
        return out


class LlamaCpp:
    def __init__(self, path, options, threads, max_batch_size, device="cpu"):
        import llama_cpp

        self.llm = llama_cpp.Llama(str(path), n_ctx=MAX_SEQ_LEN, n_threads=threads, n_threads_batch=threads, n_batch=512,
                                   verbose=False)
        self.weight_bytes = Path(path).stat().st_size
        self.batch = 1

    def encode(self, text):
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def generate(self, prompts, n_new):
        out = []
        for prompt in prompts:  # llama-cpp-python runs one sequence at a time
            tokens = []
            for token in self.llm.generate(prompt, top_k=1, temp=0.0, reset=True):  # never stops by itself
                tokens.append(token)
                if len(tokens) == n_new:
                    break
            out.append(tokens)
        return out

    many = generate

    def stream(self, prompt, n_new):
        return len(self.generate([prompt], n_new)[0])


SYSTEMS = {"llama_lite": LlamaLite, "transformers": Transformers, "llama_cpp": LlamaCpp}


def random_checkpoint(shape, folder: Path) -> str:
    """A random-weight Hugging Face checkpoint of `shape` (SHAPES), with the project's small
    SentencePiece tokenizer (fewer tokens than the model: only speed is measured)."""
    import shutil

    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rope_theta=10000.0)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    shutil.copy(ROOT / "tokenizer" / "llama_lite_sp.model", folder / "tokenizer.model")
    return str(folder)
