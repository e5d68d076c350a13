"""Complete a list of prompts in batches, one JSON line per prompt in input order. See --help."""

import os

try:  # importing torch takes seconds: Ctrl-C then is an exit, not a traceback (nor torch's teardown)
    from llama_lite.cli import complete_main
except KeyboardInterrupt:
    os._exit(130)

if __name__ == "__main__":
    complete_main()
