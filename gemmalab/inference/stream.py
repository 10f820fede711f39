"""Incremental detokenization: text deltas from a growing list of ids, and stop strings."""

from __future__ import annotations


class TextStream:
    """Turns ids, one at a time, into safe text deltas.

    Holds back a trailing incomplete UTF-8 sequence (decoded as U+FFFD until its last byte arrives) and any
    tail that could still become a stop string, so streamed text never has to be taken back.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.longest_stop = max(map(len, self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""  # the text so far, cut before a stop string once one appears
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one id; returns the new text that is safe to show."""
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids)
        # Text handed out never changes and held no whole stop string, so only its last few characters and the
        # new tail need a look (the whole text every token made long answers quadratic).
        start = max(0, self.emitted - self.longest_stop + 1)
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = full[: min(hits)], True
            return self._take(len(self.text))
        self.text = full
        safe = len(full.rstrip("\ufffd"))
        hold = 0
        for s in self.stop:  # keep back a tail that is a prefix of a stop string
            for n in range(min(len(s) - 1, safe), 0, -1):
                if full[safe - n:safe] == s[:n]:
                    hold = max(hold, n)
                    break
        return self._take(safe - hold)

    def flush(self) -> str:
        """The rest of the text, at the end of generation."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        end = max(end, self.emitted)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta
