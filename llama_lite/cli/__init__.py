"""The command-line programs: `chat`, `complete` and `serve`, run by fire with users' exit codes.

scripts/chat.py, scripts/complete.py, scripts/serve.py and the installed `llama-lite-chat`,
`llama-lite-complete`, `llama-lite-serve` all call the `*_main` functions here, so there is one
implementation of each. runner.py runs a command under fire; flags.py holds the flags they share.
Exit codes: 0 done; 2 bad input (one `error: ...` line on stderr, no traceback); 130 interrupted.
"""

from .chat_command import chat, chat_main
from .complete_command import complete, complete_main
from .runner import run
from .serve_command import serve, serve_main

__all__ = ["chat", "chat_main", "complete", "complete_main", "run", "serve", "serve_main"]
