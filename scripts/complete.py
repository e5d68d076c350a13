"""Complete a list of prompts in batches, one JSON line per prompt in input order. See --help."""

from llama_lite.cli import complete_main

if __name__ == "__main__":
    complete_main()
