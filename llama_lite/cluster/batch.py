"""BatchCompleter: the callable class Ray Data's `map_batches` runs in a pool of actors, one Llama
each (docs/cluster.md). A `prompt` column in; `generation`, `finish_reason` and `tokens` out, other
columns passed through. A row samples with seed + its index (the `index_column`), as prompt K of
plain `complete` does, so its text depends on neither the worker nor the rows beside it."""

import json

import numpy as np

from ..engine.sampling import request_seed
from ..prompt_records import checked_tokens


class BatchCompleter:
    """`ds.map_batches(BatchCompleter, concurrency=N, fn_constructor_kwargs={...})`.

    checkpoint and `build` (max_seq_len, max_batch_size, dtype, threads, ...) go to Llama.build;
    max_gen_len and `sampling` (temperature, top_p, top_k, presence_penalty, ...) to as_completed.
    With `seed`, the row whose `index_column` holds K samples with seed + K. `chat`: rows run as one
    user turn (or their "messages") through the chat template. A row that cannot run (too long,
    empty) gets "" with finish_reason "error" and its reason in the `error` column ("" for the rows
    that ran), and the job goes on."""

    def __init__(self, checkpoint=None, max_gen_len: int = 64, seed=None, index_column: str = "index", chat: bool = False,
                 sampling: "dict | None" = None, **build):
        from ..generation import Llama

        self.llm = Llama.build(checkpoint, seed=seed, **build)
        self.max_gen_len, self.seed, self.index_column, self.chat = max_gen_len, seed, index_column, chat
        self.sampling = {"temperature": 0.0, **(sampling or {})}

    def __call__(self, batch: dict) -> dict:
        prompts = batch["prompt"]
        messages = batch.get("messages")
        indices = [int(i) for i in batch[self.index_column]] if self.index_column in batch else None
        if self.seed is not None and indices is None:
            raise ValueError(f"BatchCompleter(seed=...) needs each row's place in the job: add an {self.index_column!r} "
                             "column (0, 1, ...) or pass index_column=")
        n = len(prompts)
        generation, reason, tokens, error = [""] * n, ["error"] * n, [[] for _ in range(n)], [""] * n
        runnable = {}
        for row in range(n):
            record = {"prompt": str(prompts[row])}
            if messages is not None and messages[row]:  # a list, or JSON text (what a job's driver sends)
                record["messages"] = json.loads(messages[row]) if isinstance(messages[row], str) else list(messages[row])
            try:
                runnable[row] = checked_tokens(self.llm, record, self.chat, self.max_gen_len)
            except ValueError as e:
                error[row] = str(e)
        for run in _consecutive(sorted(runnable, key=lambda r: indices[r] if indices else r), indices):
            seed = None if self.seed is None else request_seed(self.seed, indices[run[0]])
            results = self.llm.as_completed([runnable[r] for r in run], self.max_gen_len, seed=seed, **self.sampling)
            for i, result in results:
                row = run[i]
                generation[row], reason[row], tokens[row] = result["text"], result["finish_reason"], result["tokens"]
        return {**batch, "generation": np.array(generation, dtype=object), "finish_reason": np.array(reason, dtype=object),
                "tokens": _object_array(tokens), "error": np.array(error, dtype=object)}


def _consecutive(rows, indices) -> list:
    """`rows` (sorted by index) cut into runs of consecutive indices: each run is one call, prompt i
    of which samples with seed + the run's first index + i, which is seed + its own index."""
    runs = []
    for row in rows:
        if runs and (indices is None or indices[row] == indices[runs[-1][-1]] + 1):
            runs[-1].append(row)
        else:
            runs.append([row])
    return runs


def _object_array(lists) -> np.ndarray:
    """A column of lists of different lengths (numpy would make a 2-D array of equal ones)."""
    column = np.empty(len(lists), dtype=object)
    column[:] = lists
    return column
