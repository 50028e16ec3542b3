"""Two transfer-learning tasks from scikit-learn's digits (shipped with the package, no download).

Task A is digits 0-4, task B digits 5-9 (labels shifted to 0-4); a quarter of each is held out.
Shared by the transfer-learning examples.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits


def tasks(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """``{"A": {...}, "B": {...}}`` with ``x_train, y_train, x_test, y_test`` each."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target
    rng = np.random.default_rng(seed)
    out = {}
    for name, keep, offset in (("A", y < 5, 0), ("B", y >= 5, 5)):
        idx = rng.permutation(np.flatnonzero(keep))
        n_test = len(idx) // 4
        test, train = idx[:n_test], idx[n_test:]
        out[name] = dict(x_train=x[train], y_train=y[train] - offset,
                         x_test=x[test], y_test=y[test] - offset)
    return out
