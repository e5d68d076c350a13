"""Peak memory of this process, for tests that bound it."""


def peak_rss_mb() -> float:
    """VmHWM: this process's own peak resident set. (getrusage's ru_maxrss survives exec, so a child
    of a big pytest process would report the parent's size.)"""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
