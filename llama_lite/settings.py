"""`BuildSettings`: what `Llama.build` takes, checked in one place.

Each field's `help` is the one text for that setting: `Llama.build`'s documentation points here
and the command lines' --help lines are made from it (cli/flags.py), so they cannot drift apart.
"""

import os
from dataclasses import dataclass, field, fields

from .checks import check_whole, is_whole
from .engine.speculation import check_speculative
from .model.devices import check_threads

QUANTIZE = ("int4", "int8")


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class BuildSettings:
    checkpoint: "str | os.PathLike | None" = _setting(
        None, "a .gguf file, a Hugging Face folder or a Meta folder; default SmolLM2-135M-Instruct (fetched once). "
              "E.g. --checkpoint ~/models/llama-3.2-1b.gguf")
    tokenizer: "str | os.PathLike | None" = _setting(
        None, "a tokenizer file to use instead of the checkpoint's own. E.g. --tokenizer tokenizer.json")
    max_seq_len: "int | None" = _setting(
        2048, "the context in tokens (prompt and reply); default 2048, or the model's if shorter. E.g. --max_seq_len 4096")
    max_batch_size: int = _setting(
        8, "KV-cache rows: the requests that decode together. E.g. --max_batch_size 16")
    device: "str | None" = _setting(
        None, "cpu, cuda or cuda:N; default cuda where there is one. E.g. --device cpu")
    dtype: "str | None" = _setting(
        None, "float32, bfloat16 or float16; default on a CPU: what measured fastest on it (--quantize int4, or float32), "
              "bfloat16 on a GPU that runs it fast. E.g. --dtype float32")
    seed: "int | None" = _setting(
        None, "seed sampling, so a run repeats exactly. E.g. --seed 1")
    quantize: "str | None" = _setting(
        None, "int4 (group-32 4-bit layers on a CPU, a GGUF's Q4_0/Q4_1 blocks as they are; float32 activations, bfloat16 "
              "only into the kernels; the default where it measures fastest) or int8 (weights in 8 bits, a quarter of "
              "float32's memory). E.g. --quantize int4")
    compile: "bool | None" = _setting(
        None, "the decode step compiled whole, ahead of time: --compile waits for it (float32 too), --nocompile never; "
              "default: loaded if built, else built by another process on first use (bfloat16 and 4-bit paths; float32 "
              "stays eager, bit for bit). E.g. --nocompile")
    prefix_cache: bool = _setting(
        True, "reuse the K/V of a prompt's beginning that the cache holds; --no_prefix_cache prefills every prompt whole "
              "(to compare). E.g. --no_prefix_cache")
    speculative: str = _setting(
        "auto", "auto guesses tokens from the text so far and checks them in one step where that pays (the text "
                "stays the same); ngram always guesses; off never (to compare). E.g. --speculative off")
    draft: None = _setting(
        None, "a draft model for speculation: not supported yet (None only; prompt lookup needs none)")
    chat_template: "str | os.PathLike | None" = _setting(
        None, "a jinja2 chat template, or a file holding one, used instead of the checkpoint's (one that takes tools, "
              "say). E.g. --chat_template qwen_tools.jinja")
    threads: "int | None" = _setting(
        None, "CPU threads; default: the cores this process may use that no other process keeps busy. E.g. --threads 1")

    def __post_init__(self):
        if self.quantize not in (None, *QUANTIZE):
            raise ValueError(f"quantize must be {', '.join(map(repr, QUANTIZE))} or None, got {self.quantize!r}")
        if self.compile not in (None, True, False):
            raise ValueError(f"compile must be True, False or None (the fastest path this machine supports), "
                             f"got {self.compile!r}")
        if not isinstance(self.prefix_cache, bool):
            raise ValueError(f"prefix_cache must be True or False, got {self.prefix_cache!r}")
        check_speculative(self.speculative)
        if self.draft is not None:
            raise ValueError("draft models are not supported yet; pass draft=None (speculative='ngram' guesses without one)")
        for name in ("checkpoint", "tokenizer"):
            path = getattr(self, name)
            if path is not None and not isinstance(path, (str, os.PathLike)):
                raise ValueError(f"{name} must be a path (str or PathLike) or None, got {path!r}")
            if path == "":  # Path("") would be the current folder
                default = "the default model" if name == "checkpoint" else "the checkpoint's own"
                raise ValueError(f"{name} must be a path, not an empty string; or None for {default}")
        if self.max_seq_len is not None:
            check_whole("max_seq_len", self.max_seq_len, 1)
        check_whole("max_batch_size", self.max_batch_size, 1)
        if self.seed is not None and not (is_whole(self.seed) and -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be a whole number (64-bit) or None, got {self.seed!r}")
        if self.threads is not None:
            check_threads(self.threads)

    @staticmethod
    def help(name: str) -> str:
        """The one help text of setting `name`."""
        return _HELP[name]


_HELP = {f.name: f.metadata["help"] for f in fields(BuildSettings)}
