"""What every example shares: a ``--quick`` flag, claims checked out loud, a small table."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence


def quick(doc: str, argv: Sequence[str] | None = None) -> bool:
    """Parses the command line of an example; True under ``--quick`` (the tests' size)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few steps")
    return parser.parse_args(argv).quick


def table(head: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Left-aligned columns under a ruled header."""
    cells = [[str(c) for c in head], *([str(c) for c in r] for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join([lines[0], "-" * (sum(widths) + 2 * len(widths) - 2), *lines[1:]])


class Claims:
    """Checks claims as they are made; ``done()`` is the example's exit status."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, name: str, ok: object, *args: object, **kwargs: object) -> bool:
        """``ok``: a truth value, or a function that raises ``AssertionError`` when called with
        ``args`` if the claim fails (``jf.assert_frozen``: its message names what moved)."""
        if callable(ok):
            try:
                ok(*args, **kwargs)
                ok = True
            except AssertionError as e:
                name, ok = f"{name}: {e}", False
        print(("ok      " if ok else "FAILED  ") + name)
        if not ok:
            self.failed.append(name)
        return bool(ok)

    def done(self) -> int:
        """0 if every claim held; else 1, naming the failed claims on stderr."""
        if self.failed:
            print("FAILED claims:", "; ".join(self.failed), file=sys.stderr)
            return 1
        print("all claims checked")
        return 0
