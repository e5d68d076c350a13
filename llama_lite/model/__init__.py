"""The model and where it runs: the transformer, attention and its KV cache, RoPE, the linear kernels,
the compiled decode step, model parallelism, devices and threads. Knows nothing of files or text.
"""
