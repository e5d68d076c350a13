from setuptools import find_packages, setup

setup(
    name="llama_lite",
    version="0.1.0",
    description="A small, readable, fast Llama-style batched text generator with a pluggable tokenizer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["llama_lite", "llama_lite.*"]),
    package_data={"llama_lite.model": ["integer_kernels.cpp"]},  # compiled on first use (model/integer_kernels.py)
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "sentencepiece",
        "protobuf",  # to read and build SentencePiece model protos (sentencepiece_model_pb2)
        "fairscale",
        "fire",
        "gguf>=0.17",
        "tokenizers>=0.20",
        "safetensors",
        "jinja2>=3.1",
        "tqdm",
        "numpy",
        "fastapi>=0.135",  # the server: routing, and server-sent events of its own (fastapi.sse)
        "pydantic>=2",  # the server's request bodies (protocol.py); FastAPI's own
        "uvicorn>=0.30",
        "prometheus-client",
        "llguidance>=1.0",  # structured output: JSON Schema, regex and grammars enforced token by token
    ],
    entry_points={
        "console_scripts": [
            "llama-lite-chat=llama_lite.cli:chat_main",
            "llama-lite-complete=llama_lite.cli:complete_main",
            "llama-lite-serve=llama_lite.cli:serve_main",
        ]
    },
    extras_require={
        "test": ["pytest", "transformers>=4.46", "accelerate", "hypothesis", "openai", "httpx", "jsonschema",
                 "ruff==0.17.6",  # the linter pinned: a newer one may add checks under the same rule names
                 "ray[data,serve]==2.60.0"],  # so CI tests the cluster mode (tests/cluster)
        # Batch jobs on Ray Data and replicas on Ray Serve (docs/cluster.md); never ray[llm], which pulls vLLM.
        "ray": ["ray[data,serve]==2.60.0"],
    },
)
