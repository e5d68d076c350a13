"""The command line at its edges with the operating system: every failure one `error:` line and
exit 2 (a closed pipe a quiet 141), nothing half-written, no finished work lost, text as typed."""

import inspect
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from llama_lite import Llama
from llama_lite.cli import chat, complete, serve
from llama_lite.cli.prompt_files import FileResults, read_prompts
from llama_lite.cli.runner import _as_typed
from llama_lite.model.devices import CpuLoad, default_threads
from llama_lite.model.kv_cache import KVCache
from llama_lite.model.transformer import ModelArgs
from tests.cli.test_scripts import FLAGS, assert_fails, in_process, script
from tests.conftest import ROOT
from tests.tiny_gguf import SHIPPED_SP_MODEL, write_tiny_gguf

COMPLETE = [sys.executable, str(ROOT / "scripts" / "complete.py")]
CHAT = [sys.executable, str(ROOT / "scripts" / "chat.py")]
MODEL_FLAGS = ["--dtype", "float32", "--device", "cpu"]  # FLAGS without the context and the temperature


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Once upon a time\nThe sky is\n")
    return path


def test_out_is_checked_before_any_work(tmp_path, prompts):
    before = prompts.read_bytes()
    for out, message in [(tmp_path, "is a folder"), (prompts, "would write over the prompt file"),
                         ("/dev/null", "is not a regular file"), ("/proc/x.jsonl", "cannot write --out /proc/x.jsonl (")]:
        done = in_process("complete.py", prompts, "--out", out, *FLAGS)
        assert_fails(done, message)
        assert "loading" not in done.stderr and "completing" not in done.stderr
    assert prompts.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt"]


