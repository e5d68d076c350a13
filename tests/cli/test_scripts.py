"""The fire scripts end to end in a subprocess, compared with the Python API on the same input."""

import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

FLAGS = ["--dtype", "float32", "--device", "cpu", "--temperature", "0", "--max_seq_len", "512"]


def script(name, *args, stdin=""):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=300)


def in_process(name, *args, stdin=""):
    """`script` run inside this process through the same `cli.run` (argv, stdin, stdout, stderr and
    the exit code swapped in): no interpreter and torch start-up, for checks that end before work."""
    from llama_lite import cli

    command = {"chat.py": cli.chat, "complete.py": cli.complete, "serve.py": cli.serve}[name]
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, sys.stdin, sys.stdout, sys.stderr, signal.getsignal(signal.SIGTERM)
    sys.argv, sys.stdin, sys.stdout, sys.stderr = [name, *map(str, args)], io.StringIO(stdin), out, err
    try:
        cli.run(command)
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv, sys.stdin, sys.stdout, sys.stderr = saved[:4]
        signal.signal(signal.SIGTERM, saved[4])
    return subprocess.CompletedProcess([name, *args], code, out.getvalue(), err.getvalue())


def assert_fails(done, message):
    """Exit 2 with one `error: ...` line holding `message` on stderr (progress bars aside), no traceback."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.split("\n") if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].rsplit("\r", 1)[-1].lstrip().startswith("error: "), done.stderr
    assert message in errors[0], done.stderr


def test_chat_prompt_prints_one_reply(llm):
    done = script("chat.py", "--prompt", "What is the capital of France?", "--max_gen_len", "24", *FLAGS)
    assert done.returncode == 0, done.stderr
    dialog = [{"role": "user", "content": "What is the capital of France?"}]
    [want] = llm.chat_completion([dialog], max_gen_len=24, temperature=0)
    assert done.stdout == want["generation"]["content"] + "\n"
    assert done.stdout.strip()


def test_chat_keeps_history_over_a_pipe(llm):
    turns = ["My favourite fruit is mango. Just say OK.", "/reset", "The secret code is 4729.", "Repeat the secret code."]
    done = script("chat.py", "--max_gen_len", "20", *FLAGS, stdin="\n".join(turns) + "\n")
    assert done.returncode == 0, done.stderr
    assert not done.stdout.startswith(">")  # no prompt marker on a pipe
    assert "(history cleared)" in done.stderr
    dialog, replies = [], []
    for turn in turns:
        if turn == "/reset":
            dialog = []
            continue
        dialog.append({"role": "user", "content": turn})
        reply = llm.chat_completion([dialog], max_gen_len=20, temperature=0)[0]["generation"]["content"]
        dialog.append({"role": "assistant", "content": reply})
        replies.append(reply)
    assert done.stdout == "".join(r + "\n" for r in replies)
    assert "4729" in replies[-1]  # the second answer uses the first turn ...
    alone = llm.chat_completion([[{"role": "user", "content": turns[-1]}]], max_gen_len=20, temperature=0)
    assert "4729" not in alone[0]["generation"]["content"]  # ... which it cannot know without it


def test_complete_matches_text_completion(llm, tmp_path):
    prompts = [f"Fact number {n} about {topic}:" for n, topic in enumerate(["cats", "the moon", "rivers", "bread"] * 5)]
    prompts[3] = "Write the word hello in Korean: 안녕"
    prompts.insert(7, "")  # an empty line: skipped, and counted on stderr
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out.jsonl"
    done = script("complete.py", source, "--out", out, "--max_gen_len", "8", *FLAGS)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "skipped 1 empty line" in done.stderr and "tok/s" in done.stderr
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    kept = [p for p in prompts if p]
    assert len(kept) == 20
    want = llm.text_completion(kept, max_gen_len=8, temperature=0)
    assert lines == [{"prompt": p, "generation": w["generation"]} for p, w in zip(kept, want)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "prompts.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as any new file, not a temporary file's 0600


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_complete_keeps_its_finished_lines(llm, tmp_path, signum):
    source = tmp_path / "prompts.txt"
    source.write_text("".join(f"Once upon a time, in the land of number {n}, there lived\n" for n in range(40)))
    out = tmp_path / "out.jsonl"
    args = [sys.executable, str(ROOT / "scripts" / "complete.py"), str(source), "--out", str(out),
            "--max_gen_len", "16", "--max_batch_size", "2", *FLAGS]
    partial = tmp_path / "out.jsonl.partial"
    proc = subprocess.Popen(args, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    while not (partial.exists() and partial.read_text()):  # some prompts done, most not
        assert proc.poll() is None, "finished before it could be interrupted"
        time.sleep(0.05)
    proc.send_signal(signum)
    assert proc.wait(timeout=60) in (130, 143)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl.partial", "prompts.txt"]  # no out.jsonl yet
    kept = partial.read_text().splitlines()
    prompts = source.read_text().splitlines()[: len(kept)]
    assert 0 < len(kept) < 40
    want = llm.text_completion(prompts, max_gen_len=16, temperature=0)
    assert kept == [json.dumps({"prompt": p, "generation": w["generation"]}) for p, w in zip(prompts, want)]


def test_complete_reads_jsonl_from_stdin_and_keeps_fields(tmp_path):
    source = tmp_path / "p.jsonl"
    source.write_text(json.dumps({"prompt": "Hello", "id": 7}) + "\n")
    done = script("complete.py", source, "--max_gen_len", "4", *FLAGS)
    assert done.returncode == 0, done.stderr
    [line] = [json.loads(x) for x in done.stdout.splitlines()]
    assert line["id"] == 7 and line["prompt"] == "Hello" and isinstance(line["generation"], str)
    piped = script("complete.py", "-", "--max_gen_len", "4", *FLAGS, stdin="Hello\n")
    assert json.loads(piped.stdout)["generation"] == line["generation"]


def test_complete_and_chat_hold_to_a_json_schema_or_regex(llm, tmp_path):
    """--json_schema FILE and --regex give what the API gives with the same constraint; a schema
    keyword that cannot be enforced is one error line before any work."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                               "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
              "required": ["name", "legs"], "additionalProperties": False}
    schema_file = tmp_path / "animal.schema.json"
    schema_file.write_text(json.dumps(schema))
    prompts = ["A cat as JSON:", "A spider as JSON:"]
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(prompts) + "\n")
    done = in_process("complete.py", source, "--json_schema", schema_file, "--max_gen_len", "40", *FLAGS)
    assert done.returncode == 0, done.stderr
    want = llm.text_completion(prompts, max_gen_len=40, temperature=0, json_schema=schema)
    assert [json.loads(line)["generation"] for line in done.stdout.splitlines()] == [w["generation"] for w in want]
    for w in want:
        jsonschema.validate(json.loads(w["generation"]), schema)
    done = in_process("complete.py", source, "--regex", "[0-9]{3}-[0-9]{4}", "--max_gen_len", "12", *FLAGS)
    assert all(re.fullmatch("[0-9]{3}-[0-9]{4}", json.loads(line)["generation"]) for line in done.stdout.splitlines())
    done = in_process("chat.py", "--prompt", "Describe a dog.", "--json_schema", schema_file, "--max_gen_len", "40", *FLAGS)
    [reply] = llm.chat_completion([[{"role": "user", "content": "Describe a dog."}]], max_gen_len=40, temperature=0,
                                  json_schema=schema)
    assert done.returncode == 0 and done.stdout == reply["generation"]["content"] + "\n"
    schema_file.write_text(json.dumps({"type": "array", "uniqueItems": True}))
    done = in_process("complete.py", source, "--json_schema", schema_file, *FLAGS)
    assert_fails(done, 'error: --json_schema cannot be enforced: Unimplemented keys: ["uniqueItems"]')
    assert "loading" not in done.stderr


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("chat.py", ["--prompt", "hi", "--top_p", "1.5"], "top_p"),
        ("chat.py", ["--prompt", "hi", "--temperature", "-1"], "temperature"),
        ("chat.py", ["--prompt", "hi", "--checkpoint", "/no/such/model.gguf"], "does not exist"),
        ("chat.py", ["--prompt", "hi", "--checkpoint", __file__], "not a GGUF file"),
        ("complete.py", ["/no/such/prompts.txt"], "does not exist"),
        ("complete.py", ["-", "--top_k", "0"], "top_k"),
        ("complete.py", ["-", "--bogus", "1"], "unknown flag --bogus"),
        ("chat.py", ["--promt", "hi"], "unknown flag --promt"),
        ("complete.py", [__file__ + "x", "--out", "/no/such/folder/out.jsonl"], "--out"),
        ("complete.py", ["-", "--max_gen_len", "508", "--max_seq_len", "512"], "line 1"),
        ("complete.py", ["-", "--json_schema", "/no/such/schema.json"], "--json_schema file /no/such/schema.json does not exist"),
        ("chat.py", ["--prompt", "hi", "--json_schema", __file__], "is not valid JSON"),
        ("chat.py", ["--prompt", "hi", "--chat_template", "/no/such.jinja"], "chat template file /no/such.jinja does not exist"),
        ("complete.py", ["-", "--regex", "(?=a)b"],
         "--regex cannot be enforced: invalid regex \"(?=a)b\" (in regex): regex parse error (error: look-around"),
    ],
)
def test_bad_input_exits_2_with_one_line(name, args, message):
    assert_fails(in_process(name, *args, stdin="a prompt long enough to need a few tokens\n"), message)


