"""llama_lite: a small, readable Llama-style batched text generator."""

import os

# MKL picks its float32 kernels by the CPU and the product's shape: on Intel Xeons a row's bits then
# depend on how many rows share its product (from 16 rows, and between one row and two in the thin
# product). Strict conditional numerical reproducibility pins them on every CPU, so float32's batch
# invariance holds (docs/design/batch-invariance.md). MKL reads it at its first product; a user's own wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from .engine.engine import Engine
from .engine.request import RequestOutput
from .engine.sampling import SamplingParams
from .errors import CheckpointError
from .generation import Llama
from .model.transformer import ModelArgs, Transformer
from .text.tokenizer import Tokenizer

__all__ = ["Llama", "Tokenizer", "CheckpointError", "Transformer", "ModelArgs", "SamplingParams", "Engine", "RequestOutput"]
__version__ = "0.1.0"
