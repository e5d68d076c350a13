"""The GGUF byte-level BPE tokenizer (SmolLM2's) against transformers' AutoTokenizer on the same file."""

import pytest

from llama_lite import CheckpointError, Tokenizer
from tests.corpus import CORPUS
from tests.tiny_gguf import write_tiny_gguf


@pytest.mark.parametrize("text", CORPUS)
def test_ids_match_transformers(llm, hf_tokenizer, text):
    ours = llm.tokenizer.encode(text, bos=False, eos=False)
    assert ours == hf_tokenizer.encode(text, add_special_tokens=False)
    assert llm.tokenizer.decode(ours) == text


def test_special_tokens_are_single_ids(llm):
    tok = llm.tokenizer
    assert tok.encode("<|im_start|>", False, False) == [1]
    assert tok.encode("<|im_end|>", False, False) == [2]
    assert tok.encode("<|endoftext|>", False, False) == [0]


def test_ids_and_flags_from_the_file(llm):
    tok = llm.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.n_words) == (1, 2, 49152)
    assert 0 <= tok.pad_id < tok.n_words
    assert tok.stop_ids == frozenset({2, 0, 1})  # <|im_end|> (eos), <|endoftext|>, <|im_start|> (its chat template's)
    assert tok.add_bos is False
    assert tok.encode("hi", bos=True, eos=True) == [1, *tok.encode("hi", False, False), 2]
    assert "<|im_start|>" in tok.chat_template


def test_from_file_reads_a_gguf(smollm_path, llm):
    tok = Tokenizer.from_file(smollm_path)
    assert isinstance(tok, Tokenizer)
    assert tok.encode(CORPUS[3], False, False) == llm.tokenizer.encode(CORPUS[3], False, False)


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    path = write_tiny_gguf(tmp_path / "odd.gguf", pre="made-up-pre")
    with pytest.raises(CheckpointError, match="pre-tokenizer 'made-up-pre' is not supported.*smollm"):
        Tokenizer.from_file(path)


def test_wrong_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_file(tmp_path / "missing.model")
    text = tmp_path / "vocab.txt"
    text.write_text("not a tokenizer")
    with pytest.raises(CheckpointError, match="not a tokenizer file"):
        Tokenizer.from_file(text)


def test_bad_arguments(llm):
    with pytest.raises(ValueError, match="can only encode text"):
        llm.tokenizer.encode(b"bytes", False, False)
    with pytest.raises(ValueError, match="token ids must lie in"):
        llm.tokenizer.decode([49152])
