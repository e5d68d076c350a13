"""llama_lite: a small, readable Llama-style batched text generator."""

from . import mkl_strict  # noqa: F401  (first: before any product)
from .engine.engine import Engine
from .engine.request import RequestOutput
from .engine.sampling import SamplingParams
from .errors import CheckpointError
from .generation import Llama
from .model.transformer import ModelArgs, Transformer
from .text.tokenizer import Tokenizer

__all__ = ["Llama", "Tokenizer", "CheckpointError", "Transformer", "ModelArgs", "SamplingParams", "Engine", "RequestOutput"]
__version__ = "0.1.0"
