"""`chat`: a conversation with a checkpoint through its chat template, each reply streamed to stdout."""

import sys

from ..cache import cache_dir
from .flags import build_llama, documented, sampling_flags
from .prompt_files import StdoutError, write_stdout
from .runner import in_flag_terms, on_main, run_and_exit


@documented(
    system='a system message that starts the conversation. E.g. --system "Answer in one sentence."',
    prompt='one user message: print the reply and exit. E.g. --prompt "What is the capital of France?"',
    max_gen_len="the longest reply, in tokens. E.g. --max_gen_len 200",
    precompile="measure this machine's path and build chat's compiled decode step now, then exit (otherwise the first "
               "chat does both, the compile in the background for the next start). E.g. --precompile",
)
def chat(checkpoint: str = None, tokenizer: str = None, system: str = None, prompt: str = None,
         temperature: float = 0.6, top_p: float = 0.9, top_k: int = None, presence_penalty: float = 0.0,
         frequency_penalty: float = 0.0, max_gen_len: int = 512, max_seq_len: int = None, device: str = None,
         dtype: str = None, seed: int = None, quantize: str = None, compile: bool = None, no_prefix_cache: bool = False,
         json_schema: str = None, chat_template: str = None, threads: int = None, speculative: str = "auto",
         precompile: bool = False):
    """Chat with a checkpoint (default: SmolLM2-135M-Instruct).

    Without --prompt: one user turn a line from stdin (a terminal or a pipe); /reset clears the
    history, /exit or EOF ends; Ctrl-C stops a reply. With --prompt: one reply, then exit.
    """
    sampling = sampling_flags(temperature=temperature, top_p=top_p, top_k=top_k, presence_penalty=presence_penalty,
                              frequency_penalty=frequency_penalty, max_gen_len=max_gen_len, json_schema=json_schema)
    if not isinstance(precompile, bool):
        raise ValueError(f"--precompile takes no value (or True/False), got {precompile!r}")
    if precompile:
        _precompile(build_llama(1, checkpoint, tokenizer, max_seq_len, device, dtype, seed, quantize, compile,
                                no_prefix_cache, chat_template, threads, speculative))
        return
    if prompt is None and sys.stdin is None:
        raise ValueError("stdin is closed; give chat a terminal or a pipe, or pass --prompt")
    if sys.stdout is None:
        raise ValueError("stdout is closed; give chat a terminal, a pipe or a file to write the replies to")
    _check_text("--prompt", prompt)
    if isinstance(prompt, str) and not prompt.strip():  # as text_completion refuses "" (and stdin's blank lines are skipped)
        raise ValueError("--prompt is empty; pass some text, or leave --prompt out to chat a line at a time on stdin")
    _check_text("--system", system)
    if prompt is None and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a line that is not UTF-8 is refused, not the session
    llm = build_llama(1, checkpoint, tokenizer, max_seq_len, device, dtype, seed, quantize, compile, no_prefix_cache,
                      chat_template, threads, speculative)
    if not llm.tokenizer.chat_template:
        raise ValueError("this checkpoint has no chat template, so chat cannot run it; pass --chat_template FILE, "
                         "or run complete for plain text")
    conversation = _Conversation(llm, system, max_gen_len, sampling)
    if prompt is None:
        _converse(conversation)
        return
    try:
        conversation.reply(conversation.opening + [{"role": "user", "content": prompt}])
    except _TurnError as e:
        raise ValueError(str(e)) from None


def _precompile(llm) -> None:
    """Wait for the compile process the build started, and say what this machine runs."""
    if llm.compiling is not None:
        print("waiting for the compile to finish", file=sys.stderr)
        if llm.compiling.wait():
            raise ValueError(f"compiling the decode step failed; see its log under {cache_dir() / 'compiled'}")
        llm.model.adopt_compiled_step()
    step = llm.model.decode_step
    compiled = step is not None and step.compiled
    built = f"compiled decode step ready (built in {step.build_seconds:.0f} s)" if compiled else "decoding eager"
    print(f"{llm.path.path}: {built}; {llm.path.why}")


