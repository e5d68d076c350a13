"""The Hugging Face `tokenizers` back-end: a tokenizer.json with the configs beside it, and the
byte-level BPE a GGUF "gpt2" vocabulary is rebuilt as (gguf_vocab.py)."""

import functools
import json
import re
from pathlib import Path

from ..errors import CheckpointError
from .tokenizer import END_OF_TURN_TEXTS, Tokenizer


class HFTokenizer(Tokenizer):
    """Over a Hugging Face `tokenizers.Tokenizer` (from tokenizer.json or a GGUF "gpt2" vocabulary)."""

    def __init__(self, backend, *, where, stop_ids=(), **ids):
        self.backend = backend
        self.n_words = backend.get_vocab_size(with_added_tokens=True)
        self.added_text = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}  # matched whole, never decoded
        specials = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.special_ids = frozenset(specials.values())
        self._set_ids(stop_ids={*stop_ids, *(i for t, i in specials.items() if t in END_OF_TURN_TEXTS)}, where=where, **ids)

    def _encode(self, s):
        return self.backend.encode(s, add_special_tokens=False).ids

    def _decode(self, ids):
        return self.backend.decode(ids, skip_special_tokens=False)

    def _token_bytes(self, token_id):
        if token_id in self.added_text:
            return self.added_text[token_id].encode("utf-8")
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
