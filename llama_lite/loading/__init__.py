"""Checkpoints in: GGUF files, Hugging Face and Meta folders read into model arguments and Meta-named
tensors, the weights placed (and kept quantized) in a model, the default model fetched.
"""
