"""Serve a Llama checkpoint over OpenAI's HTTP API (default: SmolLM2-135M-Instruct). See --help."""

from llama_lite.cli import serve_main

if __name__ == "__main__":
    serve_main()
