"""Text to token ids and back, behind one interface whatever the back-end.

`Tokenizer` is the interface (Meta's `encode(s, bos, eos)` / `decode(ids)` plus the ids generation
needs). Two classes do the work, each over the reference library of its kind:
- `SentencePieceTokenizer` (sentencepiece_backend.py, the `sentencepiece` library): a
  tokenizer.model, or a GGUF whose vocabulary is of the "llama" (SentencePiece) kind, rebuilt as a
  SentencePiece model;
- `HFTokenizer` (hf_backend.py, the `tokenizers` library): a tokenizer.json, or a GGUF "gpt2"
  (byte-level BPE) vocabulary with its merges and named pre-tokenizer.
A GGUF's vocabulary becomes one or the other (gguf_vocab.py). `Tokenizer.from_file` picks by the
file's content, never by a model's name. Back-end libraries are imported only when used.
"""

from pathlib import Path

from ..checks import is_whole
from ..errors import CheckpointError

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
            raise ValueError(f"the text holds {s[e.start]!r} at {e.start}, a lone surrogate, which is not text; "
                             "pass valid Unicode") from None
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
        if not is_whole(token_id) or not 0 <= token_id < self.n_words:
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
        from ..loading.gguf_file import open_gguf
        from .gguf_vocab import gguf_tokenizer
        from .hf_backend import json_tokenizer
        from .sentencepiece_backend import sentencepiece_file, sentencepiece_proto

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
                proto = sentencepiece_proto(path.read_bytes())
                if proto is not None:
                    return sentencepiece_file(proto, path)
        raise CheckpointError(f"{path} is not a tokenizer file llama_lite can read; pass {SUPPORTED_FILES}")

