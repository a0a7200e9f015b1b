"""The tasks (TASKS: one object each) and the label space of a fine-tuned model: which classes exist
(or how regression targets are scaled), fitted on the training split and stored in every
checkpoint's config.json (to_dict / from_dict). What the labels mean is the task's business: the
space hands its work to its task."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from esm2lite.errors import DataError, quoted
from esm2lite.tasks.base import STATISTIC_LIMIT, Task, target_error
from esm2lite.tasks.classification import Classification
from esm2lite.tasks.per_residue import PerResidue
from esm2lite.tasks.regression import Regression

TASKS = {task.name: task for task in (Regression(), Classification(), PerResidue())}
DEFAULT_TASK = TASKS["regression"]


def task_named(name) -> Task:
    """The task called `name` (a Task is returned as it is); DataError naming the choices otherwise."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise DataError(f"unknown task {quoted(name)}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def head_from_config(config: dict):
    """Rebuild a head (random weights) from head.config: its "kind" is its task's name."""
    try:
        task = TASKS[config["kind"]]
        return task.head(int(config["d_model"]), int(config["num_outputs"]), hidden=int(config["hidden"]),
                         dropout=float(config["dropout"]))
    except (KeyError, TypeError) as e:
        raise ValueError(f"bad head config {config!r}: {e}") from None


@dataclass
class LabelSpace:
    """Everything needed to encode targets and rebuild a head; stored in checkpoints as JSON."""

    task: Task  # (or its name)
    target_names: list[str]  # regression column names; the others: [the label column]
    classes: list[str]  # sorted class names / label chars seen in train; [] for regression
    mean: list[float] | None = None  # regression standardisation (None = off)
    std: list[float] | None = None
    index: dict = field(init=False, repr=False, compare=False)  # class -> its output index

    def __post_init__(self):
        self.task = task_named(self.task)
        self.target_names = list(self.target_names)
        self.classes = list(self.classes)
        self.index = {c: i for i, c in enumerate(self.classes)}
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
        """The task's label space fitted on the training records (classes, or regression's mean and
        population std, 1 where constant)."""
        task = task_named(task)
        target_names = [target_names] if isinstance(target_names, str) else list(target_names)
        if not train_records:
            raise DataError("no training records to fit the labels on")
        if (why := task.check_target_columns(tuple(target_names))) is not None:
            raise DataError(why)
        return cls(task, target_names, **task.fit(train_records, target_names, standardize))

    def check(self, records) -> None:
        """DataError for a label unseen in training, or a wrong number of targets."""
        self.task.check(self, records)

    def to_dict(self) -> dict:
        return {"task": self.task.name, "target_names": list(self.target_names),
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
        return self.task.num_outputs(self)

    def encode(self, records) -> torch.Tensor:
        """Records' labels -> the target tensor (the task's encode), after checking them."""
        self.check(records)
        return self.task.encode(self, records)

    def decode(self, outputs, lengths=None, tokens=None):
        """Head outputs -> predictions (the task's decode)."""
        if tokens is not None:
            return self.task.decode(self, outputs, lengths, tokens=tokens)
        return self.task.decode(self, outputs, lengths)

    def unstandardize(self, values: torch.Tensor) -> torch.Tensor:
        """Regression values [N, n] on the training scale -> the original scale (float32, or
        float64 for float64 input)."""
        values = torch.as_tensor(values)
        values = values.double() if values.dtype == torch.float64 else values.float()
        if self.mean is None:
            return values
        mean = torch.tensor(self.mean, dtype=values.dtype, device=values.device)
        std = torch.tensor(self.std, dtype=values.dtype, device=values.device)
        return values * std + mean
