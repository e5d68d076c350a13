"""Fuzzing, run by test_fuzz.py in a fresh process (so its peak memory is its own):

    python -m tests.fuzz gguf N      # N mutated GGUF headers/metadata -> read, tokenizer, tensors
    python -m tests.fuzz build N     # N mutated GGUF files through Llama.build
    python -m tests.fuzz text N      # N random strings and id lists through every tokenizer back-end

Hypothesis draws the cases from a fixed seed (derandomize). The only outcomes allowed are a result,
CheckpointError or ValueError (FileNotFoundError never applies here); anything else, or a case
running over 10 s, fails with hypothesis' smallest example. Prints one JSON line of counts.
"""

import json
import signal
import struct
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_lite import CheckpointError, Llama, Tokenizer
from llama_lite.loading.checkpoint import read_checkpoint
from llama_lite.text.gguf_vocab import gguf_tokenizer
from tests.memory import peak_rss_mb
from tests.tiny_gguf import SHIPPED_SP_MODEL, write_tiny_gguf

ALLOWED = (CheckpointError, ValueError)
counts = {"cases": 0, "refused": 0, "accepted": 0}


def _timeout(signum, frame):
    raise TimeoutError("a fuzz case ran over 10 s")


def outcome(run):
    """Run one case under a time bound; count whether it was accepted or cleanly refused."""
    counts["cases"] += 1
    signal.alarm(10)
    try:
        run()
        counts["accepted"] += 1
    except ALLOWED:
        counts["refused"] += 1
    finally:
        signal.alarm(0)


def mutate(base: bytes, metadata_end: int, op: int, pos: int, value: int, cut: int) -> bytes:
    data = bytearray(base)
    pos %= metadata_end
    if op == 0:  # one byte
        data[pos] = value & 0xFF
    elif op == 1:  # a count, length or offset: 0, huge, or anything
        data[pos : pos + 8] = struct.pack("<Q", value)
    elif op == 2:  # a value-type tag
        data[pos : pos + 4] = struct.pack("<I", value % 16)
    elif op == 3:  # truncated
        data = data[: cut % len(data)]
    else:  # bytes inserted, shifting everything after
        data[pos:pos] = value.to_bytes(8, "little")[: 1 + value % 8]
    return bytes(data)


MUTATION = dict(
    op=st.integers(0, 4),
    pos=st.integers(0, 2**31),
    value=st.one_of(st.sampled_from([0, 1, 2**31 - 1, 2**32, 2**40, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1)),
    cut=st.integers(0, 2**31),
)


def fuzz_gguf(n: int, build: bool) -> None:
    import gguf

    folder = Path(tempfile.mkdtemp())
    bases = []
    for kind in ("gpt2", "llama"):
        path = write_tiny_gguf(folder / f"{kind}.gguf", vocab_kind=kind)
        bases.append((path.read_bytes(), gguf.GGUFReader(path).data_offset))
    target = folder / "case.gguf"

    def read_everything():
        ckpt = read_checkpoint(target)
        gguf_tokenizer(ckpt.gguf_reader)
        for _ in ckpt.tensors():
            pass

    def build_model():
        Llama.build(target, max_seq_len=32, max_batch_size=1, device="cpu", dtype="float32")

    @settings(max_examples=n, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(which=st.integers(0, 9), **MUTATION)
    def case(which, op, pos, value, cut):
        base, metadata_end = bases[0 if which < 8 else 1]  # the 4096-token vocabulary is slower to parse
        target.write_bytes(mutate(base, metadata_end, op, pos, value, cut))
        outcome(build_model if build else read_everything)

    case()


def fuzz_text(n: int) -> None:
    folder = Path(tempfile.mkdtemp())
    tokenizers = [
        Tokenizer.from_file(SHIPPED_SP_MODEL),
        Tokenizer.from_file(write_tiny_gguf(folder / "bpe.gguf")),
        Tokenizer.from_file(write_tiny_gguf(folder / "spm.gguf", vocab_kind="llama")),
    ]

    @settings(max_examples=n, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(which=st.integers(0, len(tokenizers) - 1),
           text=st.one_of(st.text(), st.text(st.characters(codec=None, blacklist_categories=())), st.binary(),
                          st.sampled_from(["<s>", "</s>", "<|im_end|>", "<unk>", "\x00", " " * 50])),
           ids=st.lists(st.integers(-5, 5000), max_size=50))
    def case(which, text, ids):
        tok = tokenizers[which]

        def run():
            encoded = tok.encode(text, bos=False, eos=False)
            assert all(0 <= i < tok.n_words for i in encoded)
            assert isinstance(tok.decode(encoded), str)

        outcome(run)
        outcome(lambda: tok.decode(ids))

    case()


if __name__ == "__main__":
    signal.signal(signal.SIGALRM, _timeout)
    mode, n = sys.argv[1], int(sys.argv[2])
    if mode == "text":
        fuzz_text(n)
    else:
        fuzz_gguf(n, build=mode == "build")
    counts["max_rss_mb"] = peak_rss_mb()
    print(json.dumps(counts))
