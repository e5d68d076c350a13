"""Chat with a Llama checkpoint (default: SmolLM2-135M-Instruct). See --help."""

from llama_lite.cli import chat_main

if __name__ == "__main__":
    chat_main()
