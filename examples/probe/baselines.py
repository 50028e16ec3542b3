"""What the probe must beat: the majority class, and weight statistics.

The weight-statistics baseline follows Unterthiner et al. 2020: per layer tensor,
mean, variance and quantiles, into a logistic regression.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np


def roc_auc(y, score) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")


def majority(y_train, y_test) -> dict:
    """Always answers the training split's majority class."""
    guess = int(y_train.mean() >= 0.5)
    return {"acc": float((y_test == guess).mean()), "auc": 0.5}


def weight_statistics(params) -> np.ndarray:
    """Per leaf (per layer tensor): mean, variance and 0/25/50/75/100% quantiles."""
    feats = []
    for leaf in jax.tree.leaves(params):
        x = np.asarray(leaf, np.float32).reshape(leaf.shape[0], -1)
        q = np.quantile(x, [0.0, 0.25, 0.5, 0.75, 1.0], axis=1).T
        feats += [x.mean(1, keepdims=True), x.var(1, keepdims=True), q]
    return np.concatenate(feats, axis=1)


def weight_stats(train_params, y_train, test_params, y_test) -> dict:
    """Logistic regression (C by inner cross-validation) on :func:`weight_statistics`."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr, xte = weight_statistics(train_params), weight_statistics(test_params)
    if len(set(y_train.tolist())) < 2:
        p = np.full(len(y_test), float(y_train.mean()))
    else:
        folds = int(max(2, min(5, np.bincount(y_train.astype(int)).min())))
        clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=10, cv=folds, max_iter=5000))
        with warnings.catch_warnings():  # sklearn's deprecation notices about defaults
            warnings.simplefilter("ignore", FutureWarning)
            clf.fit(xtr, y_train)
        p = clf.predict_proba(xte)[:, 1]
    return {"acc": float(((p > 0.5) == y_test).mean()), "auc": roc_auc(y_test, p),
            "features": xtr.shape[1]}
