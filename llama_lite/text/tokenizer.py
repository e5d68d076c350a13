"""Text to token ids and back, behind one interface whatever the back-end.

`Tokenizer` is the interface (Meta's `encode(s, bos, eos)` / `decode(ids)` plus the ids generation
needs). Two classes do the work, each over the reference library of its kind:
- `SentencePieceTokenizer` (the `sentencepiece` library): a tokenizer.model, or a GGUF whose
  vocabulary is of the "llama" (SentencePiece) kind, rebuilt as a SentencePiece model;
- `HFTokenizer` (the `tokenizers` library): a tokenizer.json, or a GGUF "gpt2" (byte-level BPE)
  vocabulary with its merges and named pre-tokenizer.
`Tokenizer.from_file` picks by the file's content, never by a model's name. Back-end libraries are
imported only when used.
"""

import functools
import json
import re
from pathlib import Path

from ..errors import CheckpointError
from ..loading.gguf_file import gguf_field, open_gguf

# Text of tokens that end a turn or a document. Like llama.cpp, a vocabulary's control tokens with
# these names stop generation even when its metadata names only one eos id.
END_OF_TURN_TEXTS = frozenset(
    {"<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<end_of_turn>", "<|end|>"}
)

SUPPORTED_FILES = "tokenizer.model (SentencePiece), tokenizer.json (Hugging Face) or a .gguf"


class Tokenizer:
    """The interface generation uses. Subclasses implement `_encode` and `_decode`.

    bos_id: id prepended by encode(bos=True) (None if the vocabulary has none).
    eos_id: end of sequence. pad_id: fills padding; always a valid embedding index.
    n_words: vocabulary size. stop_ids: ids that end generation (eos, end-of-turn tokens, and the
    special tokens the chat template writes around a turn: a reply that opens a new turn has ended).
    add_bos: whether plain-text prompts get a bos, as the checkpoint says.
    chat_template: the checkpoint's jinja2 chat template, or None.
    special_ids: control tokens (bos, eos, <|im_start|>...): whole tokens, never part of plain text.
    token_bytes(id, at_start): the bytes a token stands for (grammars and logprobs work on bytes).
    """

    bos_id: "int | None"
    eos_id: int
    pad_id: int
    n_words: int
    stop_ids: frozenset
    add_bos: bool
    chat_template: "str | None"
    special_ids: frozenset
    _bytes_table: "list | None" = None

    def encode(self, s: str, bos: bool, eos: bool) -> list:
        if not isinstance(s, str):
            raise ValueError(f"can only encode text (str), got {type(s).__name__}")
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:  # back-ends crash on these
            raise ValueError(f"the text holds {s[e.start]!r} at {e.start}, a lone surrogate, which is not text; pass valid Unicode") from None
        ids = self._encode(s)
        if bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no bos token; encode with bos=False")
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids) -> str:
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.n_words):
            raise ValueError(f"token ids must lie in [0, {self.n_words}); got {min(ids)}..{max(ids)}")
        return self._decode(ids)

    def token_bytes(self, token_id: int, at_start: bool = False) -> bytes:
        """The bytes token `token_id` stands for: one byte of a character for byte tokens, a
        leading space for SentencePiece's "▁", a special token's own text. The bytes of a text's
        tokens join to its UTF-8 (SentencePiece: after the dummy space it puts first). `at_start`:
        as a decoded text's first token, whose leading space SentencePiece drops (logprobs' bytes
        rebuild the text a reply shows)."""
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < self.n_words:
            raise ValueError(f"token id must be a whole number in [0, {self.n_words}), got {token_id!r}")
        if self._bytes_table is None:  # built once: a Python loop over the vocabulary (~0.1 s for 50k tokens)
            self._bytes_table = [self._token_bytes(i) for i in range(self.n_words)]
        raw = self._bytes_table[token_id]
        if at_start and raw[:1] == b" " and self.decode([token_id]).encode("utf-8") == raw[1:]:
            return raw[1:]
        return raw

    def max_token_bytes(self) -> int:
        """The most bytes one token stands for: a text of n bytes has at least n / this many tokens."""
        self.token_bytes(0)  # the table, built once
        return max(map(len, self._bytes_table))

    def _encode(self, s: str) -> list:
        raise NotImplementedError

    def _decode(self, ids: list) -> str:
        raise NotImplementedError

    def _token_bytes(self, token_id: int) -> bytes:
        raise NotImplementedError

    def _set_ids(self, *, bos_id, eos_id, pad_id, stop_ids, add_bos, chat_template, where):
        """Check and keep the ids generation relies on; `where` names the file in errors."""
        for name, value in (("eos", eos_id), ("bos", bos_id), ("pad", pad_id)):
            if value is not None and not (isinstance(value, int) and 0 <= value < self.n_words):
                raise CheckpointError(f"{where}: {name} token id {value!r} is outside the vocabulary of {self.n_words}")
        stop_ids = {i for i in stop_ids if isinstance(i, int) and 0 <= i < self.n_words}
        if eos_id is None and stop_ids:  # e.g. a tokenizer.json with no config beside it
            eos_id = min(stop_ids)
        if eos_id is None:
            raise CheckpointError(f"{where}: no eos token is declared; generation could never stop")
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = eos_id if pad_id is None else pad_id  # any valid index: padding is masked anyway
        self.stop_ids = frozenset({eos_id, *stop_ids})
        self.add_bos = bool(add_bos) and bos_id is not None
        self.chat_template = chat_template if isinstance(chat_template, str) and chat_template else None
        self.stop_ids |= self._template_specials()

    def _template_specials(self) -> frozenset:
        """The special tokens the chat template writes around one user message and the reply's
        opening (<|im_start|>, <|start_header_id|>, ...): a model that writes one has ended its turn.
        A template that fails to render adds none (chat then reports its error)."""
        from .chat_template import render_chat

        if not self.chat_template or not self.special_ids:
            return frozenset()
        try:
            text = render_chat(self.chat_template, [{"role": "user", "content": "x"}],
                               bos_token=self.decode([self.bos_id]) if self.bos_id is not None else "",
                               eos_token=self.decode([self.eos_id]))
            ids = self.encode(text, bos=False, eos=False)
        except ValueError:
            return frozenset()
        return frozenset(self.special_ids.intersection(ids))

    @staticmethod
    def from_file(path) -> "Tokenizer":
        """The tokenizer a file holds, its back-end chosen by the file's content."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer file {path} does not exist; pass {SUPPORTED_FILES}")
        if path.is_file():
            with open(path, "rb") as f:
                head = f.read(64)
            if head.startswith(b"GGUF"):
                return gguf_tokenizer(open_gguf(path))
            if head.lstrip()[:1] == b"{":
                return json_tokenizer(path)
            if path.stat().st_size < (1 << 30):
                proto = _sentencepiece_proto(path.read_bytes())
                if proto is not None:
                    return _sentencepiece_file(proto, path)
        raise CheckpointError(f"{path} is not a tokenizer file llama_lite can read; pass {SUPPORTED_FILES}")


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


# --- SentencePiece ------------------------------------------------------------------------------

_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED, _SP_BYTE = 1, 2, 3, 4, 6  # = llama.cpp's token types


def _sentencepiece_proto(data: bytes):
    """The parsed SentencePiece ModelProto in `data`, or None if it is not one."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError):
        return None
    return proto if len(proto.pieces) > 0 else None


