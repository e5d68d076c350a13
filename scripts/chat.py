"""Chat with a Llama checkpoint (default: SmolLM2-135M-Instruct). See --help."""

import os

try:  # importing torch takes seconds: Ctrl-C then is an exit, not a traceback (nor torch's teardown)
    from llama_lite.cli import chat_main
except KeyboardInterrupt:
    os._exit(130)

if __name__ == "__main__":
    chat_main()