def test_a_kv_cache_larger_than_memory_is_named_before_loading():
    done = in_process("complete.py", "-", "--max_batch_size", "100000", "--max_seq_len", "2048", stdin="hi\n")
    assert_fails(done, "the KV cache of 100000 rows x 2048 positions needs")
    assert "GiB" in done.stderr and "lower --max_batch_size or --max_seq_len" in done.stderr  # in flag terms
    huge = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536, max_batch_size=10**12)
    with pytest.raises(ValueError, match="KV cache"):  # past what torch.Size can count
        KVCache.check_fits(huge, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("value", ["inf", "1e999", "nan"])
def test_temperature_must_be_finite(value):
    assert_fails(in_process("chat.py", "--prompt", "hi", "--temperature", value), "--temperature must be a finite number")


def test_stdout_on_a_full_device(prompts):
    with open("/dev/full", "w") as full:
        done = subprocess.run([*COMPLETE, str(prompts), *FLAGS, "--max_gen_len", "2"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    assert_fails(done, "cannot write to stdout (No space left on device)")


@pytest.mark.parametrize("name", ["chat.py", "complete.py"])
def test_a_closed_pipe_ends_quietly(prompts, name):
    args = ["--prompt", "Count to fifty."] if name == "chat.py" else [prompts]
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / name), *map(str, args), *FLAGS, "--max_gen_len", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141
    assert "Traceback" not in stderr and "error" not in stderr.lower()


def test_results_survive_a_closed_stderr(prompts):
    done = subprocess.run(["bash", "-c", 'exec "$@" 2>&-', "-", *COMPLETE, str(prompts), *FLAGS, "--max_gen_len", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0
    assert [json.loads(line)["prompt"] for line in done.stdout.splitlines()] == ["Once upon a time", "The sky is"]


def test_chat_with_stdin_closed():
    done = subprocess.run(["bash", "-c", 'exec "$@" <&-', "-", sys.executable, str(ROOT / "scripts" / "chat.py"), *FLAGS],
                          capture_output=True, text=True, timeout=300)
    assert_fails(done, "stdin is closed")


def test_a_very_long_prompt_is_text_not_a_literal():
    done = in_process("chat.py", "--prompt", " ".join(["word"] * 12000), *FLAGS)
    assert_fails(done, "too long for --max_seq_len 512")


def test_text_flags_are_taken_as_typed(llm):
    done = script("chat.py", "--system", "0x10", "--prompt", "None", "--max_gen_len", "6", *FLAGS)
    assert done.returncode == 0, done.stderr
    dialog = [{"role": "system", "content": "0x10"}, {"role": "user", "content": "None"}]  # not 16, not None
    want = llm.chat_completion([dialog], max_gen_len=6, temperature=0)
    assert done.stdout == want[0]["generation"]["content"] + "\n"


@pytest.mark.parametrize("args, message", [
    (["p.txt", "q.txt"], "unexpected argument 'q.txt'"),  # fire would take it as --out and overwrite q.txt
    (["p.txt", "--out"], "--out needs a value"),  # fire would write a file named True
    (["p.txt", "--out", "--chat"], "--out needs a value"),
    (["--out", "o.jsonl"], "PROMPTS is missing"),
    (["p.txt", "-z"], "unexpected argument '-z'"),
])
def test_arguments_fire_would_read_loosely_are_refused(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _as_typed(complete, args)
    assert _as_typed(complete, ["-o", "0x10", "p.txt", "--nochat"]) == ["--out", "'0x10'", "--prompts", "'p.txt'", "--nochat"]



@pytest.mark.parametrize("flag", ["--seed", "--out"])
def test_a_flag_without_its_value_is_named_once(flag):
    """The example in the message is a flag as typed (it once read '----seed VALUE')."""
    done = in_process("complete.py", "p.txt", flag)
    assert_fails(done, f"{flag} needs a value, such as {flag}=VALUE")
    assert "----" not in done.stderr

def test_out_files_that_must_not_be_written(tmp_path):
    source = tmp_path / "notes.partial"
    source.write_text("Hello")
    with pytest.raises(ValueError, match="would write over the prompt file"):  # FILE.partial is the input
        FileResults(tmp_path / "notes", source)
    with pytest.raises(ValueError, match="not a regular file"):
        FileResults("/dev/null", source)
    first = FileResults(tmp_path / "out.jsonl", source)
    with pytest.raises(ValueError, match="another run is writing"):
        FileResults(tmp_path / "out.jsonl", source)
    first.close()
    assert source.read_text() == "Hello" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.partial"]


def test_a_partial_file_resumes_records_that_hold_a_generation_field(tmp_path):
    records = [(1, {"prompt": "a", "generation": "old"}), (2, {"prompt": "b"})]
    results = FileResults(tmp_path / "out.jsonl", "-")
    results.write(json.dumps({"prompt": "a", "generation": "new"}) + "\n")
    results.file.write(b'{"prompt": "b", "gen')  # a kill in the middle of a line
    results.file.close()
    again = FileResults(tmp_path / "out.jsonl", "-")
    assert again.resume(records) == 1
    again.file.write(b'{"prompt": "b"}\n')  # a line without its generation is not a result
    again.file.close()
    with pytest.raises(ValueError, match="does not match these prompts at its line 2"):
        FileResults(tmp_path / "out.jsonl", "-").resume(records)


def test_prompt_files_split_on_newlines_only(tmp_path):
    text = tmp_path / "p.txt"
    text.write_bytes("\ufeffone\u2028still one\u0085and still\r\ntwo\n\n".encode())
    assert read_prompts(text) == [(1, {"prompt": "one\u2028still one\u0085and still"}), (2, {"prompt": "two"})]
    jsonl = tmp_path / "p.JSONL"
    jsonl.write_text('{"prompt": "a\u2028b", "id": 1}\n', encoding="utf-8")  # a raw U+2028 inside the string
    assert read_prompts(jsonl) == [(1, {"prompt": "a\u2028b", "id": 1})]
    chat_line = tmp_path / "c.jsonl"
    chat_line.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="pass --chat"):
        read_prompts(chat_line)
    assert read_prompts(chat_line, chat=True)[0][1]["messages"][0]["content"] == "hi"


@pytest.mark.parametrize("args", [dict(checkpoint=5), dict(tokenizer=1.5), dict(dtype=["float32"]), dict(device=3),
                                  dict(prefix_cache="no")])
def test_build_refuses_wrong_types_with_value_error(args):
    with pytest.raises(ValueError, match=next(iter(args))):
        Llama.build(**args)


@pytest.mark.parametrize("name", ["chat.py", "complete.py", "serve.py"])
def test_no_prefix_cache_reaches_the_build(name, monkeypatch, prompts):
    built = []

    def build(*args, **kwargs):
        built.append(kwargs["prefix_cache"])
        raise ValueError("built")

    monkeypatch.setattr(Llama, "build", build)
    first = ["--prompt", "hi"] if name == "chat.py" else [prompts] if name == "complete.py" else ["--port", "0"]
    for flags in ([], ["--no_prefix_cache"]):
        assert_fails(in_process(name, *first, *flags), "built")
    assert built == [True, False]


def test_ids_a_smaller_tokenizer_cannot_decode_are_never_picked(smollm_path):
    llm = Llama.build(smollm_path, tokenizer=str(SHIPPED_SP_MODEL), max_seq_len=128, max_batch_size=1, device="cpu",
                      dtype="float32")
    n_words = llm.tokenizer.n_words
    prompt = llm.tokenizer.encode("Once upon a time", bos=llm.tokenizer.add_bos, eos=False)
    [done] = llm.text_completion(["Once upon a time"], max_gen_len=12, temperature=0)
    ids = prompt + done["tokens"]
    assert done["tokens"] and max(ids) < n_words
    llm.model.tokenizer_vocab_size = llm.model.params.vocab_size  # the model alone, unmasked
    logits = llm.model.forward(torch.tensor([ids]), 0)[0, len(prompt) - 1 : -1]  # teacher-forced
    assert done["tokens"] == logits[:, :n_words].argmax(-1).tolist()
    assert (logits.argmax(-1) >= n_words).any()  # the model alone would have picked an undecodable id


def test_the_default_context_follows_a_smaller_model(tmp_path):
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", context=256)
    args = ["-", "--checkpoint", tiny, "--dtype", "float32", "--device", "cpu", "--max_gen_len", "4"]
    done = script("complete.py", *args, stdin="he the\n")
    assert done.returncode == 0, done.stderr
    assert_fails(script("complete.py", *args, "--max_seq_len", "2048", stdin="he the\n"), "context length 256")


def test_complete_chat_runs_the_template_and_says_when_it_is_missing(llm, tmp_path):
    questions = ["What is the capital of France?", "Who wrote Hamlet?"]
    source = tmp_path / "q.txt"
    source.write_text("\n".join(questions) + "\n")
    done = script("complete.py", source, "--chat", "--frequency_penalty", "0.5", "--max_gen_len", "5", *FLAGS)
    assert done.returncode == 0, done.stderr
    want = llm.chat_completion([[{"role": "user", "content": q}] for q in questions], max_gen_len=5, temperature=0,
                               frequency_penalty=0.5)
    assert [json.loads(line) for line in done.stdout.splitlines()] == [
        {"prompt": q, "generation": w["generation"]["content"]} for q, w in zip(questions, want)]
    plain = script("complete.py", source, "--max_gen_len", "5", *FLAGS)
    assert plain.returncode == 0 and "pass --chat" in plain.stderr  # the instruct model ends at once without it


def test_chat_replies_have_a_length_limit_by_default():
    # "Continue the story." looped for minutes on the default model without one
    assert inspect.signature(chat).parameters["max_gen_len"].default == 512


def test_help_explains_every_flag_on_stdout():
    for name, command in [("chat.py", chat), ("complete.py", complete), ("serve.py", serve)]:
        done = in_process(name, "--help")
        assert done.returncode == 0 and "Type: Optional[]" not in done.stdout
        # fire's page: a header line per flag ("    --out=OUT" or "    PROMPTS"), its text indented below
        entries = re.split(r"\n    (?=\S)", done.stdout)
        for flag in inspect.signature(command).parameters:
            [entry] = [e for e in entries if re.match(rf"(-\w, )?--{flag}=|{flag.upper()}\n", e)]
            assert "Default:" in entry or flag == "prompts"
            assert "E.g. " in entry, f"{name} --help does not describe {flag}"


def _run_until(args, partial, lines):
    """Start complete.py, SIGKILL it once `partial` holds at least `lines` lines."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (partial.exists() and partial.read_text().count("\n") >= lines):
        assert proc.poll() is None, "finished before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def test_a_killed_run_continues_where_it_stopped(llm, tmp_path):
    source = tmp_path / "prompts.txt"
    prompts = [f"Fact {n}:" for n in range(200)]
    source.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    args = [*COMPLETE, str(source), "--out", str(out), "--max_gen_len", "2", "--max_batch_size", "16", *FLAGS]
    _run_until(args, partial, 100)
    assert not out.exists()
    kept = partial.read_text().count("\n")
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{kept} of 200 prompts were done" in rerun.stderr
    assert f"{200 - kept}/{200 - kept}" in rerun.stderr  # only the rest was generated
    want = llm.text_completion(prompts, max_gen_len=2, temperature=0)
    assert out.read_text().splitlines() == [json.dumps({"prompt": p, "generation": w["generation"]})
                                            for p, w in zip(prompts, want)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "prompts.txt"]


# --- filesystems made for the test: read-only, and full ------------------------------------------

def _can_mount():
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="no user+mount namespaces here (unshare -rm)")


def _in_tmpfs(tmp_path, prepare, args):
    """Run `args` with a fresh 64 KiB tmpfs on tmp_path/fs after the shell commands `prepare`; copy
    what the tmpfs holds afterwards to tmp_path/after (the mount ends with the command)."""
    fs, after = tmp_path / "fs", tmp_path / "after"
    after.mkdir()
    shell = f'mount -t tmpfs -o size=64k tmpfs "$0" && {prepare} && "$@"; rc=$?; cp -r "$0"/. "{after}"; exit $rc'
    done = subprocess.run(["unshare", "-rm", "sh", "-c", shell, str(fs), *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    return done, after


@needs_mount
def test_out_on_a_read_only_filesystem(tmp_path, prompts):
    fs = tmp_path / "fs"
    fs.mkdir()
    done, after = _in_tmpfs(tmp_path, 'mount -o remount,ro "$0"', [*COMPLETE, prompts, "--out", fs / "out.jsonl", *FLAGS])
    assert_fails(done, f"cannot write --out {fs}/out.jsonl (Read-only file system)")
    assert "loading" not in done.stderr
    assert list(after.iterdir()) == []


@needs_mount
def test_out_on_a_full_filesystem_keeps_whole_lines(llm, tmp_path):
    source = tmp_path / "p.txt"
    prompts = [f"Line {n} of a long list of prompts that each take some room in the output file" for n in range(60)]
    source.write_text("\n".join(prompts) + "\n")
    fs = tmp_path / "fs"
    fs.mkdir()
    # 4 KiB left: some dozens of lines fit, then the disk is full
    done, after = _in_tmpfs(tmp_path, 'head -c 61440 /dev/zero > "$0/filler"',
                            [*COMPLETE, source, "--out", fs / "out.jsonl", "--max_gen_len", "2", *FLAGS])
    assert_fails(done, f"cannot write --out {fs}/out.jsonl (No space left on device)")
    kept = (after / "out.jsonl.partial").read_text().splitlines()
    assert 0 < len(kept) < len(prompts) and f"{len(kept)} finished result(s) are kept" in done.stderr
    want = llm.text_completion(prompts[: len(kept)], max_gen_len=2, temperature=0)
    assert kept == [json.dumps({"prompt": p, "generation": w["generation"]}) for p, w in zip(prompts, want)]
    assert sorted(p.name for p in after.iterdir()) == ["filler", "out.jsonl.partial"]


# --- a second newcomer's run (issue 25) ------------------------------------------------------------

def test_max_gen_len_none_fills_the_context(llm):
    done = in_process("chat.py", "--prompt", "Hi", "--max_gen_len", "None", *FLAGS)
    assert done.returncode == 0, done.stderr
    [want] = llm.chat_completion([[{"role": "user", "content": "Hi"}]], max_gen_len=None, temperature=0)
    assert done.stdout == want["generation"]["content"] + "\n"
    prompt = "The capital of France is"
    done = in_process("complete.py", "-", "--max_gen_len", "None", "--max_seq_len", "24", "--temperature", "0",
                      *MODEL_FLAGS, stdin=prompt + "\n")
    assert done.returncode == 0, done.stderr
    room = 24 - 1 - len(llm.tokenizer.encode(prompt, bos=False, eos=False))
    [want] = llm.text_completion([prompt], max_gen_len=room, temperature=0)
    assert json.loads(done.stdout) == {"prompt": prompt, "generation": want["generation"]}


def test_a_chat_reply_cut_at_max_gen_len_says_so(llm):
    cut = in_process("chat.py", "--prompt", "Write a long story about a dragon.", "--max_gen_len", "5", *FLAGS)
    assert cut.returncode == 0 and "(the reply was cut at 5 tokens, --max_gen_len 5; raise it" in cut.stderr
    whole = in_process("chat.py", "--prompt", "Say hi.", "--max_gen_len", "64", *FLAGS)
    assert whole.returncode == 0 and "cut" not in whole.stderr  # it ended by itself


def test_a_resumed_sampled_run_equals_an_uninterrupted_one(tmp_path):
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    source = tmp_path / "p.txt"
    source.write_text("".join(f"the {'he ' * n}\n" for n in range(6)))
    args = [source, "--checkpoint", tiny, "--temperature", "1", "--top_p", "1", "--seed", "3", "--max_gen_len", "8",
            *MODEL_FLAGS]
    whole = tmp_path / "whole.jsonl"
    assert in_process("complete.py", *args, "--out", whole, "--max_batch_size", "4").returncode == 0
    lines = whole.read_text().splitlines()
    assert len(set(json.loads(line)["generation"] for line in lines)) == 6
    resumed = tmp_path / "resumed.jsonl"
    (tmp_path / "resumed.jsonl.partial").write_text("\n".join(lines[:2]) + "\n")  # as a killed run leaves it
    done = in_process("complete.py", *args, "--out", resumed, "--max_batch_size", "1")
    assert done.returncode == 0 and "2 of 6 prompts were done" in done.stderr
    assert resumed.read_text().splitlines() == lines  # whatever the rows, and resumed at prompt 2


def test_json_lines_on_stdin_are_read_as_records():
    stdin = json.dumps({"prompt": "Hello", "id": 7}) + "\n" + json.dumps({"prompt": "Bye", "id": 8}) + "\n"
    done = in_process("complete.py", "-", "--max_gen_len", "2", *FLAGS, stdin=stdin)
    assert done.returncode == 0 and "reading stdin as JSON lines" in done.stderr
    assert [(r["prompt"], r["id"]) for r in map(json.loads, done.stdout.splitlines())] == [("Hello", 7), ("Bye", 8)]


def test_text_that_is_not_utf8_is_named_where_the_user_typed_it(monkeypatch):
    done = in_process("chat.py", "--prompt", "caf\udce9", *FLAGS)  # how Python hands over the byte 0xe9 of argv
    assert_fails(done, "--prompt is not UTF-8 text (byte 0xe9 at character 3); pass UTF-8")
    assert "loading" not in done.stderr
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"fine\n\xff not fine\n"), encoding="utf-8"))
    with pytest.raises(ValueError, match=re.escape("stdin is not UTF-8 text (byte 0xff on line 2)")):
        read_prompts("-")
    chat_run = subprocess.run([*CHAT, "--max_gen_len", "3", *FLAGS], input=b"caf\xe9\nSay hi.\n", capture_output=True,
                              timeout=300)
    stderr = chat_run.stderr.decode()
    assert chat_run.returncode == 0, stderr
    assert "error: the message is not UTF-8 text (byte 0xe9 at character 3)" in stderr and "Traceback" not in stderr
    assert chat_run.stdout.decode().count("\n") == 1  # the next line was answered


def test_clear_messages_in_the_command_lines_terms(tmp_path, monkeypatch):
    assert_fails(in_process("chat.py", "--prompt", "hi", "--checkpoint", ""), "--checkpoint must be a path, not an empty string")
    if not torch.cuda.is_available():
        assert_fails(in_process("chat.py", "--prompt", "hi", "--device", "cuda"), "use --device cpu")
    assert_fails(in_process("chat.py", "--prompt", "hi", "--threads", "0"), "--threads must be a whole number >= 1")
    no_template = in_process("chat.py", "--prompt", "hi", "--tokenizer", SHIPPED_SP_MODEL, *MODEL_FLAGS)
    assert_fails(no_template, "this checkpoint has no chat template, so chat cannot run it; pass --chat_template FILE")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv("LLAMA_LITE_CACHE", str(not_a_folder))
    assert_fails(in_process("chat.py", "--prompt", "hi"), f"cannot use the model cache {not_a_folder} (")
    assert_fails(in_process("chat.py", "--prompt", "hi"), "set LLAMA_LITE_CACHE to a writable folder")


def test_chat_to_a_full_stdout():
    with open("/dev/full", "w") as full:
        done = subprocess.run([*CHAT, "--prompt", "Say hi.", "--max_gen_len", "4", *FLAGS], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    assert_fails(done, "cannot write to stdout (No space left on device)")


def test_threads_flag_and_the_default_on_a_busy_machine(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # it would decide instead
    before = torch.get_num_threads()
    try:
        done = in_process("complete.py", "-", "--threads", "1", "--max_gen_len", "1", *FLAGS, stdin="Hi\n")
        assert done.returncode == 0, done.stderr
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    cpus = len(os.sched_getaffinity(0))
    for niced in (False, True):  # a niced hog (as a background compile) is busy only for the threads of now
        hog = subprocess.Popen([sys.executable, "-c", f"import os; os.nice({19 * niced})\nwhile True: pass"])
        try:
            time.sleep(0.5)  # running
            load = CpuLoad()
            time.sleep(0.2)
            assert default_threads(load, niced=True) <= max(1, cpus - 1)  # never a thread on the busy core
            if niced and cpus > 1:  # the threads compiled code is made for count it as idle
                assert default_threads(load) == default_threads(load, niced=True) + 1
        finally:
            hog.kill()
            hog.wait()
    pinned = subprocess.run([sys.executable, "-c", "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
                             "from llama_lite.model.devices import usable_cores; print(usable_cores())"],
                            capture_output=True, text=True, timeout=120)
    assert pinned.stdout.strip() == "1", pinned.stderr
