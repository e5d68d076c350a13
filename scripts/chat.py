"""Chat with a Llama checkpoint (default: SmolLM2-135M-Instruct).

    python scripts/chat.py                      # interactive: one user turn a line, until EOF or /exit
    python scripts/chat.py --prompt "Hi there"  # one reply, then exit
"""

import sys

from llama_lite import Llama
from llama_lite.cli import run
from llama_lite.generation import check_positive_int
from llama_lite.sampling import check_sampling


def chat(checkpoint=None, tokenizer=None, system=None, prompt=None, temperature=0.6, top_p=0.9, top_k=None,
         max_gen_len=None, max_seq_len=2048, device=None, dtype=None, seed=None):
    """Chat with a checkpoint. Interactive without --prompt: /reset clears the history, /exit or EOF ends."""
    check_sampling(temperature, top_p, top_k)
    if max_gen_len is not None:
        check_positive_int("--max_gen_len", max_gen_len)
    llm = Llama.build(checkpoint, tokenizer, max_seq_len=max_seq_len, max_batch_size=1, device=device, dtype=dtype, seed=seed)
    start = [{"role": "system", "content": str(system)}] if system is not None else []

    def reply(history):
        """Stream the assistant's answer to stdout and return it; drop the oldest turns if too long."""
        while True:
            tokens = llm.chat_prompt_tokens(history)
            room = llm.model.params.max_seq_len - 1 - len(tokens)
            oldest = len(start)
            if room >= (max_gen_len or 1) or len(history) - oldest <= 1:
                break
            del history[oldest : oldest + 2]  # the oldest user turn and its answer
            print("(history too long: dropped the oldest turn)", file=sys.stderr)
        if room < 1:
            raise ValueError(f"the message is too long for max_seq_len {llm.model.params.max_seq_len}; shorten it or pass a larger --max_seq_len")
        pieces = []
        for piece in llm.stream(tokens, min(max_gen_len or room, room), temperature, top_p, top_k):
            print(piece, end="", flush=True)
            pieces.append(piece)
        print(flush=True)
        return "".join(pieces)

    if prompt is not None:
        reply(start + [{"role": "user", "content": str(prompt)}])
        return
    interactive = sys.stdin.isatty()
    history = list(start)
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            history = list(start)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        try:
            history.append({"role": "assistant", "content": reply(history)})
        except ValueError as e:  # one turn too long for the context: say so, keep chatting
            history.pop()
            print(f"error: {e}", file=sys.stderr)


if __name__ == "__main__":
    run(chat)
