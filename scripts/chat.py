"""Chat with a Llama checkpoint (default: SmolLM2-135M-Instruct). See --help."""

import sys

try:  # importing torch takes seconds: Ctrl-C then is an exit, not a traceback
    from llama_lite.cli import chat_main
except KeyboardInterrupt:
    sys.exit(130)

if __name__ == "__main__":
    chat_main()
