"""The error every reader raises for a bad checkpoint or tokenizer file, in its own module so the
GGUF reader, the checkpoint loader and the tokenizers can all raise it without importing each other."""


class CheckpointError(ValueError):
    """A checkpoint or tokenizer file that is corrupt, truncated or of an unsupported kind."""
