"""A GGUF file's embedded vocabulary as a tokenizer: "llama" (SentencePiece) vocabularies rebuilt as
the SentencePiece model they were converted from, "gpt2" ones as byte-level BPE with their merges and
named pre-tokenizer (`tokenizers`)."""

from ..errors import CheckpointError
from ..loading.gguf_file import gguf_field
from .hf_backend import HFTokenizer
from .sentencepiece_backend import SP_BYTE, SP_CONTROL, SP_NORMAL, SP_UNKNOWN, SP_USER_DEFINED, SentencePieceTokenizer
from .tokenizer import Tokenizer

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
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
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
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == SP_CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == SP_USER_DEFINED])
    return HFTokenizer(backend, where=where, **_gguf_ids(reader, tokens, default_add_bos=False))


def _gguf_sentencepiece(reader, tokens, types, where) -> SentencePieceTokenizer:
    """A GGUF "llama" vocabulary rebuilt as the SentencePiece BPE model it was converted from."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    scores = gguf_field(reader, "tokenizer.ggml.scores", [0.0] * len(tokens), kind=list)
    if len(scores) != len(tokens) or not all(isinstance(x, (int, float)) for x in scores):
        raise CheckpointError(f"{where}: tokenizer.ggml.scores does not give one number per token")
    proto = pb.ModelProto()
    for token, score, kind in zip(tokens, scores, types):
        proto.pieces.add(piece=token, score=float(score), type=kind if 1 <= kind <= 6 else SP_NORMAL)
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = SP_BYTE in types
    unk = gguf_field(reader, "tokenizer.ggml.unknown_token_id", None)
    if not isinstance(unk, int) or not 0 <= unk < len(tokens):
        unk = next((i for i, kind in enumerate(types) if kind == SP_UNKNOWN), None)
    if unk is None:
        raise CheckpointError(f"{where}: a SentencePiece vocabulary needs an unknown token; this one has none")
    proto.pieces[unk].type = SP_UNKNOWN
    proto.trainer_spec.unk_id = unk
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = bool(gguf_field(reader, "tokenizer.ggml.add_space_prefix", True))
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    return SentencePieceTokenizer(proto, where=where, **_gguf_ids(reader, tokens, default_add_bos=True))


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
    types = gguf_field(reader, "tokenizer.ggml.token_type", [SP_NORMAL] * len(tokens))
    if not isinstance(types, list) or len(types) != len(tokens) or not all(isinstance(k, int) for k in types):
        raise CheckpointError(f"{where}: tokenizer.ggml.token_type does not give one integer type per token")
    if kind == "gpt2":
        return _gguf_bpe(reader, tokens, types, where)
    if kind == "llama":
        return _gguf_sentencepiece(reader, tokens, types, where)
    raise CheckpointError(
        f"{where}: tokenizer model {kind!r} is not supported; "
        "llama_lite reads 'gpt2' (byte-level BPE) and 'llama' (SentencePiece) vocabularies"
    )
