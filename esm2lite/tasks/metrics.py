"""Task metrics, on the original target scale, in plain numpy.

    regression               mse, rmse, pearson, spearman (average ranks for ties), r2;
                             with several targets each is the mean over targets, and
                             `<metric>_<target name>` gives each target's own value
    classification           accuracy, macro_f1
    token-classification     accuracy, macro_f1 over labelled residues (target != IGNORE_INDEX)

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
import torch

from esm2lite.constants import IGNORE_INDEX, TASKS

METRIC_DIRECTION = {"loss": "min", "mse": "min", "rmse": "min", "pearson": "max",
                    "spearman": "max", "r2": "max", "accuracy": "max", "macro_f1": "max"}


TASK_METRICS = dict(zip(TASKS, (("loss", "mse", "rmse", "pearson", "spearman", "r2"),
                                 ("loss", "accuracy", "macro_f1"), ("loss", "accuracy", "macro_f1"))))
DEFAULT_METRIC = dict(zip(TASKS, ("spearman", "accuracy", "accuracy")))  # chooses best/ unless told


def metric_names(task: str, target_names=()) -> list[str]:
    """Every metric name evaluation reports for a task (per-target ones with several targets)."""
    names = list(TASK_METRICS[task])
    if task == "regression" and len(target_names) > 1:
        names += [f"{k}_{t}" for k in TASK_METRICS[task][1:] for t in target_names]
    return names


def metric_direction(name: str) -> str:
    """"min" or "max" for a metric name, per-target names included ("spearman_stability")."""
    for key in sorted(METRIC_DIRECTION, key=len, reverse=True):
        if name == key or name.startswith(key + "_"):
            return METRIC_DIRECTION[key]
    raise KeyError(f"unknown metric {name!r}; known: {', '.join(METRIC_DIRECTION)}")


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.double() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


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


def _regression(outputs, targets, label_space) -> dict:
    pred, true = torch.as_tensor(outputs), torch.as_tensor(targets)
    n = pred.shape[0]
    pred, true = pred.reshape(n, -1), true.reshape(n, -1)
    if label_space is not None:
        pred, true = label_space.unstandardize(pred.double()), label_space.unstandardize(true.double())
    pred, true = _np(pred).astype(np.float64), _np(true).astype(np.float64)
    names = list(label_space.target_names) if label_space is not None else []
    if len(names) != pred.shape[1]:
        names = [str(i) for i in range(pred.shape[1])]
    keys = ("mse", "rmse", "pearson", "spearman", "r2")
    if n == 0:
        return {k: float("nan") for k in keys}
    per = []
    for j in range(pred.shape[1]):
        p, t = pred[:, j], true[:, j]
        mse = float(np.mean((p - t) ** 2))
        per.append({"mse": mse, "rmse": math.sqrt(mse), "pearson": pearson(p, t),
                    "spearman": spearman(p, t), "r2": r2(p, t)})
    out = {k: float(np.mean([m[k] for m in per])) for k in keys}
    if len(per) > 1:
        for name, m in zip(names, per):
            out.update({f"{k}_{name}": m[k] for k in keys})
    return out


def _classes(outputs, targets):
    """-> (predicted class indices, target indices) as flat int arrays, labelled only."""
    if isinstance(outputs, (list, tuple)):
        parts = [_classes(o, t) for o, t in zip(outputs, targets)]
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate([p for p, _ in parts]), np.concatenate([t for _, t in parts])
    out, tgt = torch.as_tensor(outputs), torch.as_tensor(targets)
    pred = out.argmax(-1) if out.dim() == tgt.dim() + 1 else out
    pred, tgt = _np(pred).reshape(-1).astype(np.int64), _np(tgt).reshape(-1).astype(np.int64)
    keep = tgt != IGNORE_INDEX
    return pred[keep], tgt[keep]


def compute_metrics(task: str, outputs, targets, label_space=None) -> dict:
    """Metrics for a whole split, as floats.

    regression: outputs and targets [N, n_targets] (or [N]) on the training (standardised)
    scale, as LabelSpace.encode gives them; they are put back on the original scale with
    `label_space` (None = use as they are).
    classification: logits [N, C] (or predicted indices [N]), targets [N].
    token-classification: logits [N, T, C] (or indices [N, T]), targets [N, T] with IGNORE_INDEX =
    no label; lists of per-batch tensors (different T) are accepted too.
    """
    if task == "regression":
        if isinstance(outputs, (list, tuple)):
            outputs = torch.cat([torch.as_tensor(o).reshape(len(o), -1) for o in outputs])
            targets = torch.cat([torch.as_tensor(t).reshape(len(t), -1) for t in targets])
        return _regression(outputs, targets, label_space)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}")
    pred, tgt = _classes(outputs, targets)
    if len(tgt) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    return {"accuracy": float(np.mean(pred == tgt)), "macro_f1": macro_f1(pred, tgt)}
