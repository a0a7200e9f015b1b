"""Regression: one or more numbers per sequence (BioNeMo's ESM-2 fine-tuning: MSE on mean-pooled
embeddings). Targets may be trained on z-scored (--standardize-targets); predictions and metrics
are always on the original scale.

    head      mean over residues -> Linear(d, 256) -> ReLU -> Dropout -> Linear(256, n_targets)
    loss      mean squared error over every sequence and target
    metrics   mse, rmse, pearson, spearman, r2 (several targets: the mean over targets, and each
              target's own as <metric>_<target>)
"""

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F

from esm2lite.errors import DataError, quoted
from esm2lite.model.heads import MLPHead
from esm2lite.tasks.base import (STATISTIC_LIMIT, Task, metrics_title, new_figure, no_autocast, parse_number,
                                 target_error)
from esm2lite.tasks.metrics import pearson, r2, spearman

KEYS = ("mse", "rmse", "pearson", "spearman", "r2")


def _is_float(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False


class Regression(Task):
    name = "regression"
    help = "a number per sequence (several target columns: one each)"
    multi_target = True
    numeric = True
    metrics = ("loss", *KEYS)
    headline = "spearman"

    def metric_names(self, target_names) -> list[str]:
        names = list(self.metrics)
        if len(target_names) > 1:
            names += [f"{k}_{t}" for k in KEYS for t in target_names]
        return names

    # ------------------------------------------------------------ reading

    def parse_target(self, fields, heres) -> tuple[float, ...]:
        return tuple(self._number(value, here) for value, here in zip(fields, heres))

    @staticmethod
    def _number(value: str, here: str) -> float:
        """A target; text that is no number at all gets the --task that reads labels."""
        try:
            x = parse_number(value, here)
        except DataError as e:
            if value == "" or _is_float(value):  # empty, nan or inf: no other task would read it either
                raise
            raise DataError(f"{e}; regression needs numbers: for a class per sequence train with --task "
                            "classification, for a label per residue (e.g. HHHEEECCC) --task token-classification") from None
        if (why := target_error(x)) is not None:  # a finite float64 that float32 cannot hold
            raise DataError(f"{here}: {quoted(value)} is {why}")
        return x

    def target_from_object(self, target, here, n_targets) -> tuple[float, ...]:
        if isinstance(target, torch.Tensor):
            target = target.tolist()
        values = tuple(target) if isinstance(target, (tuple, list, np.ndarray)) else (target,)
        for v in values:  # finite numbers; their range is the label space's to check (check / fit)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise DataError(f"{here}: {quoted(v)} is not a finite number")
        if not values:
            raise DataError(f"{here}: no target values")
        if n_targets is not None and len(values) != n_targets:
            raise DataError(f"{here}: {len(values)} target values, item 0 has {n_targets}")
        return tuple(float(v) for v in values)

    # ------------------------------------------------------------ the label space

    def fit(self, records, target_names, standardize) -> dict:
        """Mean and population std of each target (1 where constant) with --standardize-targets."""
        y = np.array([r.target for r in records], dtype=np.float64)
        source = records[0].source
        if y.ndim != 2 or y.shape[1] != len(target_names):
            raise DataError(f"{source}: {y.shape[-1] if y.ndim == 2 else '?'} target values "
                            f"per record, but {len(target_names)} target names")
        self._check_values(target_names, records)
        if not standardize:
            return {"classes": []}
        mean, std = y.mean(0), y.std(0)
        for j, name in enumerate(target_names):
            why = target_error(float(mean[j]), STATISTIC_LIMIT) or target_error(float(std[j]), STATISTIC_LIMIT)
            if why is not None:
                raise DataError(f"{source}, column {quoted(name)}: the mean or standard deviation of the training "
                                f"targets ({mean[j]:g}, {std[j]:g}) is {why}; --standardize-targets cannot use it")
        return {"classes": [], "mean": mean.tolist(), "std": np.where(std > 0, std, 1.0).tolist()}

    def check(self, labels, records) -> None:
        self._check_values(labels.target_names, records)

    @staticmethod
    def _check_values(target_names, records) -> None:
        for r in records:
            if len(r.target) != len(target_names):
                raise DataError(f"{r.where()}: {len(r.target)} target values, the model predicts {len(target_names)}")
            for name, value in zip(target_names, r.target):
                if (why := target_error(value)) is not None:
                    raise DataError(f"{r.where(name)}: target {quoted(value)} is {why}")

    def num_outputs(self, labels) -> int:
        return len(labels.target_names)

    def encode(self, labels, records) -> torch.Tensor:
        """float32 [N, n_targets], standardised when the space has a mean and std."""
        y = torch.tensor([r.target for r in records], dtype=torch.float64).reshape(len(records), len(labels.target_names))
        if labels.mean is not None:
            y = (y - torch.tensor(labels.mean, dtype=torch.float64)) / torch.tensor(labels.std, dtype=torch.float64)
        return y.float()

    def decode(self, labels, outputs, lengths=None) -> torch.Tensor:
        """[N, n] head outputs -> values on the original scale (float32)."""
        outputs = torch.as_tensor(outputs).detach()
        return labels.unstandardize(outputs.reshape(outputs.shape[0], -1).cpu())

    # ------------------------------------------------------------ head and loss

    def head(self, d_model, num_outputs, hidden=256, dropout=0.25):
        return MLPHead(self.name, d_model, num_outputs, hidden, dropout)

    def loss_sum(self, outputs, target):
        """Squared errors summed over every sequence and target; as many units as values."""
        with no_autocast(outputs):
            outputs = outputs.float()
            return F.mse_loss(outputs, target.float().reshape(outputs.shape), reduction="sum"), outputs.numel()

    # ------------------------------------------------------------ a split's metrics

    def metrics_of(self, labels, outputs, targets) -> dict:
        """outputs and targets [N, n_targets] (or [N], or lists of batches) on the training scale, as
        encode gives them; put back on the original scale with `labels` (None: as they are)."""
        if isinstance(outputs, (list, tuple)):
            if not outputs:
                return {k: float("nan") for k in KEYS}
            outputs = torch.cat([torch.as_tensor(o).reshape(len(o), -1) for o in outputs])
            targets = torch.cat([torch.as_tensor(t).reshape(len(t), -1) for t in targets])
        n = outputs.shape[0]
        pred, true = torch.as_tensor(outputs).reshape(n, -1).double(), torch.as_tensor(targets).reshape(n, -1).double()
        if labels is not None:
            pred, true = labels.unstandardize(pred), labels.unstandardize(true)
        pred, true = pred.cpu().numpy(), true.cpu().numpy()
        if n == 0:
            return {k: float("nan") for k in KEYS}
        per = []
        for j in range(pred.shape[1]):
            p, t = pred[:, j], true[:, j]
            mse = float(np.mean((p - t) ** 2))
            per.append({"mse": mse, "rmse": math.sqrt(mse), "pearson": pearson(p, t), "spearman": spearman(p, t),
                        "r2": r2(p, t)})
        out = {k: float(np.mean([m[k] for m in per])) for k in KEYS}
        names = list(labels.target_names) if labels is not None else []
        if len(names) != pred.shape[1]:
            names = [str(i) for i in range(pred.shape[1])]
        if len(per) > 1:
            for name, m in zip(names, per):
                out.update({f"{k}_{name}": m[k] for k in KEYS})
        return out

    # ------------------------------------------------------------ what a person reads

    def prediction_columns(self, labels) -> list[str]:
        names = labels.target_names
        return ["prediction"] if len(names) == 1 else [f"prediction_{t}" for t in names]

    def prediction(self, labels, output) -> dict:
        values = self.decode(labels, output[None])[0].tolist()
        return dict(zip(self.prediction_columns(labels), values))

    def predictions_row(self, labels, record, output) -> dict:
        return {**dict(zip(labels.target_names, record.target)), **self.prediction(labels, output)}

    def figure(self, summary, rows, split):
        """One scatter per target: true value (x) against best/'s prediction (y), the line y = x."""
        targets = summary["targets"]
        fig, axes = new_figure(5 * len(targets), 5, len(targets))
        for ax, name in zip(axes, targets):
            predicted = "prediction" if len(targets) == 1 else f"prediction_{name}"
            x = [float(r[name]) for r in rows]
            y = [float(r[predicted]) for r in rows]
            ax.scatter(x, y, s=8, alpha=0.5)
            low, high = min(x + y), max(x + y)
            ax.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1)
            suffix = "" if len(targets) == 1 else f"_{name}"
            ax.set(xlabel=f"true {name}", ylabel=f"predicted {name}",
                   title=metrics_title(summary, split, [k + suffix for k in ("spearman", "r2", "rmse")], len(rows),
                                       self.unit))
        return "predicted_vs_true.png", fig
