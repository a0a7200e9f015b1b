"""The label space of a task: which classes exist (or how regression targets are scaled), how
labels become target tensors and how head outputs become predictions. Fitted on the training
split; stored in every checkpoint's config.json (to_dict / from_dict)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from esm2lite.constants import IGNORE_INDEX, TASKS
from esm2lite.errors import DataError, quoted
from esm2lite.model.tokenizer import residue_mask


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


def _labelled(record) -> list[tuple[int, str]]:
    """(position, label) of each labelled residue of a token-classification record (mask "1")."""
    mask = record.mask or "1" * len(record.target)
    return [(i, c) for i, (c, m) in enumerate(zip(record.target, mask)) if m == "1"]


@dataclass
class LabelSpace:
    """Everything needed to encode targets and rebuild a head; stored in checkpoints as JSON."""

    task: str
    target_names: list[str]  # regression column names; classification/token: [the label column]
    classes: list[str]  # sorted class names / label chars seen in train; [] for regression
    mean: list[float] | None = None  # regression standardisation (None = off)
    std: list[float] | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise DataError(f"unknown task {quoted(self.task)}; choose one of {', '.join(TASKS)}")
        self.target_names = list(self.target_names)
        self.classes = list(self.classes)
        self._index = {c: i for i, c in enumerate(self.classes)}
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is None:
                continue
            why = (next((w for v in values if (w := target_error(v, STATISTIC_LIMIT))), None)
                   if isinstance(values, (list, tuple)) else "not a list")
            if why is None and (len(values) != len(self.target_names) or (name == "std" and min(values) <= 0)):
                why = f"not {len(self.target_names)} {'positive ' if name == 'std' else ''}numbers"
            if why is not None:
                raise DataError(f"the label space's {name} {quoted(values)} is {why}")

    @classmethod
    def fit(cls, task, train_records, target_names, standardize=False) -> "LabelSpace":
        """Classes (sorted) or regression mean/std (population std; 1 where constant) from
        the training records."""
        target_names = [target_names] if isinstance(target_names, str) else list(target_names)
        if not train_records:
            raise DataError("no training records to fit the labels on")
        source = train_records[0].source
        if task == "regression":
            y = np.array([r.target for r in train_records], dtype=np.float64)
            if y.ndim != 2 or y.shape[1] != len(target_names):
                raise DataError(f"{source}: {y.shape[-1] if y.ndim == 2 else '?'} target values "
                                f"per record, but {len(target_names)} target names")
            cls(task, target_names, []).check(train_records)
            if not standardize:
                return cls(task, target_names, [])
            mean, std = y.mean(0), y.std(0)
            for j, name in enumerate(target_names):
                why = target_error(float(mean[j]), STATISTIC_LIMIT) or target_error(float(std[j]), STATISTIC_LIMIT)
                if why is not None:
                    raise DataError(f"{source}, column {quoted(name)}: the mean or standard deviation of the training "
                                    f"targets ({mean[j]:g}, {std[j]:g}) is {why}; --standardize-targets cannot use it")
            return cls(task, target_names, [], mean.tolist(), np.where(std > 0, std, 1.0).tolist())
        if len(target_names) != 1:
            raise DataError(f"task {task!r} takes exactly one target column, got {target_names}")
        if task == "classification":
            classes = sorted({r.target for r in train_records})
        else:
            classes = sorted({c for r in train_records for _, c in _labelled(r)})
        if len(classes) < 2:
            raise DataError(f"{source}, column {quoted(target_names[0])}: {len(classes)} distinct "
                            f"label(s) {', '.join(quoted(c) for c in classes) or '(none)'} in the training data; "
                            "classification needs at least two")
        return cls(task, target_names, classes)

    def check(self, records) -> None:
        """DataError for a label unseen in training, or a wrong number of targets."""
        for r in records:
            col = r.target_column
            if self.task == "regression":
                if len(r.target) != len(self.target_names):
                    raise DataError(f"{r.where()}: {len(r.target)} target values, the model "
                                    f"predicts {len(self.target_names)}")
                for name, value in zip(self.target_names, r.target):
                    if (why := target_error(value)) is not None:
                        raise DataError(f"{r.where(name)}: target {quoted(value)} is {why}")
            elif self.task == "classification":
                if r.target not in self._index:
                    raise DataError(f"{r.where(col)}: class {quoted(r.target)} was not seen in "
                                    f"training (classes: {', '.join(self.classes)})")
            else:
                for i, c in _labelled(r):
                    if c not in self._index:
                        raise DataError(f"{r.where(col)}: label {c!r} at position {i + 1} was "
                                        f"not seen in training (labels: {''.join(self.classes)})")

    def to_dict(self) -> dict:
        return {"task": self.task, "target_names": list(self.target_names),
                "classes": list(self.classes), "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, d) -> "LabelSpace":
        try:
            return cls(task=d["task"], target_names=list(d["target_names"]),
                       classes=list(d.get("classes", [])), mean=d.get("mean"), std=d.get("std"))
        except (KeyError, TypeError, AttributeError) as e:
            raise DataError(f"bad label space {quoted(d)}: {e}") from None

    @property
    def num_outputs(self) -> int:
        return len(self.target_names) if self.task == "regression" else len(self.classes)

    def encode(self, records) -> torch.Tensor:
        """regression: float32 [N, n_targets] (standardised when mean/std are set);
        classification: long [N]; token-classification: long [N, T_max] aligned with the
        padded tokens (cls, eos, pad and mask-0 residues = IGNORE_INDEX, residue i at i + 1)."""
        self.check(records)
        if self.task == "regression":
            y = torch.tensor([r.target for r in records], dtype=torch.float64).reshape(
                len(records), len(self.target_names))
            if self.mean is not None:
                y = (y - torch.tensor(self.mean, dtype=torch.float64)) / torch.tensor(self.std, dtype=torch.float64)
            return y.float()
        if self.task == "classification":
            return torch.tensor([self._index[r.target] for r in records], dtype=torch.long)
        out = torch.full((len(records), max(len(r.tokens) for r in records)), IGNORE_INDEX, dtype=torch.long)
        for b, r in enumerate(records):
            for i, c in _labelled(r):
                out[b, 1 + i] = self._index[c]
        return out

    def unstandardize(self, values: torch.Tensor) -> torch.Tensor:
        """Regression values [N, n] on the training scale -> the original scale (float32,
        or float64 for float64 input)."""
        values = torch.as_tensor(values)
        values = values.double() if values.dtype == torch.float64 else values.float()
        if self.mean is None:
            return values
        mean = torch.tensor(self.mean, dtype=values.dtype, device=values.device)
        std = torch.tensor(self.std, dtype=values.dtype, device=values.device)
        return values * std + mean

    def decode(self, outputs: torch.Tensor, lengths=None, tokens=None):
        """Head outputs -> predictions.

        regression: [N, n] -> float tensor on the original scale; classification: logits
        [N, C] (or class indices [N]) -> list of class names; token-classification: logits
        [N, T, C] -> list of label strings, one char per residue; needs `lengths` (residues
        per sequence) or the padded `tokens` [N, T] the outputs came from.
        """
        outputs = torch.as_tensor(outputs).detach()
        if self.task == "regression":
            return self.unstandardize(outputs.reshape(outputs.shape[0], -1).cpu())
        if self.task == "classification":
            idx = outputs if outputs.dim() == 1 else outputs.argmax(-1)
            return [self.classes[i] for i in idx.cpu().tolist()]
        if lengths is None:
            if tokens is None:
                raise ValueError("token-classification decode needs lengths or tokens")
            lengths = residue_mask(torch.as_tensor(tokens)).sum(-1).tolist()
        idx = (outputs if outputs.dim() == 2 else outputs.argmax(-1)).cpu().tolist()
        return ["".join(self.classes[c] for c in row[1: 1 + int(n)]) for row, n in zip(idx, lengths)]
