"""Every tokenizer back-end against its reference library: SentencePiece files against
`sentencepiece`, tokenizer.json against `tokenizers`, GGUF "llama" vocabularies and every supported
GGUF pre-tokenizer against transformers' `AutoTokenizer(gguf_file=)`."""

import shutil

import pytest

from llama_lite import CheckpointError, Llama, Tokenizer
from llama_lite.text.gguf_vocab import GGUF_PRE_TOKENIZERS
from llama_lite.text.hf_backend import HFTokenizer
from llama_lite.text.sentencepiece_backend import SentencePieceTokenizer
from tests.corpus import CORPUS, EXTRA
from tests.tiny_gguf import SHIPPED_SP_MODEL, write_tiny_gguf

TEXTS = CORPUS + EXTRA
SPECIAL_TEXT = ("<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>")


def plain(texts):
    return [t for t in texts if not any(s in t for s in SPECIAL_TEXT)]


@pytest.fixture(scope="module")
def sp_reference():
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(SHIPPED_SP_MODEL))


@pytest.fixture(scope="module")
def sp_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", vocab_kind="llama")


# --- the shipped SentencePiece model --------------------------------------------------------------

def test_shipped_model_is_reproducible_from_the_corpus(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train", SHIPPED_SP_MODEL.parent / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    again = train.train(model=tmp_path / "again.model")
    assert again.read_bytes() == SHIPPED_SP_MODEL.read_bytes()


def test_sentencepiece_file_matches_sentencepiece(sp_reference):
    tok = Tokenizer.from_file(SHIPPED_SP_MODEL)
    assert isinstance(tok, SentencePieceTokenizer)
    for text in plain(TEXTS):
        ids = tok.encode(text, False, False)
        assert ids == sp_reference.encode(text), text
        assert tok.decode(ids) == sp_reference.decode(ids) == text


def test_sentencepiece_ids_follow_meta(sp_reference):
    tok = Tokenizer.from_file(SHIPPED_SP_MODEL)
    assert (tok.bos_id, tok.eos_id, tok.n_words) == (1, 2, 4096)
    assert sp_reference.pad_id() == -1 and 0 <= tok.pad_id < tok.n_words  # Meta's -1 made valid
    assert tok.stop_ids == {2} and tok.add_bos
    assert tok.encode("hi", bos=True, eos=True) == [1, *sp_reference.encode("hi"), 2]


def test_sentencepiece_special_text_is_one_id(sp_reference):
    """sentencepiece itself spells "<s>" out; API.md wants its id. Text after a special token gets
    no dummy prefix space (as transformers' non-legacy Llama tokenizer), so decode round-trips."""
    tok = Tokenizer.from_file(SHIPPED_SP_MODEL)
    # (The exact ids of such text are checked against transformers in the GGUF test below.)
    assert tok.encode("</s>", False, False) == [2] != sp_reference.encode("</s>")
    for text in [t for t in TEXTS if t not in plain(TEXTS)]:
        ids = tok.encode(text, False, False)
        assert ids.count(1) == text.count("<s>") and ids.count(2) == text.count("</s>")
        assert tok.decode(ids) == text


# --- GGUF "llama" (SentencePiece) vocabularies ------------------------------------------------------

def test_gguf_sentencepiece_vocab_matches_transformers(sp_gguf, sp_reference):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(sp_gguf.parent, gguf_file=sp_gguf.name)
    ours = Tokenizer.from_file(sp_gguf)
    assert isinstance(ours, SentencePieceTokenizer)
    from_file = Tokenizer.from_file(SHIPPED_SP_MODEL)
    compared = 0
    for text in TEXTS:
        ids = ours.encode(text, False, False)
        assert ids == from_file.encode(text, False, False), text  # the same model, two containers
        want = hf.encode(text, add_special_tokens=False)
        if hf.decode(want) == text:  # where transformers round-trips, it is the reference
            assert ids == want, text
            compared += 1
        assert ours.decode(ids) == text
    assert compared >= len(TEXTS) - 3  # transformers misses only leading-space strings (see the note)
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (hf.bos_token_id, hf.eos_token_id, True)


# --- tokenizer.json ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm_json(hf_tokenizer, tmp_path_factory):
    """SmolLM2's tokenizer as transformers converts it from the GGUF, saved as tokenizer.json +
    tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("smollm-json")
    hf_tokenizer.save_pretrained(folder)
    return folder / "tokenizer.json"


def test_tokenizer_json_matches_tokenizers(smollm_json):
    from tokenizers import Tokenizer as Reference

    reference = Reference.from_file(str(smollm_json))
    ours = Tokenizer.from_file(smollm_json)
    assert isinstance(ours, HFTokenizer)
    for text in TEXTS:
        ids = ours.encode(text, False, False)
        assert ids == reference.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == text


def test_tokenizer_json_reads_its_config(smollm_json, llm):
    ours = Tokenizer.from_file(smollm_json)
    gguf_own = llm.tokenizer
    assert (ours.bos_id, ours.eos_id, ours.n_words, ours.add_bos) == (gguf_own.bos_id, gguf_own.eos_id, gguf_own.n_words, False)
    assert ours.stop_ids == gguf_own.stop_ids
    assert ours.chat_template == gguf_own.chat_template


def test_same_generation_with_the_equivalent_tokenizer_json(smollm_path, smollm_json, llm):
    other = Llama.build(smollm_path, tokenizer=smollm_json, max_seq_len=256, max_batch_size=2, device="cpu", dtype="float32")
    dialog = [{"role": "user", "content": "Say something about 한국어 and 🎉."}]
    prompts = ["The capital of France is", "Numbers: 1, 2, 3,"]
    assert (other.text_completion(prompts, max_gen_len=16, temperature=0)
            == llm.text_completion(prompts, max_gen_len=16, temperature=0))
    assert (other.chat_completion([dialog], max_gen_len=24, temperature=0)
            == llm.chat_completion([dialog], max_gen_len=24, temperature=0))


# --- GGUF "gpt2" pre-tokenizers ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm_vocabulary(smollm_path):
    """SmolLM2's tokens, token types and merges, read once (gguf-py takes seconds)."""
    import gguf

    source = gguf.GGUFReader(smollm_path)
    return {key: source.fields[key].contents() for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                                           "tokenizer.ggml.merges")}


