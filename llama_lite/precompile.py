"""Building the compiled decode step in a process of its own, so no process that serves waits for it.

On first use of a model shape on a machine `load` starts `python -m llama_lite.precompile` in the
background (its own session, at the lowest priority) and decodes eagerly on the same path; the
next start loads what it built (aot_step.py). `chat.py --precompile` runs it in the foreground, and
`compile=True` waits for it. Exit, Ctrl-C and EOF never wait: the child goes on, or is killed,
and its folder appears whole or not at all. Where the path was the measured default, the child
also times the whole compiled step against float32's and corrects the choice (path_choice.py).
"""

import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

VERIFY_STEPS = 16  # decode steps timed per path and batch size when checking the choice


def command(settings: dict, threads: int, choice_file: "Path | None") -> list:
    """The child's command line: the model's settings (the path's dtype resolved, compile off), the
    threads its code is made for, and the choice to check (None: the path was asked for)."""
    return _command({"settings": settings, "threads": threads, "choice_file": None if choice_file is None else str(choice_file)})


def _command(job: dict) -> list:
    return [sys.executable, "-c", "import sys; from llama_lite.precompile import main; main(sys.argv[1])", json.dumps(job)]


def _lock(folder: Path) -> Path:
    return folder.with_name(folder.name + ".lock")


def _take_lock(folder: Path) -> bool:
    """Claim the building of `folder` for this process (its pid in FOLDER.lock); False where a live
    process holds it. A lock whose process is gone is taken over."""
    lock = _lock(folder)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(lock.read_text()), 0)
                return False
            except (OSError, ValueError):  # its process is gone (or it is being written: then one more try)
                lock.unlink(missing_ok=True)
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def start_in_background(cmd: list, folder: Path) -> "subprocess.Popen | None":
    """Start the child unless a live process is at work on `folder` (None: not started); its output
    goes to FOLDER.log, and the lock names it until it ends."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        if not _take_lock(folder):
            return None
        with open(folder.with_name(folder.name + ".log"), "w") as out:
            child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True,  # Ctrl-C in the terminal is not its to take
                                     preexec_fn=_lowest_priority)
        _lock(folder).write_text(str(child.pid))
        return child
    except OSError:  # a read-only cache, no room for a process: decoding stays eager
        _lock(folder).unlink(missing_ok=True)
        return None


def _lowest_priority():
    """Run only on cores the serving process leaves idle: at nice 19 alone, its slices still stalled
    the server's OpenMP threads at every barrier."""
    os.nice(19)
    if hasattr(os, "sched_setscheduler"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def run_now(cmd: list) -> None:
    """Build in the foreground, its progress on stderr; a failure is one line, as the child's last."""
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if line.strip()] or [f"exit status {done.returncode}"]
        raise RuntimeError(f"compiling the decode step failed: {lines[-1][:300]}")


def main(job_text: str) -> None:
    """The child: build the step for the job's settings (and check the choice), the failure one line on stderr."""
    try:
        _build(json.loads(job_text))
    except Exception as e:
        print(f"{type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        sys.exit(1)


def _build(job: dict) -> None:
    logging.getLogger("torch").setLevel(logging.ERROR)  # its warnings about its own internals are not the user's
    warnings.filterwarnings("ignore")
    from .loader import load
    from .model import aot_build
    from .path_choice import read, write
    from .settings import BuildSettings

    settings = BuildSettings(**job["settings"])
    threads = job["threads"]
    model = load(settings).model
    if "graphs_into" in job:  # a helper of another build: some of its graphs, nothing more
        aot_build.compile_graphs(model, Path(job["graphs_into"]), [tuple(s) for s in job["shapes"]], threads,
                                 log=lambda line: print(line, flush=True))
        return
    folder = aot_build.artifact_folder(model, threads)
    try:
        if not (folder / "graphs.json").is_file():  # (two builds at once: the second to finish keeps the first's)
            seconds = aot_build.build(model, folder, threads, log=lambda line: print(line, flush=True),
                                      helper=functools.partial(_helper, job))
            print(f"llama_lite: compiled the decode step in {seconds:.0f} s into {folder}", flush=True)
        if job["choice_file"]:
            choice = read(Path(job["choice_file"]))
            if choice is not None and not choice.verified:
                write(Path(job["choice_file"]), verify(choice, model, folder, settings))
    finally:
        if _lock(folder).is_file() and _lock(folder).read_text() == str(os.getpid()):
            _lock(folder).unlink(missing_ok=True)


def _helper(job: dict, folder: Path, shapes: list) -> subprocess.Popen:
    """A process compiling `shapes` of the step's graphs into `folder` beside this one (aot_build.build),
    its output on this one's, ended if this one ends first."""
    helper_job = {**job, "choice_file": None, "graphs_into": str(folder), "shapes": shapes}
    return subprocess.Popen(_command(helper_job), stdin=subprocess.DEVNULL, preexec_fn=_end_with_parent)


def _end_with_parent():
    """Linux: the kernel kills this process when the one that started it dies (a killed build leaves no helper)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def verify(choice, model, folder, settings):
    """Time the compiled low-precision step against the float32 eager one at 1 and 8 rows: the whole
    step, not only its products. Keeps the choice where it is faster at both, else float32."""
    from dataclasses import replace

    from .loader import load
    from .model.aot_step import AotStep
    from .path_choice import PathChoice

    model.decode_step = AotStep(model, folder)
    float32 = load(replace(settings, dtype="float32", quantize=None)).model
    figures = dict(choice.figures)
    for label, m in ((choice.path + " compiled", model), ("float32 eager", float32)):
        for rows in sorted({1, min(8, m.params.max_batch_size)}):
            figures[f"{label} step, {rows} row(s)"] = round(_step_ms(m, rows), 2)
    rows = sorted({1, min(8, model.params.max_batch_size)})
    mine = [figures[f"{choice.path} compiled step, {r} row(s)"] for r in rows]
    theirs = [figures[f"float32 eager step, {r} row(s)"] for r in rows]
    kept = all(a < b for a, b in zip(mine, theirs))
    shown = ", ".join(f"{a} against {b} ms at {r} row(s)" for a, b, r in zip(mine, theirs, rows))
    why = (f"its compiled step {'beat' if kept else 'lost to'} float32's eager one here ({shown})"
           + ("" if kept else f"; {choice.path}'s products alone had looked faster"))
    print(f"llama_lite: {choice.path if kept else 'float32'} is this machine's path: {why}", flush=True)
    return PathChoice(choice.path if kept else "float32", why, figures, verified=True)


@torch.inference_mode()
def _step_ms(model, rows: int) -> float:
    """Milliseconds of one decode step of `rows` sequences at position ~64 (the best of a few)."""
    tokens = torch.full((rows,), 100, dtype=torch.long)
    best = float("inf")
    for i in range(VERIFY_STEPS):
        segments = [(row, 64 + i, 1) for row in range(rows)]
        started = time.perf_counter()
        model.forward_segments(tokens, segments, torch.arange(rows))
        if i >= 2:  # the first calls allocate
            best = min(best, time.perf_counter() - started)
    return 1000 * best

