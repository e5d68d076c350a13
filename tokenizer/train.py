"""Train the SentencePiece model this project ships: tokenizer/llama_lite_sp.model.

    python tokenizer/train.py            # rewrites tokenizer/llama_lite_sp.model from corpus.txt

It mirrors Meta's Llama 1/2 tokenizer settings at a small size: BPE, byte fallback (any text
encodes, emoji and Korean included), digits split one by one, whitespace kept as it is, a dummy
prefix space, and the Llama special ids <unk>=0, <s>=1, </s>=2, no pad (-1). One thread and no
sampling of the input, so the same corpus gives the same file, byte for byte.
"""

import os
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus.txt"
MODEL = HERE / "llama_lite_sp.model"
VOCAB_SIZE = 4096


def train(corpus: Path = CORPUS, model: Path = MODEL, vocab_size: int = VOCAB_SIZE) -> Path:
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "sp")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=prefix,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            character_coverage=0.9995,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
        data = Path(prefix + ".model").read_bytes()
    model.write_bytes(_without_paths(data))
    return model


def _without_paths(data: bytes) -> bytes:
    """The trainer records where the corpus and output were; keep only names, so the file does
    not depend on the folder it was trained in."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(data)
    proto.trainer_spec.input[:] = [CORPUS.name]
    proto.trainer_spec.model_prefix = MODEL.stem
    return proto.SerializeToString()


if __name__ == "__main__":
    print(train())
