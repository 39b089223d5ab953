"""Generated ids -> text as it streams: stop strings, the family's post-processing, safe deltas.

    text = TextStream(tok.decode, stop_ids=fam.stop_ids(tok), stops=["\\n\\n"], postprocess=fam.postprocess)
    stopped = text.push(token_id)     # True once a stop string has appeared (the text ends before it)
    delta = text.delta()              # new text that can no longer change
    delta = text.delta(final=True)    # the rest, at the end

Deltas join to `text.final()`. A delta never holds text that a later token could still change: a
tail that may be the start of a stop string, an incomplete UTF-8 character (sentencepiece's byte
pieces decode to U+FFFD until complete), or characters the post-processing would still rewrite
(stripped whitespace, ChatGLM-6B's punctuation next to a Chinese character, ChatGLM3's metadata
line): a character is released once appending any of a few probe continuations leaves it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

PROBES = ("\n", " ", "a", ",", "中", "。")


def _common_prefix(first: str, second: str) -> int:
    """The length of the longest common prefix of two strings."""
    shorter = min(len(first), len(second))
    for i in range(shorter):
        if first[i] != second[i]:
            return i
    return shorter


class TextStream:
    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stop_ids: Sequence[int] = (),
        stops: Sequence[str] = (),
        postprocess: Callable[[str], str] | None = None,
    ):
        self.decode, self.stop_ids, self.stops = decode, set(stop_ids), [stop for stop in stops if stop]
        self.postprocess = postprocess or (lambda text: text)
        self.ids: list[int] = []
        self.raw = ""
        self.sent = ""
        self.stopped = False

    def push(self, token: int) -> bool:
        """Add a generated id (stop ids add nothing). -> True when a stop string ends the text."""
        if self.stopped or token in self.stop_ids:
            return self.stopped
        self.ids.append(int(token))
        raw = self.decode(self.ids)
        found = [at for at in (raw.find(stop) for stop in self.stops) if at >= 0]
        if found:
            raw, self.stopped = raw[: min(found)], True
        self.raw = raw
        return self.stopped

    def final(self) -> str:
        return self.postprocess(self.raw)

    def delta(self, final: bool = False) -> str:
        if final:
            text = self.final()
        else:
            raw = self.raw
            if not self.stopped:
                raw = raw[: len(raw) - self._held(raw)]
            text = self.postprocess(raw)
            for probe in PROBES:
                text = text[: _common_prefix(text, self.postprocess(raw + probe))]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        out, self.sent = text[len(self.sent) :], text
        return out

    def _held(self, raw: str) -> int:
        """How many trailing characters of raw may still change: an incomplete character, or the
        longest tail that starts a stop string."""
        held = len(raw) - len(raw.rstrip("\ufffd"))
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(raw)), 0, -1):
                if raw.endswith(stop[:k]):
                    held = max(held, k)
                    break
        return held
