"""Token ids to text as they come: incremental detokenisation and stop strings.

Work per token is bounded by the tokens not yet settled into text and the longest stop
string, so a whole answer costs time linear in its length.
"""

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


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> Optional[int]:
    """Index of the earliest stop string in `text` that begins at or after `start`, or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
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
    characters, so each new token is decoded together with the tokens since the last
    settled point (the difference of two short decodes gives its text); a delta is never
    half a UTF-8 character, and never the start of what may be a stop string. Most tokens
    take a shortcut with the same result: a plain piece after settled text that is not
    empty adds just its own text (`Tokenizer.pieces`), with no decode at all (a server
    streaming to many clients spends much of its host time here otherwise).
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = (), after: Sequence[int] = ()):
        """`after`: tokens the text follows (a prompt, for an echo): decoded with the first new
        tokens so that their leading space stays, never part of the text."""
        self.tokenizer = tokenizer
        self._after = list(after)
        self.stops = list(stops)
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.tokens: List[int] = []
        self.text = ""  # the settled text (cut before a stop string once one is found)
        self.ends: List[int] = []  # len(text) once each token's text has settled
        self.emitted = 0
        self.stopped = False  # a stop string was found: the text ends before it
        self._prefix = 0  # tokens[_prefix:_read] decode to the text just before the unsettled tokens
        self._read = 0
        pieces = getattr(tokenizer, "pieces", None)
        self._joined, self._alone = pieces() if pieces is not None else (None, None)
        self._settled_text = False  # tokens[_prefix:_read] (no `after` in them) are known to decode to some text

    def add(self, token: int) -> str:
        """Adds a token; returns the newly settled text (possibly empty)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        single = self._read == len(self.tokens) - 1  # nothing unsettled before this token
        known = self._joined is not None and 0 <= token < len(self._joined)
        if single and known and self._settled_text and self._joined[token] is not None:
            delta = self._joined[token]  # (the shortcut: what the two decodes below would give)
        else:
            before, after = self._decode(self._read), self._decode(len(self.tokens))
            if len(after) <= len(before) or after.endswith("\ufffd"):  # an unfinished UTF-8 character
                return ""
            delta = after[len(before) :]
        searched_from = max(0, len(self.text) - self.longest_stop + 1)
        self.text += delta
        self._prefix, self._read = self._read, len(self.tokens)
        self._settled_text = single and known and self._prefix > 0 and self._alone[token] != ""
        self.ends += [len(self.text)] * (len(self.tokens) - len(self.ends))
        if not self.stops:
            return self._emit(len(self.text))
        cut = find_stop(self.text, self.stops, searched_from)
        if cut is not None:
            self.stopped = True
            self.text = self.text[:cut]
            return self._emit(len(self.text))
        return self._emit(len(self.text) - _pending_stop_prefix(self.text[-self.longest_stop:], self.stops))

    def finish(self) -> str:
        """The rest of the text, once no more tokens will come (an unfinished character too)."""
        if not self.stopped and self._read < len(self.tokens):
            searched_from = max(0, len(self.text) - self.longest_stop + 1)
            before = self._decode(self._read)
            self.text += self._decode(len(self.tokens))[len(before) :]
            self._read = len(self.tokens)
            self._settled_text = False
            self.ends += [len(self.text)] * (len(self.tokens) - len(self.ends))
            cut = find_stop(self.text, self.stops, searched_from) if self.stops else None
            if cut is not None:
                self.stopped = True
                self.text = self.text[:cut]
        return self._emit(len(self.text))

    def tokens_before_stop(self) -> int:
        """How many tokens have their text wholly in the (cut) text."""
        return sum(1 for end in self.ends if end <= len(self.text)) if self.stopped else len(self.tokens)

    def _decode(self, end: int) -> str:
        """The text of tokens[_prefix:end], after `after` while nothing has settled past it."""
        head = self._after if self._prefix == 0 else []
        return self.tokenizer.decode(head + self.tokens[self._prefix : end])

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
