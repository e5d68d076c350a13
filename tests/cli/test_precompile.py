"""chat.py --precompile: the path measured (or asked for) and the compiled step built now, then exit;
a value it does not take is refused before any work."""

import pytest

from tests.cli.test_scripts import assert_fails, in_process
from tests.tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("precompile") / "tiny.gguf")


def test_precompile_takes_no_value(tiny):
    assert_fails(in_process("chat.py", "--precompile=yes", "--checkpoint", tiny),
                 "--precompile takes no value (or True/False), got 'yes'")


def test_precompile_says_the_path_and_exits(tiny, tmp_path, monkeypatch):
    """Measured where nothing is asked (a choice file appears, stdout says the path and why); with
    --nocompile it builds nothing and says so."""
    monkeypatch.setenv("LLAMA_LITE_CACHE", str(tmp_path))
    done = in_process("chat.py", "--precompile", "--checkpoint", tiny, "--device", "cpu", "--max_seq_len", "64",
                      "--nocompile")
    assert done.returncode == 0, done.stderr
    path = done.stdout.split(":")[0]
    assert path in ("bfloat16", "float32") and "decoding eager; its layer products" in done.stdout
    assert list((tmp_path / "paths").glob("*.json"))
    done = in_process("chat.py", "--precompile", "--checkpoint", tiny, "--dtype", "float32", "--nocompile")
    assert done.stdout == "float32: decoding eager; asked for (dtype='float32')\n"
