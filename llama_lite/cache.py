"""Where llama_lite keeps what it fetches or builds once: models, compiled code."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """$LLAMA_LITE_CACHE, else ~/.cache/llama_lite."""
    return Path(os.environ.get("LLAMA_LITE_CACHE") or Path.home() / ".cache" / "llama_lite").expanduser()
