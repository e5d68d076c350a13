"""Speculative decoding by prompt lookup: guess a request's next tokens from its own text, check them all
in one forward call, keep what the model agrees with.

`Drafter` guesses (the tokens that followed the newest earlier occurrence of the last 3, 2 or 1
tokens, from an n-gram index) and keeps each request's k; `plan_drafts` decides who guesses in a
step; the engine verifies (`Engine._verify`) with each guess a one-token segment of its row, so the
kept tokens are bit for bit those of plain decoding (float32). The whole design, k's policy and what
"auto" and "ngram" cost: docs/design/speculation.md.
"""

NGRAM_SIZES = (3, 2, 1)  # the suffix lengths looked up, longest first
START_K = 3  # guesses a request starts with
MAX_K = 7  # guesses at most per request and step
MAX_PAUSE = 16  # steps a request that keeps missing waits, at most, before guessing again

SPECULATIVE = ("auto", "ngram", "off")


def check_speculative(value) -> None:
    if value not in SPECULATIVE:
        raise ValueError(f"speculative must be one of {', '.join(map(repr, SPECULATIVE))}, got {value!r}")


class Drafter:
    """One request's n-gram index over its prompt and output, and how many tokens it guesses next."""

    def __init__(self, prompt):
        self.tokens = []
        self.follow = {}  # n-gram (tuple) -> where the token after its newest occurrence is in self.tokens
        self.k = START_K
        self.pause = 0  # steps left without guessing
        self.misses = 0  # guesses in a row with nothing accepted
        self.extend(prompt)

    def extend(self, ids) -> None:
        """Append ids to the text, indexing the n-grams each one follows."""
        for token in ids:
            end = len(self.tokens)
            for n in NGRAM_SIZES:
                if end >= n:
                    self.follow[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def propose(self, limit: int, pausing: bool = True) -> list:
        """Up to min(k, limit) guessed next tokens: what followed the newest earlier occurrence of the
        text's longest indexed suffix; [] when it has none, or (`pausing`) while it pauses after misses."""
        if self.pause and pausing:
            self.pause -= 1
            return []
        k = min(self.k, limit)
        if k <= 0:
            return []
        for n in NGRAM_SIZES:
            at = self.follow.get(tuple(self.tokens[-n:]))
            if at is not None:
                return self.tokens[at : at + k]
        return []

    def update(self, proposed: int, accepted: int) -> None:
        """Adapt k (and the pause) to how many of `proposed` guesses were accepted."""
        if accepted == proposed:
            self.k = min(2 * self.k, MAX_K)
        elif accepted:
            self.k = accepted + 1
        else:
            self.misses += 1
            self.k = max(1, self.k // 2)
            self.pause = min(2**self.misses, MAX_PAUSE)
            return
        self.misses = 0


def plan_drafts(drafters, limits, budget=None, pausing=True) -> list:
    """Each decoding request's guesses this step ([] for none): `drafters` (None: the request never
    guesses), `limits` (the most each may guess: its max_tokens left), `budget`: the most tokens the
    decoding rows may feed in all, guesses included (earlier requests guess first); None: every
    request guesses its k. `pausing`: a request that missed waits a few steps (where guesses cost
    something); where they are free it guesses on."""
    spare = float("inf") if budget is None else budget - len(drafters)
    drafts = []
    for drafter, limit in zip(drafters, limits):
        guess = drafter.propose(min(limit, spare), pausing=pausing) if drafter is not None and spare > 0 else []
        spare -= len(guess)
        drafts.append(guess)
    return drafts


class Acceptance:
    """Counts for reports: guessed and accepted tokens, and decoding steps of requests that guessed."""

    def __init__(self):
        self.proposed = self.accepted = self.steps = 0

    def add(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        self.steps += 1

    @property
    def tokens_per_step(self) -> float:
        """Tokens a guessing request got per step (1 + accepted guesses), averaged."""
        return 1 + self.accepted / self.steps if self.steps else 1.0
