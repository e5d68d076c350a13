"""MKL's strict reproducible mode on Intel CPUs, set before any product: float32's batch invariance needs it.

MKL takes its Intel-tuned float32 kernels on Intel CPUs, and there a row's bits depend on how many
rows share its product (from 16 rows, and between one row and two in the thin product). Its strict
reproducible mode (MKL_CBWR=AUTO,STRICT) pins them (docs/design/batch-invariance.md); on AMD EPYCs its
kernels keep a row's bits without it, at full speed. MKL reads the setting at its first product, so
it holds where torch was imported first; a user's own MKL_CBWR wins.
"""

import os


def _intel_cpu() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "GenuineIntel" in f.read(4096)
    except OSError:
        return False


if _intel_cpu():
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
