"""A task: what a fine-tuned model predicts, and everything that depends on it. One object per task
(regression.py, classification.py, per_residue.py), registered in labels.TASKS; nothing outside
this package branches on which task it is. A new task is one new file here, plus its tests.

A task owns, for its labels:
    reading     a row's target from CSV fields or a Python object, per-residue checks, truncation
    label space which labels exist (fit on the training split), their checks, encoding into target
                tensors and decoding of head outputs (the space's state: labels.LabelSpace)
    head, loss  the head module (model/heads.py) and its loss; the loss summed over the task's units
                (sequences, or labelled residues), so that a split's loss is the same however it
                is batched
    metrics     their names, the one plots show, and their values on a whole split
    outputs     the columns predictions add, a training predictions row, the end-of-run report
                (per class and confusion matrix), and the figure of a split
"""

import math
import numbers

import numpy as np
import torch

from esm2lite.errors import DataError, quoted

# Regression targets are trained on and scored in float32: a target must be a finite float32 number
# (a larger one would become inf; the float64 square of one that is, used by the metrics, is finite).
# --standardize-targets' mean and std must have a finite float32 square too: predictions are put back
# on the original scale in float32 (prediction * std + mean), and a mean or std beyond that is not data.
TARGET_LIMIT = float(np.finfo(np.float32).max)  # 3.4e38
STATISTIC_LIMIT = math.sqrt(TARGET_LIMIT)  # 1.8e19


def target_error(value, limit: float = TARGET_LIMIT) -> str | None:
    """Why a regression target (or, limit=STATISTIC_LIMIT, a mean or std) cannot be used, or None."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        return "not a finite number"
    if abs(value) > limit:
        what = "beyond float32's range" if limit == TARGET_LIMIT else "its square is not a finite float32 number"
        return (f"too large: {what} (|value| <= {limit:.2g}; esm2lite trains and predicts in float32); "
                "rescale the column")
    return None


class Task:
    name = ""  # --task, and what checkpoints and summary.json record
    help = ""  # what --help says of it
    per_residue = False  # a label per residue (a mask column may say which residues count)
    multi_target = False  # may read several target columns
    numeric = False  # its targets are numbers (--standardize-targets may z-score them)
    unit = "sequences"  # what its metrics count
    metrics = ("loss",)  # every split's metrics
    headline = "loss"  # the metric a plot shows beside the loss

    def metric_names(self, target_names) -> list[str]:
        """Every metric name evaluation reports (per-target names included)."""
        return list(self.metrics)

    # ------------------------------------------------------------ reading a row's target

    def check_target_columns(self, columns: tuple) -> str | None:
        """Why these target columns cannot be read, or None."""
        if not self.multi_target and len(columns) != 1:
            return f"task {self.name!r} takes exactly one target column, got {len(columns)}: {', '.join(columns)}"
        return None

    def parse_target(self, fields: list[str], heres: list[str]):
        """The target of one CSV row, from its target columns' text (heres: where each is)."""
        raise NotImplementedError

    def target_from_object(self, target, here: str, n_targets):
        """The target of an in-memory (sequence, target) pair (records_from_pairs)."""
        raise NotImplementedError

    def check_residue_labels(self, target, mask, n: int, target_here: str, mask_here: str) -> None:
        """Per-residue tasks: the labels (and mask) fit the sequence's n residues."""

    def cut(self, target, mask, max_residues: int):
        """(target, mask) of a sequence cut to max_residues (per-residue labels are cut with it)."""
        return target, mask

    # ------------------------------------------------------------ the label space

    def fit(self, records, target_names: list[str], standardize: bool) -> dict:
        """The label space's fields fitted on the training records: {"classes", "mean", "std"}."""
        raise NotImplementedError

    def check(self, labels, records) -> None:
        """DataError for a label the space does not know, or a wrong number of targets."""

    def num_outputs(self, labels) -> int:
        raise NotImplementedError

    def encode(self, labels, records):
        """Records' labels -> the target tensor the loss reads."""
        raise NotImplementedError

    def decode(self, labels, outputs, lengths=None):
        """Head outputs -> predictions (see each task)."""
        raise NotImplementedError

    # ------------------------------------------------------------ head and loss

    def head(self, d_model: int, num_outputs: int, hidden: int = 256, dropout: float = 0.25):
        raise NotImplementedError

    def loss(self, outputs, target):
        """The batch's mean loss (what the gradient follows)."""
        total, count = self.loss_sum(outputs, target)
        return total / max(count, 1)

    def loss_sum(self, outputs, target):
        """(loss summed over the batch's units, number of units): summed over a split and divided
        once, so a split's loss does not depend on how it is batched."""
        raise NotImplementedError

    # ------------------------------------------------------------ a split's metrics

    def split_metrics(self, labels, records, outputs) -> dict:
        """The metrics (but the loss) of a split from its per-record outputs, in input order."""
        return self.metrics_of(labels, torch.stack(outputs) if outputs else outputs, self.encode(labels, records))

    def metrics_of(self, labels, outputs, targets) -> dict:
        """The metrics of head outputs against encoded targets (labels None: as they are)."""
        raise NotImplementedError

    # ------------------------------------------------------------ what a person reads

    def prediction_columns(self, labels) -> list[str]:
        """The columns a prediction adds to infer.py's output, in order."""
        return ["prediction"]

    def prediction(self, labels, output) -> dict:
        """One record's prediction columns, from its head output."""
        raise NotImplementedError

    def predictions_row(self, labels, record, output) -> dict:
        """Training's predictions CSV: the record's true value(s) under its column names, then its
        prediction columns."""
        raise NotImplementedError

    def report(self, labels, records_by_split: dict, outputs_by_split: dict) -> dict:
        """What summary.json adds at the end of a run (per class, confusion matrix), or {}."""
        return {}

    def figure(self, summary: dict, rows: list[dict], split: str):
        """(file name, matplotlib Figure) of a split's predictions against the truth, or None."""
        return None


def new_figure(width: float, height: float, ncols: int = 1):
    """A matplotlib Figure (no pyplot, no global state) and its axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def metrics_title(summary: dict, split: str, names, n: int, unit: str) -> str:
    """Two title lines: which split and checkpoint, then its metrics."""
    return (f"{split} split ({n} {unit}), best/ = step {summary['best_step']}\n"
            + ", ".join(f"{k} {summary[split][k]:.3f}" for k in names if k in summary[split]))


def parse_number(value: str, here: str) -> float:
    """A finite number from CSV text; DataError at `here` (file, row, column) otherwise."""
    if value == "":
        raise DataError(f"{here}: empty value, expected a number")
    try:
        x = float(value)
    except ValueError:
        raise DataError(f"{here}: {quoted(value)} is not a number") from None
    if not math.isfinite(x):
        raise DataError(f"{here}: {quoted(value)} is not a finite number")
    return x


def no_autocast(x):
    """Heads' losses run in fp32 even under autocast."""
    return torch.autocast(device_type=x.device.type, enabled=False)
