"""The fire scripts end to end in a subprocess, compared with the Python API on the same input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--dtype", "float32", "--device", "cpu", "--temperature", "0", "--max_seq_len", "512"]


def script(name, *args, stdin=""):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=300)


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
    prompts = ["The capital of France is", "", "def square(x):", "Once upon a time"]
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out.jsonl"
    done = script("complete.py", source, "--out", out, "--max_gen_len", "12", *FLAGS)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    kept = [p for p in prompts if p]
    want = llm.text_completion(kept, max_gen_len=12, temperature=0)
    assert lines == [{"prompt": p, "generation": w["generation"]} for p, w in zip(kept, want)]


def test_complete_reads_jsonl_from_stdin_and_keeps_fields(tmp_path):
    source = tmp_path / "p.jsonl"
    source.write_text(json.dumps({"prompt": "Hello", "id": 7}) + "\n")
    done = script("complete.py", source, "--max_gen_len", "4", *FLAGS)
    assert done.returncode == 0, done.stderr
    [line] = [json.loads(x) for x in done.stdout.splitlines()]
    assert line["id"] == 7 and line["prompt"] == "Hello" and isinstance(line["generation"], str)
    piped = script("complete.py", "-", "--max_gen_len", "4", *FLAGS, stdin="Hello\n")
    assert json.loads(piped.stdout)["generation"] == line["generation"]


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("chat.py", ["--prompt", "hi", "--top_p", "1.5"], "top_p"),
        ("chat.py", ["--prompt", "hi", "--temperature", "-1"], "temperature"),
        ("chat.py", ["--prompt", "hi", "--checkpoint", "/no/such/model.gguf"], "does not exist"),
        ("chat.py", ["--prompt", "hi", "--checkpoint", __file__], "not a GGUF file"),
        ("complete.py", ["/no/such/prompts.txt"], "does not exist"),
        ("complete.py", ["-", "--top_k", "0"], "top_k"),
        ("complete.py", ["-", "--max_gen_len", "508", "--max_seq_len", "512"], "line 1"),
    ],
)
def test_bad_input_exits_2_with_one_line(name, args, message):
    done = script(name, *args, stdin="a prompt long enough to need a few tokens\n")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.split("\n") if "error" in line.lower()]  # progress bars aside
    assert len(errors) == 1 and errors[0].rsplit("\r", 1)[-1].lstrip().startswith("error: "), done.stderr
    assert message in errors[0]