@pytest.mark.parametrize("pre", sorted(GGUF_PRE_TOKENIZERS))
def test_every_supported_pre_tokenizer_matches_transformers(pre, smollm_vocabulary, tmp_path):
    """SmolLM2's vocabulary and merges relabelled with each pre-tokenizer name: the split must be the
    one transformers applies for that name."""
    import gguf

    transformers = pytest.importorskip("transformers")
    path = tmp_path / f"{pre}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    for key, add in [("tokenizer.ggml.tokens", writer.add_token_list), ("tokenizer.ggml.token_type", writer.add_token_types),
                     ("tokenizer.ggml.merges", writer.add_token_merges)]:
        add(smollm_vocabulary[key])
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = Tokenizer.from_file(path)
    for text in TEXTS:
        assert ours.encode(text, False, False) == hf.encode(text, add_special_tokens=False), (pre, text)


# --- choosing the back-end ---------------------------------------------------------------------------

def test_back_end_is_chosen_by_content_not_name(tmp_path, smollm_json):
    shutil.copy(SHIPPED_SP_MODEL, tmp_path / "vocab.bin")
    assert isinstance(Tokenizer.from_file(tmp_path / "vocab.bin"), SentencePieceTokenizer)
    shutil.copy(smollm_json, tmp_path / "tok.txt")
    assert isinstance(Tokenizer.from_file(tmp_path / "tok.txt"), HFTokenizer)


@pytest.mark.parametrize("content", [b"", b"hello world\n", b"{not json", b"\x00\x01\x02garbage" * 10, b'{"model": 3}'])
def test_unreadable_tokenizer_files_are_one_line_errors(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        Tokenizer.from_file(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_override_with_a_vocabulary_too_big_for_the_model(tiny_gguf):
    with pytest.raises(CheckpointError, match="tokenizer has 4096 tokens but the model only"):
        Llama.build(tiny_gguf, tokenizer=SHIPPED_SP_MODEL, max_seq_len=64)


# --- token bytes (structured output works on bytes) --------------------------------------------------

def test_token_bytes_join_to_the_text_on_every_back_end(llm, smollm_json, sp_gguf, tmp_path):
    """For each back-end, the bytes of a text's tokens are its UTF-8, special tokens spelled out, also
    where a token holds part of a character (decode() of it alone shows U+FFFD; OpenAI's logprobs give
    these bytes so that joined they rebuild the text); SentencePiece vocabularies (tokenizer.model, GGUF
    "llama", a converted tokenizer.json) put the dummy space first, which decode drops."""
    transformers = pytest.importorskip("transformers")
    sp_json = tmp_path / "sp-json"
    transformers.AutoTokenizer.from_pretrained(sp_gguf.parent, gguf_file=sp_gguf.name).save_pretrained(sp_json)
    back_ends = [(llm.tokenizer, False), (Tokenizer.from_file(smollm_json), False), (Tokenizer.from_file(SHIPPED_SP_MODEL), True),
                 (Tokenizer.from_file(sp_gguf), True), (Tokenizer.from_file(sp_json / "tokenizer.json"), True)]
    for tok, dummy_space in back_ends:
        partial = 0
        for text in TEXTS:
            ids = tok.encode(text, False, False)
            first_is_text = bool(ids) and ids[0] not in tok.special_ids
            want = (b" " if dummy_space and first_is_text else b"") + tok.decode(ids).encode("utf-8")
            assert b"".join(tok.token_bytes(i) for i in ids) == want, (type(tok).__name__, text)
            # logprobs: the first token at_start drops the dummy space, so the bytes are the decoded text's
            pieces = [tok.token_bytes(i, at_start=n == 0) for n, i in enumerate(ids)]
            assert b"".join(pieces) == tok.decode(ids).encode("utf-8"), (type(tok).__name__, text)
            partial += sum(p.decode("utf-8", "replace") != p.decode("utf-8", "ignore") for p in pieces)
        assert partial, f"{type(tok).__name__}: no token held part of a character; the check is void"
        assert tok.token_bytes(tok.eos_id) == tok.decode([tok.eos_id]).encode() and tok.eos_id in tok.special_ids
        with pytest.raises(ValueError, match="token id must be"):
            tok.token_bytes(tok.n_words)