def _sentencepiece_file(proto, path) -> "SentencePieceTokenizer":
    """A tokenizer.model: ids as its trainer recorded them (Meta's: <s>=1, </s>=2, no pad = -1),
    and a bos on every prompt, as Meta's generation code does."""
    spec = proto.trainer_spec

    def declared(value):
        return value if value >= 0 else None

    return SentencePieceTokenizer(proto, where=path, bos_id=declared(spec.bos_id), eos_id=declared(spec.eos_id),
                                  pad_id=declared(spec.pad_id), add_bos=True, chat_template=None)


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
            self.sp_inner = spm.SentencePieceProcessor(model_proto=inner.SerializeToString())
        except (RuntimeError, OSError) as e:
            raise CheckpointError(f"{where}: sentencepiece cannot load this vocabulary ({e})") from None
        self.n_words = self.sp.vocab_size()
        controls = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == _SP_CONTROL}
        self.control_text = {i: piece for piece, i in controls.items()}
        self.special_ids = frozenset({*controls.values(), *(i for i, p in enumerate(proto.pieces) if p.type == _SP_UNKNOWN)})
        self._split = _special_splitter(controls)
        stop_ids = {*stop_ids, *(i for piece, i in controls.items() if piece in END_OF_TURN_TEXTS)}
        self._set_ids(stop_ids=stop_ids, where=where, **ids)

    def _encode(self, s):
        ids = []
        for n, (special, text) in enumerate(self._split(s)):
            if special is not None:
                ids.append(special)
            else:  # the dummy prefix space only for text at the very start
                ids += (self.sp if n == 0 else self.sp_inner).encode(text)
        return ids

    def _decode(self, ids):
        out, run, at_start = [], [], True
        for i in ids + [None]:
            if i is None or i in self.control_text:
                if run:
                    out.append((self.sp if at_start else self.sp_inner).decode(run))
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


