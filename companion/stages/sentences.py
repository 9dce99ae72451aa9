"""Split a stream of LLM deltas into sentences, so the first one can be spoken while the rest
is still being written."""

from __future__ import annotations

import re
from collections.abc import Iterator

# a title comes before a name, so a capital after it does not start a sentence
_TITLES = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof"}
# these end a sentence when a capital follows ("at 5 p.m. Then", "a dog named Max. It")
_ABBREVIATIONS = {"vs", "etc", "e.g", "i.e", "no", "approx", "min", "max", "fig", "a.m", "p.m"}
_END = re.compile(r"([.!?…]+[\"')\]]*)(\s+)|(\n+)")
_LONG_CLAUSE = re.compile(r"([,;:])\s+")


class SentenceSplitter:
    """Feed deltas; get back each sentence once it is complete.

    A sentence ends at . ! ? or a newline followed by white space, except after a title, a
    single initial, a number's decimal point, or a known abbreviation followed by a lower-case
    word (a line break after any of them ends the sentence). A clause longer than
    ``max_chars`` is cut at its last comma so a run-on sentence does not delay speech (and
    piper, which needs ~1.2 MB of working memory per character, stays near +100 MB).
    """

    def __init__(self, *, max_chars: int = 120) -> None:
        self._buffer = ""
        self.max_chars = max_chars

    def feed(self, delta: str) -> Iterator[str]:
        self._buffer += delta
        while True:
            cut = self._find_cut()
            if cut is None:
                return
            sentence, self._buffer = self._buffer[:cut].strip(), self._buffer[cut:].lstrip()
            if _speakable(sentence):
                yield sentence

    def flush(self) -> Iterator[str]:
        rest, self._buffer = self._buffer.strip(), ""
        if _speakable(rest):
            yield rest

    def _find_cut(self) -> int | None:
        for match in _END.finditer(self._buffer):
            if match.group(3):  # newline
                return match.end()
            if "\n" in match.group(2) or not match.group(1).startswith("."):
                return match.end()
            before = self._buffer[: match.start(1)]
            word = re.split(r"\s", before)[-1].lower().rstrip(".")
            if word in _TITLES or (len(word) == 1 and word.isalpha()):
                continue
            if word in _ABBREVIATIONS:
                if match.end() == len(self._buffer):
                    break  # the next word decides; flush() ends it if none comes
                if not self._buffer[match.end()].isupper():
                    continue
            return match.end()
        if len(self._buffer) > self.max_chars:
            clauses = list(_LONG_CLAUSE.finditer(self._buffer[: self.max_chars]))
            if clauses:
                return clauses[-1].end()
            return self.max_chars
        return None


def _speakable(text: str) -> bool:
    return any(c.isalnum() for c in text)


def split_sentences(text: str) -> list[str]:
    splitter = SentenceSplitter()
    return [*splitter.feed(text + " "), *splitter.flush()]
