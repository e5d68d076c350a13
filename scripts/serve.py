"""Serve a Llama checkpoint over OpenAI's HTTP API (default: SmolLM2-135M-Instruct). See --help."""

import sys

try:  # importing torch takes seconds: Ctrl-C then is an exit, not a traceback
    from llama_lite.cli import serve_main
except KeyboardInterrupt:
    sys.exit(130)

if __name__ == "__main__":
    serve_main()