def test_installed_commands_show_every_flag_with_its_default():
    bin_dir = Path(sys.executable).parent
    for command, flags in [("llama-lite-chat", ["--system", "--prompt", "--top_k", "--seed"]),
                           ("llama-lite-complete", ["--out", "--max_batch_size", "--checkpoint"])]:
        done = subprocess.run([str(bin_dir / command), "--help"], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PAGER": "cat"})
        assert done.returncode == 0, done.stderr
        shown = done.stdout
        for flag in flags + ["--temperature", "--top_p", "--max_gen_len", "--device", "--dtype"]:
            assert flag in shown
        assert "Default: 0.9" in shown  # top_p


class Terminal:
    """chat.py on a pseudo-terminal, as a person at a keyboard runs it."""

    def __init__(self, *args):
        main, child = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "chat.py"), *args],
                                     stdin=child, stdout=child, stderr=subprocess.DEVNULL, close_fds=True)
        os.close(child)
        self.fd, self.screen, self.seen = main, "", 0

    def read_until(self, text, timeout=120):
        """Wait for `text` to appear after everything read_until has already matched."""
        end = time.time() + timeout
        while text not in self.screen[self.seen :]:
            assert time.time() < end, f"never saw {text!r} in {self.screen[self.seen:]!r}"
            if select.select([self.fd], [], [], 1)[0]:
                self.screen += os.read(self.fd, 4096).decode(errors="replace")
        self.seen = self.screen.index(text, self.seen) + len(text)

    def type(self, line):
        os.write(self.fd, (line + "\n").encode())


