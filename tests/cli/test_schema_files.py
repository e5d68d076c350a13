"""--json_schema's file and --regex edge cases (issue 33): each one `error:` line naming the flag and
what is wrong (a folder was "Is a directory (adir); check the path and the free space"), exit 2,
before the model loads."""

import json
import os

import pytest

from tests.cli.test_scripts import assert_fails, in_process

STDIN = "a prompt long enough to need a few tokens\n"


def fails_with(message, *args, name="chat.py"):
    done = in_process(name, *(["--prompt", "hi"] if name == "chat.py" else ["-"]), *map(str, args), stdin=STDIN)
    assert_fails(done, message)
    assert "free space" not in done.stderr and "Is a directory" not in done.stderr


@pytest.mark.parametrize("name", ["chat.py", "complete.py"])
def test_a_folder_is_named_as_a_folder(tmp_path, name):
    fails_with(f"--json_schema {tmp_path} is a folder; pass a JSON Schema file",
               "--json_schema", tmp_path, name=name)


def test_not_utf8_empty_and_blank_files(tmp_path):
    (tmp_path / "latin1.json").write_bytes(b'{"description": "caf\xe9"}')
    fails_with(f"--json_schema file {tmp_path / 'latin1.json'} is not UTF-8 text", "--json_schema", tmp_path / "latin1.json")
    for blank in ("", " \n"):
        (tmp_path / "blank.json").write_text(blank)
        fails_with(f"--json_schema file {tmp_path / 'blank.json'} is empty; write a JSON Schema in it",
                   "--json_schema", tmp_path / "blank.json")
    fails_with("--json_schema takes a JSON Schema file, got ''", "--json_schema", "")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file(tmp_path):
    locked = tmp_path / "locked.json"
    locked.write_text('{"type": "object"}')
    locked.chmod(0)
    fails_with(f"--json_schema file {locked} cannot be read (permission denied)", "--json_schema", locked)


def test_a_schema_or_regex_nothing_satisfies(tmp_path):
    loop = tmp_path / "loop.json"
    loop.write_text(json.dumps({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}))
    fails_with("no value satisfies --json_schema: it refers back to itself with no way to end", "--json_schema", loop)
    (tmp_path / "false.json").write_text("false")
    fails_with("no value satisfies --json_schema: false accepts no value", "--json_schema", tmp_path / "false.json",
               name="complete.py")
    fails_with("no text matches --regex: it admits no text at all", "--regex", r"[^\s\S]", name="complete.py")
