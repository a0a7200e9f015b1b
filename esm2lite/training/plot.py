"""Plots of a finished run, as PNGs in RUN/plots/:

    learning_curves.png    train and validation loss per step, and the validation metric that
                           chose best/ (spearman or accuracy when that is the loss); best step marked
    predicted_vs_true.png  regression: predicted against true values of the test split (valid when
                           there is no test split), one panel per target, the split's metrics on top
    confusion_matrix.png   classification and per-residue tasks: true x predicted class counts of the
                           test split (valid without one), with accuracy and macro F1 on top

    esm2lite-plot RUN        (train.py draws them at the end when matplotlib is installed:
                             pip install "esm2lite[plot]")

The figure functions return matplotlib Figures (no pyplot, no global state); write_plots saves
them all at once (atomic_dir). Reading the run's files is the checkpointer's (read_finished).
"""

import os

from esm2lite.files.atomic import atomic_dir
from esm2lite.tasks import TASKS
from esm2lite.tasks.base import new_figure

INSTALL = 'pip install "esm2lite[plot]"'


def available() -> bool:
    """matplotlib can be imported (pip install "esm2lite[plot]")."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def learning_curves(log: list[dict], summary: dict):
    """Left: train and valid loss per step. Right (with a valid split): the valid metric that chose
    best/, or the task's headline metric when best/ was chosen by the loss."""
    valid = [r for r in log if r.get("split") == "valid"]
    metric = summary.get("best_metric")
    shown = metric if metric not in (None, "loss") else TASKS[summary["task"]].headline
    fig, axes = new_figure(10 if valid else 5.5, 4, 2 if valid else 1)
    train = [r for r in log if r.get("split") == "train"]
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if valid:
        axes[0].plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="valid loss")
        axes[1].plot([r["step"] for r in valid], [r[shown] for r in valid], "o-", color="C2", label=f"valid {shown}")
        axes[1].set(xlabel="step", ylabel=shown, title=f"validation {shown}")
    axes[0].set(xlabel="step", ylabel="loss", title="loss")
    for ax in axes:
        if summary.get("best_step") is not None:
            ax.axvline(summary["best_step"], color="grey", linestyle=":", label=f"best/ (step {summary['best_step']})")
        ax.legend()
    return fig


def _shown_split(summary: dict, predictions: dict) -> str | None:
    return next((s for s in ("test", "valid") if s in predictions and summary.get(s)), None)


def figures(log: list[dict], summary: dict, predictions: dict) -> dict:
    """{file name: Figure} for a finished run (predictions: {split: CSV rows}): the learning curves,
    and the task's figure of a split (predicted against true values, or the confusion matrix)."""
    out = {"learning_curves.png": learning_curves(log, summary)}
    split = _shown_split(summary, predictions)
    made = TASKS[summary["task"]].figure(summary, predictions[split], split) if split is not None else None
    if made is not None:
        out[made[0]] = made[1]
    return out


def write_plots(directory: str, log: list[dict], summary: dict, predictions: dict) -> list[str]:
    """Every figure as a PNG in `directory`, replaced as a whole; the paths written."""
    made = figures(log, summary, predictions)
    with atomic_dir(directory, overwrite=True) as tmp:
        for name, fig in made.items():
            fig.savefig(os.path.join(tmp, name))
    return [os.path.join(directory, name) for name in made]