def test_chat_on_a_terminal(llm):
    turns = ["The secret code is 4729.", "Repeat the secret code."]
    dialog, want, replies = [], "", []
    for turn in turns:  # the expected replies first: two processes computing at once on two cores crawl
        dialog.append({"role": "user", "content": turn})
        replies.append(llm.chat_completion([dialog], max_gen_len=20, temperature=0)[0]["generation"]["content"])
        dialog.append({"role": "assistant", "content": replies[-1]})
        want += f"> {turn}\r\n{replies[-1]}\r\n"
    term = Terminal("--max_gen_len", "20", *FLAGS)
    term.read_until("> ")
    for turn, reply in zip(turns, replies):
        term.type(turn)
        term.read_until(reply + "\r\n> ")
    term.type("/exit")
    assert term.proc.wait(timeout=60) == 0
    assert term.screen.replace("\r\n", "\n").startswith(want.replace("\r\n", "\n"))


def test_ctrl_c_stops_a_reply_then_exits_130_at_the_prompt():
    term = Terminal("--max_gen_len", "400", *FLAGS)
    term.read_until("> ")
    term.type("Write a very long essay about the history of bread.")
    term.read_until("essay about the history of bread.\r\n")
    time.sleep(3)
    if select.select([term.fd], [], [], 0)[0]:
        term.screen += os.read(term.fd, 4096).decode(errors="replace")
    assert "\r\n> " not in term.screen[term.seen :]  # the reply is still streaming
    term.proc.send_signal(signal.SIGINT)
    term.read_until("> ", timeout=60)  # back at the prompt, not dead
    term.type("Say hi.")
    term.read_until("Say hi.\r\n")
    term.read_until("\r\n> ")  # a whole new reply, then the prompt again
    term.proc.send_signal(signal.SIGINT)
    assert term.proc.wait(timeout=60) == 130
