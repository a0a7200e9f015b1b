"""What is predicted: one object per task (regression, classification, per-residue
classification: base.py says what a task owns), the label space, metrics."""

from esm2lite.tasks.base import Task
from esm2lite.tasks.labels import DEFAULT_TASK, TASKS, LabelSpace, head_from_config, task_named

__all__ = ["DEFAULT_TASK", "TASKS", "LabelSpace", "Task", "head_from_config", "task_named"]
