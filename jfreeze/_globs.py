"""Private: ``jf.paths`` globs, compiled once and matched segment by segment.

Matching takes ``O(len(glob) * len(path))`` steps, never the exponential
backtracking of a regex with nested unbounded quantifiers. Used by
:mod:`jfreeze.selectors` only.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Sequence

__all__ = ["Glob", "compile_glob"]

_STAR, _ANY, _DEEP = ("*",), ("?",), ("**",)  # tokens; a 1-char str is a literal


def _segment_tokens(seg: str) -> tuple:
    """One glob segment as tokens: ``_STAR``, ``_ANY``, literal chars, classes."""
    out: list = []
    i, n = 0, len(seg)
    while i < n:
        c = seg[i]
        i += 1
        if c == "*":
            if not out or out[-1] is not _STAR:  # "**" inside a segment is "*"
                out.append(_STAR)
        elif c == "?":
            out.append(_ANY)
        elif c == "[":
            j = i  # where the class ends, by fnmatch's own rule
            if j < n and seg[j] == "!":
                j += 1
            if j < n and seg[j] == "]":
                j += 1
            while j < n and seg[j] != "]":
                j += 1
            if j >= n:
                out.append("[")  # no closing "]" in this segment: a literal "["
            else:
                # fnmatch compiles the class: "!" negates, "^" is literal, ranges.
                out.append(re.compile(fnmatch.translate(seg[i - 1 : j + 1])))
                i = j + 1
        else:
            out.append(c)
    return tuple(out)


def _advance_stars(states: set, tokens: Sequence) -> set:
    # A star (or "**" segment) may match nothing: also be past it (and past the
    # stars after it). Each position is added once, so this stays linear.
    out = set(states)
    for i in sorted(states):
        while i < len(tokens) and (tokens[i] is _STAR or tokens[i] is _DEEP) and i + 1 not in out:
            i += 1
            out.add(i)
    return out


class Glob:
    """A compiled glob; :meth:`fullmatch` tells whether a path string matches.

    Matching simulates the pattern as a set of states (a Thompson NFA), first
    over ``/``-separated segments, then over the characters of one segment, so
    every path is matched in at most ``(len(glob) + 1) * (len(path) + 1)`` steps.
    """

    def __init__(self, glob: str):
        self.glob = glob
        self.literal = not any(c in glob for c in "*?[")
        self.parts = tuple(_DEEP if s == "**" else _segment_tokens(s) for s in glob.split("/"))
        self._seen: dict[str, bool] = {}

    def fullmatch(self, path: str) -> bool:
        """True if ``path`` matches the whole glob."""
        if self.literal:
            return path == self.glob
        found = self._seen.get(path)
        if found is None:  # a tree is evaluated at every trace: remember answers
            if len(self._seen) > 65536:
                self._seen.clear()
            found = self._seen[path] = self.match_counting(path)[0]
        return found

    def match_counting(self, path: str) -> tuple[bool, int]:
        """``(matched, steps)``: steps counts state transitions, for tests."""
        steps = 0
        states = _advance_stars({0}, self.parts)
        for seg in path.split("/"):
            nxt = set()
            for i in states:
                steps += 1
                if i == len(self.parts):
                    continue
                part = self.parts[i]
                if part is _DEEP:
                    nxt.add(i)  # "**" takes this segment and may take more
                else:
                    ok, k = _match_segment(part, seg)
                    steps += k
                    if ok:
                        nxt.add(i + 1)
            states = _advance_stars(nxt, self.parts)
            if not states:
                break
        return len(self.parts) in states, steps

    def __repr__(self):
        return f"Glob({self.glob!r})"


def _match_segment(tokens: tuple, seg: str) -> tuple[bool, int]:
    steps = 0
    states = _advance_stars({0}, tokens)
    for c in seg:
        nxt = set()
        for i in states:
            steps += 1
            if i == len(tokens):
                continue
            t = tokens[i]
            if t is _STAR:
                nxt.add(i)
            elif t is _ANY or t == c or (isinstance(t, re.Pattern) and t.match(c)):
                nxt.add(i + 1)
        states = _advance_stars(nxt, tokens)
        if not states:
            return False, steps
    return len(tokens) in states, steps


@functools.lru_cache(maxsize=4096)
def compile_glob(glob: str) -> Glob:
    """The compiled form of a ``jf.paths`` glob (cached).

    >>> compile_glob("enc/**/k*").fullmatch("enc/layers/0/kernel")
    True
    >>> compile_glob("a[!b]c").fullmatch("a/c")  # no class, star or ? crosses '/'
    False
    """
    return Glob(glob)
