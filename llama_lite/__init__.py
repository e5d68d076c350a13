"""llama_lite: a small, readable Llama-style batched text generator."""

from .errors import CheckpointError
from .engine import Engine, RequestOutput
from .generation import Llama
from .model import ModelArgs, Transformer
from .sampling import SamplingParams
from .tokenizer import Tokenizer

__all__ = ["Llama", "Tokenizer", "CheckpointError", "Transformer", "ModelArgs", "SamplingParams", "Engine", "RequestOutput"]
__version__ = "0.1.0"
