"""What the probe must beat: the majority class, and weight statistics; and the two combined.

The weight-statistics baseline follows Unterthiner et al. 2020: per layer tensor,
mean, variance and quantiles, into a logistic regression. ``probe + w.stats`` adds
the probe's (held-out) logit as one more feature of that regression.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np


def roc_auc(y, score) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")


def scored(y, score, pred) -> dict:
    """Accuracy and ROC-AUC, keeping the per-model scores for the within-group report."""
    pred = np.asarray(pred, bool)
    return {"acc": float((pred == np.asarray(y, bool)).mean()), "auc": roc_auc(y, score),
            "score": np.asarray(score, float), "pred": pred}


def majority(y_train, y_test) -> dict:
    """Always answers the training split's majority class."""
    guess = int(y_train.mean() >= 0.5)
    out = scored(y_test, np.full(len(y_test), float(guess)), np.full(len(y_test), guess))
    return {**out, "auc": 0.5}


def weight_statistics(params) -> np.ndarray:
    """Per leaf (per layer tensor): mean, variance and 0/25/50/75/100% quantiles."""
    feats = []
    for leaf in jax.tree.leaves(params):
        x = np.asarray(leaf, np.float32).reshape(leaf.shape[0], -1)
        q = np.quantile(x, [0.0, 0.25, 0.5, 0.75, 1.0], axis=1).T
        feats += [x.mean(1, keepdims=True), x.var(1, keepdims=True), q]
    return np.concatenate(feats, axis=1)


def one_blas_thread():
    """BLAS on one thread: small fits on threads that spin beside JAX's cost 10x the CPU
    time (12 s vs 1 s per weight-statistics fit of 851 models on 2 cores), same result."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def logistic(x_train, y_train, x_test) -> np.ndarray:
    """P(label 1) on ``x_test``: standardised logistic regression, C by inner CV."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(np.asarray(y_train).tolist())) < 2:
        return np.full(len(x_test), float(np.mean(y_train)))
    folds = int(max(2, min(5, np.bincount(np.asarray(y_train, int)).min())))
    clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=10, cv=folds, max_iter=5000))
    with warnings.catch_warnings(), one_blas_thread():  # sklearn's deprecation notices
        warnings.simplefilter("ignore", FutureWarning)
        clf.fit(x_train, y_train)
    return clf.predict_proba(x_test)[:, 1]


def weight_stats(train_params, y_train, test_params, y_test) -> dict:
    """Logistic regression (C by inner cross-validation) on :func:`weight_statistics`."""
    p = logistic(weight_statistics(train_params), y_train, weight_statistics(test_params))
    return scored(y_test, p, p > 0.5)


def probe_and_weight_stats(probe_train, train_params, y_train, probe_test, test_params,
                           y_test) -> dict:
    """Logistic regression on [probe logit, weight statistics], fitted on training models.

    ``probe_train`` must be *held-out* probe logits of the training models (cross-fitted):
    a probe's logits on the models it trained on are near perfect, and a combiner fitted
    on them would trust the probe far more than its held-out logits deserve.
    """
    xtr = np.column_stack([probe_train, weight_statistics(train_params)])
    xte = np.column_stack([probe_test, weight_statistics(test_params)])
    p = logistic(xtr, y_train, xte)
    return scored(y_test, p, p > 0.5)


def setup_readability(params, groups: dict, seed: int = 0) -> dict:
    """How well weight statistics tell each setup variable: 5-fold CV accuracy, vs majority.

    High accuracy means the weights give that setup away to the weight-statistics
    baseline (a shortcut the probe, which only sees the models' answers, cannot take).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, out = weight_statistics(params), {}
    for name, values in groups.items():
        _, y = np.unique(np.asarray(values), return_inverse=True)
        counts = np.bincount(y)
        if len(counts) < 2 or counts.min() < 2:
            continue
        cv = StratifiedKFold(n_splits=int(min(5, counts.min())), shuffle=True, random_state=seed)
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        with one_blas_thread():
            acc = cross_val_score(clf, x, y, cv=cv).mean()
        out[name] = {"acc": float(acc), "majority": float(counts.max() / len(y))}
    return out