def chat_main():
    run_and_exit(chat)


def _check_text(name: str, text) -> None:
    """ValueError naming `name` for text that held bytes which are not UTF-8 (Python hands them over as
    lone surrogates, which no tokenizer takes)."""
    if isinstance(text, str):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            byte = f"byte 0x{ord(text[e.start]) & 0xFF:02x}" if 0xDC80 <= ord(text[e.start]) <= 0xDCFF else repr(text[e.start])
            raise ValueError(f"{name} is not UTF-8 text ({byte} at character {e.start}); pass UTF-8") from None


class _TurnError(ValueError):
    """One chat turn that cannot run (too long, not UTF-8): said on stderr, and the chat goes on."""


class _Conversation:
    """How a chat answers: each reply streamed to stdout, the oldest turns dropped to leave it room."""

    def __init__(self, llm, system, max_gen_len, sampling):
        self.llm, self.max_gen_len, self.sampling = llm, max_gen_len, sampling
        self.max_seq_len = llm.model.params.max_seq_len
        self.opening = [{"role": "system", "content": system}] if system is not None else []  # what every history starts with
        # Keep room for a reply: drop the oldest turns before the history squeezes it below this.
        self.reply_room = min(max_gen_len or self.max_seq_len, max(1, self.max_seq_len // 4))

    def reply(self, history) -> str:
        """Stream the assistant's answer to stdout and return it (history may lose its oldest turns)."""
        tokens, room = self._fit(history)
        if room < 1:
            raise _TurnError(f"the message is too long for --max_seq_len {self.max_seq_len}; shorten it or raise --max_seq_len")
        limit = min(self.max_gen_len or room, room)
        text, reason = _write_stream(self.llm.stream(tokens, limit, **self.sampling))
        if reason == "length":
            cause = (f"--max_gen_len {self.max_gen_len}" if limit == self.max_gen_len
                     else f"the end of --max_seq_len {self.max_seq_len}")
            print(f"(the reply was cut at {limit} tokens, {cause}; raise it for longer replies)", file=sys.stderr)
        return text

    def _fit(self, history):
        """`history`'s prompt tokens and the room they leave for a reply, once the oldest turns that
        would squeeze it below `reply_room` are dropped (never the last user turn)."""
        oldest, dropped = len(self.opening), False
        while True:
            tokens = self.llm.chat_prompt_tokens(history)
            room = self.max_seq_len - 1 - len(tokens)
            if room >= self.reply_room or len(history) - oldest <= 1:
                break
            del history[oldest : oldest + 2]  # the oldest user turn and its answer
            dropped = True
        if dropped:
            print("(the conversation outgrew --max_seq_len: dropped its oldest turns)", file=sys.stderr)
        return tokens, room


def _write_stream(stream):
    """Each piece of `stream` to stdout as it comes, then a line end; the whole text and why it ended."""
    pieces = []
    try:
        while True:
            try:
                piece = next(stream)
            except StopIteration as end:
                return "".join(pieces), end.value
            write_stdout(piece)
            pieces.append(piece)
    finally:
        stream.close()
        write_stdout("\n")


def _converse(conversation) -> None:
    """One user turn a line from stdin until EOF or /exit, each answered; /reset clears the history."""
    interactive = sys.stdin.isatty()
    history = list(conversation.opening)
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = on_main(sys.stdin.readline)  # Ctrl-C here ends the program (exit 130)
        if not line or line.strip() == "/exit":
            break
        text = line.rstrip("\n")
        try:
            _check_text("the message", text)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        if text.strip() == "/reset":
            history = list(conversation.opening)
            print("(history cleared)", file=sys.stderr, flush=True)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        try:
            history.append({"role": "assistant", "content": conversation.reply(history)})
        except KeyboardInterrupt:  # Ctrl-C during a reply: forget the turn, back to the prompt
            history.pop()
        except StdoutError:
            raise
        except ValueError as e:  # one turn too long for the context or its template: say so, keep chatting
            history.pop()
            print(f"error: {in_flag_terms(str(e), chat)}", file=sys.stderr)
