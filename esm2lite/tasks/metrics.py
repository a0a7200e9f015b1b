"""Metrics in plain numpy, on the original target scale (each task picks its own: regression.py
mse, rmse, pearson, spearman, r2; classification.py and per_residue.py accuracy, macro_f1).

Conventions for degenerate input (they never raise):
- pearson / spearman are 0.0 when predictions or targets are constant, or there are fewer
  than two values (no linear / rank association can be measured: a constant predictor
  ranks nothing). They are never NaN, so "best so far" comparisons stay well defined.
- r2 with constant targets is 1.0 for a perfect prediction, else 0.0 (as scikit-learn).
- macro_f1 averages F1 = 2TP / (2TP + FP + FN) over the classes that occur in the targets
  or the predictions (as scikit-learn's f1_score(average="macro")).
- No labelled values at all (e.g. every residue masked): every metric is NaN (evaluate.score
  refuses a split whose metrics are not finite, saying why: JSON has no NaN).
"""

import math

import numpy as np


METRIC_DIRECTION = {"loss": "min", "mse": "min", "rmse": "min", "pearson": "max",
                    "spearman": "max", "r2": "max", "accuracy": "max", "macro_f1": "max"}


def metric_direction(name: str) -> str:
    """"min" or "max" for a metric name, per-target names included ("spearman_stability")."""
    for key in sorted(METRIC_DIRECTION, key=len, reverse=True):
        if name == key or name.startswith(key + "_"):
            return METRIC_DIRECTION[key]
    raise KeyError(f"unknown metric {name!r}; known: {', '.join(METRIC_DIRECTION)}")


def rankdata(x) -> np.ndarray:
    """1-based ranks, ties get the average of their ranks (scipy's method="average")."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    n = len(x)
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # first index of each tie group
    ends = np.r_[starts[1:], n]  # one past the last
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return 0.0
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if den == 0.0 or not math.isfinite(den):
        return 0.0
    return float(np.clip(float(dx @ dy) / den, -1.0, 1.0))


def spearman(x, y) -> float:
    if len(x) < 2:
        return 0.0
    return pearson(rankdata(x), rankdata(y))


def r2(pred, target) -> float:
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    ss_res = float(((target - pred) ** 2).sum())
    ss_tot = float(((target - target.mean()) ** 2).sum())
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


def macro_f1(pred, target) -> float:
    pred, target = np.asarray(pred), np.asarray(target)
    labels = np.union1d(pred, target)
    f1s = []
    for c in labels:
        tp = int(np.sum((pred == c) & (target == c)))
        fp = int(np.sum((pred == c) & (target != c)))
        fn = int(np.sum((pred != c) & (target == c)))
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))
