"""Token ids to text as they come: exact incremental detokenisation and stop strings."""

from typing import List, Optional, Sequence

from llama.tokenizer import Tokenizer


def validate_stop(stop) -> List[str]:
    """`stop` as a list of non-empty strings (None: no stop strings)."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    for s in stops:
        if not isinstance(s, str) or s == "":
            raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
    return stops


def find_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """Index of the earliest stop string in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _pending_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could begin a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class TextStream:
    """Feeds token ids, yields text deltas whose concatenation is the decoded text.

    SentencePiece drops the leading space of a text and joins byte-fallback tokens into
    characters, so the text is decoded whole each time and only its settled part is
    emitted: never half a UTF-8 character, never the start of what may be a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.tokens: List[int] = []
        self.emitted = 0
        self.stopped = False  # a stop string was found: the text ends before it
        self.text = ""

    def add(self, token: int) -> str:
        """Adds a token; returns the newly settled text (possibly empty)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens)
        cut = find_stop(self.text, self.stops)
        if cut is not None:
            self.stopped = True
            self.text = self.text[:cut]
            return self._emit(len(self.text))
        end = len(self.text) - _pending_stop_prefix(self.text, self.stops)
        while end > self.emitted and self.text[end - 1] == "\ufffd":  # an unfinished UTF-8 character
            end -= 1
        return self._emit(end)

    def finish(self) -> str:
        """The rest of the text, once no more tokens will come."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
