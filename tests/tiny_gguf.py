"""Tiny random Llama GGUF files, written with gguf-py's own writer, for fast and failure-path tests."""

from pathlib import Path

import numpy as np


def byte_alphabet():
    """GPT-2's printable spelling of the 256 bytes, the alphabet of byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    spelled, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelled[b] = chr(b)
        else:
            spelled[b] = chr(256 + extra)
            extra += 1
    return [spelled[b] for b in range(256)]


TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


SHIPPED_SP_MODEL = Path(__file__).resolve().parent.parent / "tokenizer" / "llama_lite_sp.model"


def sentencepiece_vocab(model=SHIPPED_SP_MODEL):
    """(pieces, scores, types) of a SentencePiece model, as llama.cpp's converter writes them."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model).read_bytes())
    return [p.piece for p in proto.pieces], [p.score for p in proto.pieces], [p.type for p in proto.pieces]


def random_blocks(rows, cols, qtype, rng):
    """Valid blocks of a quantized type gguf-py cannot write: random bytes below 0x20, so every
    float16 scale inside is finite and below 1/128, and weights stay moderate."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return rng.integers(0, 0x20, size=(rows, cols // block * size), dtype=np.uint8)


def write_tiny_gguf(path, *, arch="llama", pre="smollm", vocab_kind="gpt2", n_layers=2, dim=64, n_heads=4,
                    n_kv_heads=2, hidden=96, context=256, seed=0, tie=True, extra_tensors=(), weight_type="F32"):
    """A random tiny Llama. vocab_kind "gpt2": a byte-level vocabulary (3 control tokens, 256 bytes,
    2 merges); "llama": the shipped SentencePiece model's vocabulary, with scores and byte tokens.
    weight_type: the GGML type of every matrix, or a list of types taken in turn (norms stay F32);
    gguf-py quantizes what it can."""
    import gguf

    rng = np.random.default_rng(seed)
    if vocab_kind == "gpt2":
        tokens = TINY_SPECIALS + byte_alphabet() + ["he", "the"]
        types = [3] * len(TINY_SPECIALS) + [1] * (len(tokens) - len(TINY_SPECIALS))
    else:
        tokens, scores, types = sentencepiece_vocab()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_context_length(context)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(hidden)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model(vocab_kind)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if vocab_kind == "gpt2":
        w.add_tokenizer_pre(pre)
        w.add_token_merges(["h e", "t he"])
        w.add_add_bos_token(False)
        w.add_chat_template(CHATML)
    else:
        w.add_token_scores(scores)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(True)

    def vector(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    types = [gguf.GGMLQuantizationType[t] for t in ([weight_type] if isinstance(weight_type, str) else weight_type)]
    matrices = 0

    def weight(*shape):  # the next matrix, in the next of `types`
        nonlocal matrices
        qtype = types[matrices % len(types)]
        matrices += 1
        if qtype == gguf.GGMLQuantizationType.F32:
            return vector(*shape)
        try:
            return qtype, gguf.quants.quantize(vector(*shape), qtype)
        except NotImplementedError:  # the k-quants: gguf-py reads them but cannot write them
            return qtype, random_blocks(*shape, qtype, rng)

    def add(name, array):  # quantized blocks arrive as bytes, with their type named
        qtype, array = array if isinstance(array, tuple) else (None, array)
        w.add_tensor(name, array, raw_dtype=qtype if array.dtype == np.uint8 else None)

    head_dim = dim // n_heads
    add("token_embd.weight", weight(vocab, dim))
    for i in range(n_layers):
        add(f"blk.{i}.attn_norm.weight", 1 + vector(dim))
        add(f"blk.{i}.attn_q.weight", weight(dim, dim))
        add(f"blk.{i}.attn_k.weight", weight(n_kv_heads * head_dim, dim))
        add(f"blk.{i}.attn_v.weight", weight(n_kv_heads * head_dim, dim))
        add(f"blk.{i}.attn_output.weight", weight(dim, dim))
        add(f"blk.{i}.ffn_norm.weight", 1 + vector(dim))
        add(f"blk.{i}.ffn_gate.weight", weight(hidden, dim))
        add(f"blk.{i}.ffn_up.weight", weight(hidden, dim))
        add(f"blk.{i}.ffn_down.weight", weight(dim, hidden))
    add("output_norm.weight", 1 + vector(dim))
    if not tie:
        add("output.weight", weight(vocab, dim))
    for name, array in extra_tensors:
        add(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
