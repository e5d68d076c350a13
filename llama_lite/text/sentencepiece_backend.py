"""The `sentencepiece` back-end: Meta's tokenizer.model, and the SentencePiece model a GGUF "llama"
vocabulary is rebuilt as (gguf_vocab.py)."""

import re

from ..errors import CheckpointError
from .tokenizer import END_OF_TURN_TEXTS, Tokenizer

SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED, SP_BYTE = 1, 2, 3, 4, 6  # = llama.cpp's token types


def sentencepiece_proto(data: bytes):
    """The parsed SentencePiece ModelProto in `data`, or None if it is not one."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError):
        return None
    return proto if len(proto.pieces) > 0 else None


def sentencepiece_file(proto, path) -> "SentencePieceTokenizer":
    """A tokenizer.model: ids as its trainer recorded them (Meta's: <s>=1, </s>=2, no pad = -1),
    and a bos on every prompt, as Meta's generation code does."""
    spec = proto.trainer_spec

    def declared(value):
        return value if value >= 0 else None

    return SentencePieceTokenizer(proto, where=path, bos_id=declared(spec.bos_id), eos_id=declared(spec.eos_id),
                                  pad_id=declared(spec.pad_id), add_bos=True, chat_template=None)


def _special_splitter(specials: dict):
    """A function text -> [(id or None, text)]: each special token's text as its id, the rest as text."""
    if not specials:
        return lambda text: [(None, text)] if text else []
    pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))

    def split(text):
        parts, pos = [], 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                parts.append((None, text[pos : m.start()]))
            parts.append((specials[m.group()], m.group()))
            pos = m.end()
        if pos < len(text):
            parts.append((None, text[pos:]))
        return parts

    return split


class SentencePieceTokenizer(Tokenizer):
    """Over the `sentencepiece` library, for Meta's tokenizer.model and GGUF "llama" vocabularies.

    Text of control tokens (<s>, </s>, ...) encodes to their ids, as API.md asks; plain
    `sentencepiece` would spell them out. Like Hugging Face's (non-legacy) Llama tokenizer, only
    text at the very start gets the dummy prefix space, not text that follows a special token;
    so two processors are kept, with and without it.
    """

    def __init__(self, proto, *, where, stop_ids=(), **ids):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
            inner = type(proto)()
            inner.CopyFrom(proto)
            inner.normalizer_spec.add_dummy_prefix = False
            self.sp_no_prefix = spm.SentencePieceProcessor(model_proto=inner.SerializeToString())
        except (RuntimeError, OSError) as e:
            raise CheckpointError(f"{where}: sentencepiece cannot load this vocabulary ({e})") from None
        self.n_words = self.sp.vocab_size()
        controls = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == SP_CONTROL}
        self.control_text = {i: piece for piece, i in controls.items()}
        self.special_ids = frozenset({*controls.values(), *(i for i, p in enumerate(proto.pieces) if p.type == SP_UNKNOWN)})
        self._split_controls = _special_splitter(controls)
        stop_ids = {*stop_ids, *(i for piece, i in controls.items() if piece in END_OF_TURN_TEXTS)}
        self._set_ids(stop_ids=stop_ids, where=where, **ids)

    def _encode(self, s):
        ids = []
        for n, (special, text) in enumerate(self._split_controls(s)):
            if special is not None:
                ids.append(special)
            else:  # the dummy prefix space only for text at the very start
                ids += (self.sp if n == 0 else self.sp_no_prefix).encode(text)
        return ids

    def _decode(self, ids):
        out, run, at_start = [], [], True
        for i in ids + [None]:
            if i is None or i in self.control_text:
                if run:
                    out.append((self.sp if at_start else self.sp_no_prefix).decode(run))
                    run = []
                if i is not None:
                    out.append(self.control_text[i])
                at_start = False
            else:
                run.append(i)
        return "".join(out)

    def _token_bytes(self, token_id):
        piece = self.sp.id_to_piece(token_id)
        if self.sp.is_byte(token_id):  # "<0xE2>"
            return bytes([int(piece[3:5], 16)])
        return piece.encode("utf-8") if token_id in self.special_ids else piece.replace("\u2581", " ").encode("utf-8")
