"""llama_lite: a small, readable Llama-style batched text generator."""

from .checkpoint import CheckpointError
from .generation import Llama
from .model import ModelArgs, Transformer
from .tokenizer import Tokenizer

__all__ = ["Llama", "Tokenizer", "CheckpointError", "Transformer", "ModelArgs"]
__version__ = "0.1.0"
