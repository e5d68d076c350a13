"""docs/errors.md's table, row by row: each bad input gives its one-line error (the rows not here
are tested beside their feature: loading/test_checkpoint, loading/test_formats, text/test_tokenizer*,
engine/test_generation, cli/test_scripts, text/test_chat_template)."""

import functools
import struct

import pytest

from llama_lite import CheckpointError
from tests.conftest import build_cpu
from tests.tiny_gguf import write_tiny_gguf

build = functools.partial(build_cpu, max_seq_len=64)


def one_line_error(path, match, kind=CheckpointError):
    with pytest.raises(kind, match=match) as info:
        build(path)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.fixture
def tiny(tmp_path):
    import gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    return path, path.read_bytes(), gguf.GGUFReader(path)


def patched(tmp_path, data: bytes, at: int, value: bytes):
    out = tmp_path / "bad.gguf"
    out.write_bytes(data[:at] + value + data[at + len(value) :])
    return out


def test_gguf_version_1(tmp_path, tiny):
    path, data, _ = tiny
    one_line_error(patched(tmp_path, data, 4, struct.pack("<I", 1)), "GGUF version 1; llama_lite reads versions 2 and 3")


@pytest.mark.parametrize("cut", ["header", "metadata", "tensor info", "tensor data"])
def test_truncated_gguf(tmp_path, tiny, cut):
    path, data, reader = tiny
    ends = {"header": 12, "metadata": reader.fields["tokenizer.ggml.tokens"].offset + 40,
            "tensor info": reader.tensors[3].field.offset + 10, "tensor data": len(data) - 100}
    (tmp_path / "cut.gguf").write_bytes(data[: ends[cut]])
    assert str(tmp_path / "cut.gguf") in one_line_error(tmp_path / "cut.gguf", "GGUF|metadata|tensors")


def test_a_2_to_the_40_element_array(tmp_path, tiny):
    path, data, reader = tiny
    field = reader.fields["tokenizer.ggml.tokens"]
    key_length = struct.unpack("<Q", data[field.offset : field.offset + 8])[0]
    count_at = field.offset + 8 + key_length + 4 + 4  # key, value type, item type, then the count
    assert struct.unpack("<Q", data[count_at : count_at + 8])[0] == 261
    one_line_error(patched(tmp_path, data, count_at, struct.pack("<Q", 2**40)), "damaged GGUF")


def dims_at(data, reader, index):
    info = reader.tensors[index].field.offset
    name_length = struct.unpack("<Q", data[info : info + 8])[0]
    return info + 8 + name_length + 4  # name, dimension count, then the first dimension


def test_a_negative_dimension(tmp_path, tiny):
    path, data, reader = tiny
    one_line_error(patched(tmp_path, data, dims_at(data, reader, 1), struct.pack("<q", -5)), "damaged GGUF")


def test_tensor_shapes_that_disagree_with_the_metadata(tmp_path, tiny):
    path, data, reader = tiny
    assert reader.tensors[1].name == "blk.0.attn_norm.weight"
    bad = patched(tmp_path, data, dims_at(data, reader, 1), struct.pack("<Q", 32))
    one_line_error(bad, "tensors do not match its metadata .*attention_norm")


def test_metadata_with_a_wrong_value_type(tmp_path):
    import gguf

    path = tmp_path / "typed.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.attention.head_count", 4)
    writer.add_uint32("llama.embedding_length", 64)
    writer.add_string("llama.block_count", "thirty")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    one_line_error(path, "llama.block_count' is a str, not a int")


def test_a_directory_and_an_unreadable_path(tmp_path):
    one_line_error(tmp_path, "is a folder with neither")
    one_line_error("/proc/self/mem", "cannot be read")  # a file whose read fails, even for root
    link = tmp_path / "loop.gguf"
    link.symlink_to(link)
    one_line_error(link, "does not exist", FileNotFoundError)
