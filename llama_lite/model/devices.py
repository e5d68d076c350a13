"""Where the model runs: the device, the dtype it computes in, the CPU threads, and whether a buffer
fits in memory.

A KV cache larger than memory must be refused with its size before it is allocated: allocating it
would fail deep inside torch (or, with overcommit, get the process killed later). By default the
model gets the cores this process may use that no other process keeps busy: torch's threads wait for
each other after every operation, so one on a busy core slows all (docs/performance.md#threads).
"""

import math
import os
import sys
import time

import torch

from ..checks import check_whole

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be a string such as 'cpu' or 'cuda', got {device!r}")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but this machine has no usable CUDA GPU; use device='cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) here")
    elif resolved.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    return resolved


def _cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls beat float32 there (about 2x here); elsewhere they crawl."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        fast_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else _cpu_has_fast_bf16()
        return torch.bfloat16 if fast_bf16 else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        choices = ", ".join(map(repr, _DTYPES))
        raise ValueError(f"unknown dtype {dtype!r}; use {choices} or None (the fastest this device runs)")
    return _DTYPES[dtype]


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by its cgroup's CPU quota (v2 cpu.max,
    v1 cfs_quota_us / cfs_period_us), rounded up."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = period = None
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        quota, period = int(quota), int(period)  # "max 100000": no quota (ValueError below)
    except (OSError, ValueError):
        quota = _read_int("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")  # -1: no quota (None)
        period = _read_int("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    if quota and period:
        cores = min(cores, max(1, math.ceil(quota / period)))
    return max(1, cores)


class CpuLoad:
    """How many of this process's cores other processes keep busy, measured from when it is made to
    when `busy_elsewhere` is called (from /proc/stat's tick counts, less this process's own). Niced
    work (a background compile runs at nice 19, SCHED_IDLE) is counted apart: it yields its core to
    one thread of ours, but torch's threads wait for each other after every operation, and beside it
    two threads ran an 8 x 576 x 1,536 product 4-20x slower than one (docs/performance.md#threads)."""

    MIN_WINDOW_S = 0.05  # ticks are 10 ms: at least 5 per core

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        """(time, busy and niced ticks of the CPUs this process may use, ticks this process used), or None."""
        try:
            cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
            busy = niced = 0
            with open("/proc/stat") as f:
                for line in f:
                    name, *ticks = line.split()
                    if name in cpus:  # user nice system idle iowait irq softirq steal ...
                        user, nice, system, _, _, irq, softirq = map(int, ticks[:7])
                        busy += user + system + irq + softirq
                        niced += nice
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            own = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
        except (AttributeError, OSError, ValueError, IndexError):
            return None
        return time.monotonic(), busy, niced, own

    def seconds(self) -> float:
        """How long this has measured (0.0 where it cannot)."""
        return 0.0 if self.start is None else time.monotonic() - self.start[0]

    def busy_elsewhere(self, niced: bool = False) -> float:
        """Cores kept busy by other processes since this was made, niced work too if `niced` (0.0
        where it cannot be read)."""
        if self.start is None:
            return 0.0
        waited = time.monotonic() - self.start[0]
        if waited < self.MIN_WINDOW_S:
            time.sleep(self.MIN_WINDOW_S - waited)
        end = self._sample()
        if end is None:
            return 0.0
        ticks = (end[1] - self.start[1]) + niced * (end[2] - self.start[2]) - (end[3] - self.start[3])
        return max(0.0, ticks / (os.sysconf("SC_CLK_TCK") * (end[0] - self.start[0])))


def check_threads(threads) -> None:
    check_whole("threads", threads, 1, hint=", or None for the cores this process may use;")


def warn_if_oversubscribed(threads: int) -> None:
    """One line on stderr where `threads` exceed the cores this process may use: torch's threads wait
    for each other after every operation, so the extra ones, queued behind the others, slow every
    step (64 threads on 2 cores ran 2x slower). A warning, not a refusal: the cores may be about to grow."""
    cores = usable_cores()
    if threads > cores:
        print(f"llama_lite: {threads} threads asked for, but this process may use {cores} core(s), so every step "
              f"waits on the extra threads; pass threads={cores} (--threads {cores}) or fewer, or leave it out for "
              "the cores no other process keeps busy", file=sys.stderr)


def default_threads(load: CpuLoad, niced: bool = False) -> "int | None":
    """The usable cores no other process keeps busy (at least 1), niced work counted as busy if
    `niced`; None (keep torch's) where OMP_NUM_THREADS says (torchrun sets it for each of its processes)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(usable_cores(), cpus - round(load.busy_elsewhere(niced))))


def _read_int(path: str):
    """The number a cgroup file holds, or None (no such file, or "max": no limit)."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cpu_free_bytes():
    """What the kernel says can still be allocated without swapping, within this cgroup's limit
    (a container's MemAvailable shows the whole host), or None where neither can be read."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        free = limit - used if free is None else min(free, limit - used)
    return free


def check_fits(nbytes: int, what: str, fix: str, device: torch.device) -> None:
    """ValueError naming `what` and its size when `nbytes` exceed the memory free on `device`."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    elif device.type == "cpu":
        free = _cpu_free_bytes()
    else:  # the meta device holds no memory
        return
    if free is not None and nbytes > free:
        raise ValueError(f"{what} needs {nbytes / 2**30:.1f} GiB, more than the {max(free, 0) / 2**30:.1f} GiB free "
                         f"on {device.type}; {fix}")
