"""A request's text, grown a token at a time, released only once it is certain.

Decoding one token alone is wrong (SentencePiece drops a piece's leading space at the start of a
text; a character may span several byte tokens), and decoding everything so far each step costs
more the longer the reply. So each step decodes a short window: the ids since the last point where
the text came out whole, with and without the new ones, and takes the difference (the method of
Hugging Face's text-generation-inference and vLLM). Text is then held back while it ends in half a
UTF-8 character or could still be the start of a stop string; a stop string ends the text before it.
"""

REPLACEMENT = "\ufffd"  # what a decoder makes of an incomplete UTF-8 sequence


class Detokenizer:
    def __init__(self, tokenizer, stop=(), prompt_ids=()):
        """`prompt_ids`: ids whose text comes first (echo); stop strings are looked for after them."""
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids = []
        self.window_start = self.first_new = 0  # ids[window_start:first_new]: text already taken; ids[first_new:] are new
        self.held = ""  # taken text not yet released: it may begin a stop string
        self.stopped = False  # a stop string was found: nothing more comes
        self.echo = ""
        if prompt_ids:
            self.ids = list(prompt_ids)
            self.echo = self.tokenizer.decode(self.ids)
            # The window keeps a few prompt ids as context, so the first new piece keeps its space.
            self.window_start, self.first_new = max(0, len(self.ids) - 4), len(self.ids)

    def add(self, ids) -> str:
        """Take new ids; the text that is now certain (maybe empty)."""
        self.ids.extend(ids)
        return self._release(self._new_text(final=False), final=False)

    def finish(self) -> str:
        """No more ids: the rest of the text, held parts and any incomplete character included."""
        return self._release(self._new_text(final=True), final=True)

    def _new_text(self, final: bool) -> str:
        if self.stopped:
            return ""
        before = self.tokenizer.decode(self.ids[self.window_start : self.first_new])
        after = self.tokenizer.decode(self.ids[self.window_start :])
        if len(after) <= len(before) or (after.endswith(REPLACEMENT) and not final):
            return ""  # nothing yet, or the next ids should complete a character
        self.window_start, self.first_new = self.first_new, len(self.ids)
        return after[len(before) :]

    def _release(self, text: str, final: bool) -> str:
        out, self.echo = self.echo, ""
        text = self.held + text
        self.held = ""
        if self.stopped or not self.stop:
            return out + text
        ends = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if ends:
            self.stopped = True
            return out + text[: min(ends)]
        keep = 0 if final else max(_prefix_at_end(text, s) for s in self.stop)
        self.held = text[len(text) - keep :] if keep else ""
        return out + text[: len(text) - keep]


def _prefix_at_end(text: str, stop: str) -> int:
    """The length of the longest proper prefix of `stop` that `text` ends with (0 if none)."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0
