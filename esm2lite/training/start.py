"""A run started from a fine-tuned model (train.py --checkpoint RUN/best): its encoder is the new
run's base (checkpoints/loading.py), and its head is kept when the new run predicts the same labels
with a head of the same size; otherwise the run says, in one line, why it makes a new one."""

from __future__ import annotations

import os

from esm2lite.checkpoints.checkpoint_dir import read_spec, saved_step
from esm2lite.model.task_model import TaskModel


def take_head(start: TaskModel, head, labels) -> str | None:
    """Copy the fine-tuned head's weights into the new run's `head` when it predicts the same labels
    with a head of the same size; otherwise leave `head` new and say why, in words."""
    if start.labels.task is not labels.task:
        return f"it was trained for {start.labels.task.name}, this run is {labels.task.name}"
    if start.labels.target_names != labels.target_names or start.labels.classes != labels.classes:
        return f"it predicts {_outputs(start.labels)}, this run {_outputs(labels)}"
    if (start.labels.mean, start.labels.std) != (labels.mean, labels.std):
        return "its targets were standardised with another training set's mean and std"
    if start.head.config["hidden"] != head.config["hidden"]:
        return f"its head has --head-hidden {start.head.config['hidden']}, this run {head.config['hidden']}"
    head.load_state_dict(start.head.state_dict())
    return None


def _outputs(labels) -> str:
    shown = labels.classes if labels.classes else labels.target_names
    more = f", ... ({len(shown)} in all)" if len(shown) > 6 else ""
    return ("classes " if labels.classes else "") + ", ".join(map(str, shown[:6])) + more


def announce(given: str, path: str, new_head: str | None) -> None:
    """One line (rank 0): the fine-tuned model a run starts from, and whether its head is kept."""
    if int(os.environ.get("RANK", "0")) == 0:
        step = saved_step(path)
        which = "its best/" if os.path.normpath(given) != os.path.normpath(path) else "this fine-tuned"
        print(f"--checkpoint {given}: starting from {which} {read_spec(path).mode} model"
              + (f" of step {step}" if step is not None else "") + ", with a fresh optimizer; "
              + ("its head is kept" if new_head is None else f"a new head, as {new_head}"), flush=True)

