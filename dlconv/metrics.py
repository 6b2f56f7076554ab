"""Evaluation metrics for ``dlconv train``: the ROC AUC of a binary classifier.

:func:`roc_auc` uses scikit-learn's ``roc_auc_score`` where scikit-learn is installed, else
:func:`mann_whitney_auc`, the exact rank formula (the two agree to rounding; the tests
check both against a count over all signal-background pairs):

    AUC = P(score of a random positive > score of a random negative)
          + ½ P(the two scores are equal)
        = (R₁ − n₁(n₁+1)/2) / (n₁ n₀)

with R₁ the sum of the positives' ranks among all scores, ties given their average rank
(the Mann–Whitney U statistic over n₁ n₀).
"""

from __future__ import annotations

import numpy as np

__all__ = ["roc_auc", "mann_whitney_auc"]


def _check(y_true, score):
    y = np.asarray(y_true)
    s = np.asarray(score, np.float64)
    if y.ndim != 1 or s.ndim != 1 or len(y) != len(s):
        raise ValueError(f"y_true and score must be 1-D of the same length, got shapes "
                         f"{np.shape(y_true)} and {np.shape(score)}")
    labels = set(np.unique(y).tolist())
    if not labels <= {0, 1, False, True}:
        raise ValueError(f"y_true must hold labels 0 and 1, got {sorted(labels)}")
    if len(labels) < 2:
        raise ValueError(f"y_true must hold both classes (0 and 1) for an AUC, got only "
                         f"{sorted(labels)}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"score must be finite, got {int(np.sum(~np.isfinite(s)))} "
                         f"non-finite value(s)")
    return y.astype(bool), s


def mann_whitney_auc(y_true, score) -> float:
    """Exact ROC AUC by average ranks (ties count ½), in O(n log n)."""
    y, s = _check(y_true, score)
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # ranks 1..n; a run of equal scores gets the mean of its ranks
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    mean_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    n1 = int(y.sum())
    n0 = len(y) - n1
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def roc_auc(y_true, score) -> float:
    """ROC AUC of ``score`` for labels ``y_true`` (0/1): scikit-learn's where installed,
    else :func:`mann_whitney_auc`.  ValueError for one class only, mismatched shapes,
    other labels or non-finite scores."""
    y, s = _check(y_true, score)
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        return mann_whitney_auc(y, s)
    return float(roc_auc_score(y, s))
