"""Where the model runs: the device, the dtype it computes in, and whether a buffer fits in memory.

A KV cache larger than memory must be refused with its size before it is allocated: allocating it
would fail deep inside torch (or, with overcommit, get the process killed later).
"""

import torch

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
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


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