def _gguf_sentencepiece(reader, tokens, types, where) -> SentencePieceTokenizer:
    """A GGUF "llama" vocabulary rebuilt as the SentencePiece BPE model it was converted from."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    scores = gguf_field(reader, "tokenizer.ggml.scores", [0.0] * len(tokens), kind=list)
    if len(scores) != len(tokens) or not all(isinstance(x, (int, float)) for x in scores):
        raise CheckpointError(f"{where}: tokenizer.ggml.scores does not give one number per token")
    proto = pb.ModelProto()
    for token, score, kind in zip(tokens, scores, types):
        proto.pieces.add(piece=token, score=float(score), type=kind if 1 <= kind <= 6 else _SP_NORMAL)
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = _SP_BYTE in types
    unk = gguf_field(reader, "tokenizer.ggml.unknown_token_id", None)
    if not isinstance(unk, int) or not 0 <= unk < len(tokens):
        unk = next((i for i, kind in enumerate(types) if kind == _SP_UNKNOWN), None)
    if unk is None:
        raise CheckpointError(f"{where}: a SentencePiece vocabulary needs an unknown token; this one has none")
    proto.pieces[unk].type = _SP_UNKNOWN
    proto.trainer_spec.unk_id = unk
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = bool(gguf_field(reader, "tokenizer.ggml.add_space_prefix", True))
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    return SentencePieceTokenizer(proto, where=where, **_gguf_ids(reader, tokens, default_add_bos=True))


# --- Hugging Face tokenizers --------------------------------------------------------------------

class HFTokenizer(Tokenizer):
    """Over a Hugging Face `tokenizers.Tokenizer` (from tokenizer.json or a GGUF "gpt2" vocabulary)."""

    def __init__(self, backend, *, where, stop_ids=(), **ids):
        self.backend = backend
        self.n_words = backend.get_vocab_size(with_added_tokens=True)
        self.added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}  # matched whole, never decoded
        specials = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.special_ids = frozenset(specials.values())
        self._set_ids(stop_ids={*stop_ids, *(i for t, i in specials.items() if t in END_OF_TURN_TEXTS)}, where=where, **ids)

    def _encode(self, s):
        return self.backend.encode(s, add_special_tokens=False).ids

    def _decode(self, ids):
        return self.backend.decode(ids, skip_special_tokens=False)

    def _token_bytes(self, token_id):
        if token_id in self.added:
            return self.added[token_id].encode("utf-8")
        return self._piece_bytes(self.backend.id_to_token(token_id) or "")

    @functools.cached_property
    def _piece_bytes(self):
        return _piece_decoder(json.loads(self.backend.to_str()).get("decoder"))


def _byte_level_alphabet() -> dict:
    """GPT-2's byte-level BPE spells each byte as a printable character: that character -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def _piece_decoder(decoder: "dict | None"):
    """A function vocabulary piece -> its bytes, by the tokenizer.json's decoder: byte-level pieces
    (GPT-2, Llama 3, Qwen2, SmolLM) map character by character; SentencePiece-style ones (Llama 2,
    Mistral as tokenizer.json) turn "▁" into a space and "<0xNN>" byte tokens into their byte."""
    steps = (decoder or {}).get("decoders", [decoder or {}]) if (decoder or {}).get("type") == "Sequence" else [decoder or {}]
    kinds = {step.get("type") for step in steps}
    if "ByteLevel" in kinds:
        alphabet = _byte_level_alphabet()
        return lambda piece: b"".join(bytes([alphabet[c]]) if c in alphabet else c.encode("utf-8") for c in piece)
    byte_fallback = "ByteFallback" in kinds

    def piece_bytes(piece):
        if byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    return piece_bytes


def json_tokenizer(path: Path) -> HFTokenizer:
    """tokenizer.json, with bos/eos/pad, add_bos and the chat template from the tokenizer_config.json
    and generation_config.json beside it when present."""
    from tokenizers import Tokenizer as Backend

    try:
        backend = Backend.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{path} is not a readable tokenizer.json ({str(e).splitlines()[0][:200]})") from None
    config = _json_beside(path, "tokenizer_config.json")
    generation = _json_beside(path, "generation_config.json")

    def token_id(value):  # a token's text, or {"content": text} as transformers saves AddedToken
        text = value.get("content") if isinstance(value, dict) else value
        return backend.token_to_id(text) if isinstance(text, str) else None

    declared_eos = generation.get("eos_token_id")
    declared_eos = declared_eos if isinstance(declared_eos, list) else [declared_eos]
    eos_id = token_id(config.get("eos_token"))
    if eos_id is None:
        eos_id = next((i for i in declared_eos if isinstance(i, int)), None)
    bos_id = token_id(config.get("bos_token"))
    if bos_id is None and isinstance(generation.get("bos_token_id"), int):
        bos_id = generation["bos_token_id"]
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # not stated: does the file's own post-processor put a bos first?
        add_bos = bos_id is not None and backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    jinja = path.parent / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return HFTokenizer(
        backend,
        where=path,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=token_id(config.get("pad_token")),
        stop_ids=[i for i in declared_eos if isinstance(i, int)],
        add_bos=add_bos,
        chat_template=template if isinstance(template, str) else None,
    )


