"""Ray imported when asked for, and a cluster to run on: one started here (`local`), or a running
one joined (`auto`, or its address)."""

import importlib
import os
import signal
import threading
import time

from ..loading.download import default_checkpoint

INSTALL = 'pip install -e ".[ray]"'


def import_ray(module: str = "ray"):
    """`module` of Ray (ray, ray.data, ray.serve); ValueError naming the extra when Ray is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"--ray needs Ray, which is not installed ({e.name or module}); {INSTALL}") from None


def check_address(address) -> str:
    """--ray's value: local, auto or a cluster's address (host:port or ray://host:port)."""
    if not isinstance(address, str) or not address.strip() or address in ("True", "False"):
        raise ValueError(f"--ray takes local, auto or a cluster's address (e.g. 10.0.0.1:6379), got {address!r}")
    return address.strip()


def connect(address: str, num_cpus: "int | None" = None) -> "float | None":
    """Join or start a cluster; the seconds it took, or None when this process was connected already
    (then it is not this command's to shut down). `local` starts one on this machine with `num_cpus`
    (None: all its cores), no dashboard; anything else joins a running cluster at that address."""
    ray = import_ray()
    start = time.perf_counter()
    if ray.is_initialized():
        return None
    # ray.init puts in handlers of its own (SIGTERM: exit 15, unwinding nothing); the command's stay.
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if address == "local":
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        else:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except ConnectionError as e:
        raise ValueError(f"cannot join the Ray cluster at --ray {address} ({e}); start it with `ray start --head`, "
                         "or pass --ray local") from None
    finally:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in handlers.items():
                if handler is not None:
                    signal.signal(signum, handler)
    return time.perf_counter() - start


def for_workers(build: dict, address: str) -> dict:
    """Llama.build's arguments for processes elsewhere: the paths this process names made absolute
    (a worker's folder is not ours); on a `local` cluster the default model fetched once here, not by
    every worker at once. On other machines the same paths must hold the same files."""
    build = dict(build)
    for name in ("checkpoint", "tokenizer", "chat_template"):
        value = build.get(name)
        if value is not None and os.path.exists(str(value)):
            build[name] = os.path.abspath(str(value))
    if build.get("checkpoint") is None and address == "local":
        build["checkpoint"] = str(default_checkpoint())
    return build


def split_threads(threads, workers: int) -> int:
    """Each worker's CPU threads: `threads` (None: the cores this process may use) split between the
    workers, at least one each."""
    total = threads or len(os.sched_getaffinity(0))
    return max(1, total // workers)
