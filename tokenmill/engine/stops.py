"""Text-side stop strings and banned strings for the streaming layer."""

from __future__ import annotations


def held_suffix_len(text: str, strings: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `strings` (it may still grow into one).

    Text before that tail can be released; the tail must wait for more text.
    """
    best = 0
    for s in strings:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def find_banned(text: str, banned: list[str]) -> tuple[int, str] | None:
    """(offset, string) of the earliest occurrence in `text` of any of `banned` (case-sensitive); the longest string
    wins among those starting at the same offset. None if there is none."""
    best = None
    for s in banned:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(s) > len(best[1]))):
            best = (i, s)
    return best


class StopMatcher:
    """Holds back streamed text that may be the start of a stop string and cuts the text at the first stop.

    feed() returns the text now safe to release and the stop string matched, if any. The stop that completes first
    wins (as if text arrived one character at a time), the longer one on a tie; the text before it is released, the
    stop and everything after it never are. After a match the matcher releases nothing more.
    """

    def __init__(self, stop_strings: list[str]):
        self.stop_strings = [s for s in stop_strings if s]
        self._pending = ""
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, str | None]:
        if self.matched is not None:
            return "", None
        buf = self._pending + text
        hit = None  # (end, -length, start, string)
        for s in self.stop_strings:
            i = buf.find(s)
            if i >= 0 and (hit is None or (i + len(s), -len(s)) < hit[:2]):
                hit = (i + len(s), -len(s), i, s)
        if hit is not None:
            self._pending, self.matched = "", hit[3]
            return buf[: hit[2]], hit[3]
        cut = len(buf) - held_suffix_len(buf, self.stop_strings)
        self._pending = buf[cut:]
        return buf[:cut], None

    def flush(self) -> str:
        """The held-back text, at the end of generation when no stop string came."""
        out, self._pending = self._pending, ""
        return out
