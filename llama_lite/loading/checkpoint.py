"""Checkpoints to model arguments and Meta-named tensors: GGUF files, Hugging Face folders
(config.json + safetensors) and Meta folders (params.json + consolidated.*.pth), of the families
that are Llama's layers with small additions: Llama 1-3.x (RoPE scaling), Mistral (a sliding
window) and Qwen2/2.5 (q/k/v biases). Anything else, or any variant the model cannot reproduce
exactly, is refused with a one-line CheckpointError.

`read_checkpoint` detects the format and reads only metadata; the returned `Checkpoint` then yields
one Meta-named tensor at a time, so the caller converts and places each before the next is read and
peak memory stays near the final weights' size. One module a format: gguf_tensors.py (parsed by
`gguf_file.GGUFFile`, a memory map, and dequantized with `gguf.quants`: every type llama.cpp's
Python tools know, no hand-written dequantizer), hf_folder.py (`safetensors`) and meta_folder.py
(.pth with `torch.load(weights_only=True)`); meta_names.py maps their tensors to Meta's.
"""

from pathlib import Path

from ..errors import CheckpointError
from .checkpoint_types import Checkpoint
from .gguf_tensors import gguf_checkpoint
from .hf_folder import hf_folder
from .meta_folder import meta_folder

LAYOUTS = ("a .gguf file, a Hugging Face folder (config.json + *.safetensors) "
           "or a Meta folder (params.json + consolidated.*.pth)")


def read_checkpoint(path) -> Checkpoint:
    """Detect the checkpoint at `path` and read its metadata (no tensor data yet)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass {LAYOUTS}, or none for the default model")
    if path.is_dir():
        if (path / "params.json").is_file():
            return meta_folder(path)
        if (path / "config.json").is_file():
            return hf_folder(path)
        raise CheckpointError(f"{path} is a folder with neither params.json (Meta) nor config.json (Hugging Face); "
                              f"pass {LAYOUTS}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror}); check its permissions") from None
    if magic == b"GGUF":
        return gguf_checkpoint(path)
    if path.suffix in (".safetensors", ".pth", ".json"):
        raise CheckpointError(f"{path} is one file of a checkpoint folder; pass the folder that holds it")
    raise CheckpointError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass {LAYOUTS}")