def _json_beside(path: Path, name: str) -> dict:
    other = path.parent / name
    if not other.is_file():
        return {}
    try:
        value = json.loads(other.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{other} is not valid JSON ({e}); fix or remove it") from None
    return value if isinstance(value, dict) else {}


# Pre-tokenizer splits (the regexes the vocabularies' merges were learned with), by the name
# llama.cpp writes in tokenizer.ggml.pre.
_GPT2_SPLIT = None  # ByteLevel's own regex
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# name -> (split regex or None for GPT-2's, digits one by one first, BPE ignore_merges)
GGUF_PRE_TOKENIZERS = {
    "gpt-2": (_GPT2_SPLIT, False, False),
    "smollm": (_GPT2_SPLIT, True, False),  # SmolLM's tokenizer.json: Digits(individual) + ByteLevel
    "llama-bpe": (_LLAMA3_SPLIT, False, True),  # Llama 3 / 3.1 / 3.2
    "llama3": (_LLAMA3_SPLIT, False, True),
    "qwen2": (_QWEN2_SPLIT, False, False),
}


def _pre_tokenizer(split, digits):
    from tokenizers import Regex, pre_tokenizers

    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    return pre_tokenizers.Sequence(steps)


def _gguf_bpe(reader, tokens, types, where) -> HFTokenizer:
    """A GGUF "gpt2" vocabulary: byte-level BPE from its tokens, merges and named pre-tokenizer."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as Backend

    pre = gguf_field(reader, "tokenizer.ggml.pre", "default", kind=str)
    if pre not in GGUF_PRE_TOKENIZERS:
        raise CheckpointError(
            f"{where}: pre-tokenizer {pre!r} is not supported (supported: {', '.join(sorted(GGUF_PRE_TOKENIZERS))})"
        )
    split, digits, ignore_merges = GGUF_PRE_TOKENIZERS[pre]
    merges = gguf_field(reader, "tokenizer.ggml.merges", kind=list)
    if not all(isinstance(m, str) and " " in m for m in merges):
        raise CheckpointError(f"{where}: tokenizer.ggml.merges is not a list of 'left right' strings")
    try:
        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges],
                         ignore_merges=ignore_merges)
    except Exception as e:  # tokenizers raises a bare Exception, e.g. for a merge of unknown tokens
        raise CheckpointError(f"{where}: the BPE vocabulary is inconsistent ({e})") from None
    backend = Backend(bpe)
    backend.pre_tokenizer = _pre_tokenizer(split, digits)
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>...) and user-defined ones are matched whole in the text.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _SP_CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _SP_USER_DEFINED])
    return HFTokenizer(backend, where=where, **_gguf_ids(reader, tokens, default_add_bos=False))


# --- GGUF ---------------------------------------------------------------------------------------

def _gguf_ids(reader, tokens, default_add_bos):
    eos_id = gguf_field(reader, "tokenizer.ggml.eos_token_id", None)
    return dict(
        bos_id=gguf_field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_id=eos_id,
        pad_id=gguf_field(reader, "tokenizer.ggml.padding_token_id", None),
        stop_ids=[gguf_field(reader, f"tokenizer.ggml.{k}_token_id", None) for k in ("eot", "eom")],
        add_bos=gguf_field(reader, "tokenizer.ggml.add_bos_token", default_add_bos),
        chat_template=gguf_field(reader, "tokenizer.chat_template", None),
    )


def gguf_tokenizer(reader) -> Tokenizer:
    """The tokenizer embedded in a GGUF file's metadata."""
    where = reader.path
    kind = gguf_field(reader, "tokenizer.ggml.model")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise CheckpointError(f"{where}: tokenizer.ggml.tokens is not a list of strings")
    types = gguf_field(reader, "tokenizer.ggml.token_type", [_SP_NORMAL] * len(tokens))
    if not isinstance(types, list) or len(types) != len(tokens) or not all(isinstance(k, int) for k in types):
        raise CheckpointError(f"{where}: tokenizer.ggml.token_type does not give one integer type per token")
    if kind == "gpt2":
        return _gguf_bpe(reader, tokens, types, where)
    if kind == "llama":
        return _gguf_sentencepiece(reader, tokens, types, where)
    raise CheckpointError(
        f"{where}: tokenizer model {kind!r} is not supported; llama_lite reads 'gpt2' (byte-level BPE) and 'llama' (SentencePiece) vocabularies"
    )
