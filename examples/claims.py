"""How every example ends: exit status 1 naming the claims that failed, else 0."""

from __future__ import annotations

import sys


def report(failures: list[str]) -> int:
    """Prints the verdict and returns the example's exit status."""
    if failures:
        print("FAILED claims:", "; ".join(failures), file=sys.stderr)
        return 1
    print("all claims checked")
    return 0
