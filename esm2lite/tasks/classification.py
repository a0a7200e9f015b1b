"""Classification: one class per sequence.

    head      the regression head's MLP, one output per class
    loss      cross-entropy
    metrics   accuracy, macro_f1; at the end of a run, precision, recall, f1 and support per class
              and the confusion matrix (as scikit-learn: 0 where undefined)
"""

import numpy as np
import torch
import torch.nn.functional as F

from esm2lite.constants import IGNORE_INDEX
from esm2lite.errors import DataError, quoted
from esm2lite.model.heads import MLPHead
from esm2lite.tasks.base import Task, metrics_title, new_figure, no_autocast
from esm2lite.tasks.metrics import macro_f1


class Classification(Task):
    name = "classification"
    help = "a class per sequence"
    metrics = ("loss", "accuracy", "macro_f1")
    headline = "accuracy"

    # ------------------------------------------------------------ reading

    def parse_target(self, fields, heres) -> str:
        if fields[0] == "":
            raise DataError(f"{heres[0]}: empty label")
        return fields[0]

    def target_from_object(self, target, here, n_targets) -> str:
        if not isinstance(target, str) or not target.strip():
            raise DataError(f"{here}: expected a non-empty string label, got {quoted(target)}")
        return target.strip()

    # ------------------------------------------------------------ the label space

    def labels_of(self, record) -> list[tuple[int | None, str]]:
        """(position, label) of what a record labels: its one class (no position)."""
        return [(None, record.target)]

    def fit(self, records, target_names, standardize) -> dict:
        classes = sorted({c for r in records for _, c in self.labels_of(r)})
        if len(classes) < 2:
            raise DataError(f"{records[0].source}, column {quoted(target_names[0])}: {len(classes)} distinct "
                            f"label(s) {', '.join(quoted(c) for c in classes) or '(none)'} in the training data; "
                            "classification needs at least two")
        return {"classes": classes}

    def check(self, labels, records) -> None:
        for r in records:
            if r.target not in labels.index:
                raise DataError(f"{r.where(r.target_column)}: class {quoted(r.target)} was not seen in "
                                f"training (classes: {', '.join(labels.classes)})")

    def num_outputs(self, labels) -> int:
        return len(labels.classes)

    def encode(self, labels, records) -> torch.Tensor:
        """long [N]: each record's class index."""
        return torch.tensor([labels.index[r.target] for r in records], dtype=torch.long)

    def decode(self, labels, outputs, lengths=None) -> list[str]:
        """logits [N, C] (or class indices [N]) -> class names."""
        outputs = torch.as_tensor(outputs).detach()
        idx = outputs if outputs.dim() == 1 else outputs.argmax(-1)
        return [labels.classes[i] for i in idx.cpu().tolist()]

    # ------------------------------------------------------------ head and loss

    def head(self, d_model, num_outputs, hidden=256, dropout=0.25):
        return MLPHead(self.name, d_model, num_outputs, hidden, dropout)

    def loss_sum(self, outputs, target):
        """Cross-entropy summed over the sequences; one unit per sequence."""
        with no_autocast(outputs):
            return F.cross_entropy(outputs.float(), target.long(), reduction="sum"), len(target)

    # ------------------------------------------------------------ a split's metrics

    def class_pairs(self, labels, records, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted, true) class indices of every labelled unit of a split."""
        return torch.stack(outputs).argmax(-1), self.encode(labels, records)

    def metrics_of(self, labels, outputs, targets) -> dict:
        """outputs: logits [..., C] or class indices; targets: class indices of the same leading shape
        (IGNORE_INDEX: no label); or lists of batches. Over every labelled unit."""
        pred, true = _flat_classes(outputs, targets)
        if len(true) == 0:
            return {"accuracy": float("nan"), "macro_f1": float("nan")}
        return {"accuracy": float(np.mean(pred == true)), "macro_f1": macro_f1(pred, true)}

    # ------------------------------------------------------------ what a person reads

    def prediction_columns(self, labels) -> list[str]:
        return ["prediction"] + [f"prob_{c}" for c in labels.classes]

    def prediction(self, labels, output) -> dict:
        return {"prediction": labels.classes[int(output.argmax())],
                **{f"prob_{c}": float(p) for c, p in zip(labels.classes, output.softmax(-1))}}

    def predictions_row(self, labels, record, output) -> dict:
        return {labels.target_names[0]: record.target, **self.prediction(labels, output)}

    def report(self, labels, records_by_split, outputs_by_split) -> dict:
        """summary.json's per_class (per split) and confusion_matrix (counts[true][predicted])."""
        reports = {split: self.class_report(labels, records_by_split[split], out)
                   for split, out in outputs_by_split.items()}
        return {"per_class": {split: per_class for split, (per_class, _) in reports.items()},
                "confusion_matrix": {"classes": labels.classes, "rows": "true class", "columns": "predicted class",
                                     **{split: counts for split, (_, counts) in reports.items()}}}

    def class_report(self, labels, records, outputs) -> tuple[dict, list[list[int]]]:
        """Per class precision, recall, f1 (0 where undefined, as scikit-learn) and support; and the
        confusion matrix, counts[true class][predicted class], classes in labels.classes order."""
        pred, true = self.class_pairs(labels, records, outputs)
        n = len(labels.classes)
        counts = torch.zeros(n, n, dtype=torch.long)
        counts.index_put_((true, pred), torch.ones_like(true), accumulate=True)
        per_class = {}
        for i, c in enumerate(labels.classes):
            tp, predicted, support = int(counts[i, i]), int(counts[:, i].sum()), int(counts[i].sum())
            f1_den = predicted + support
            per_class[c] = {"precision": tp / predicted if predicted else 0.0, "recall": tp / support if support else 0.0,
                            "f1": 2 * tp / f1_den if f1_den else 0.0, "support": support}
        return per_class, counts.tolist()

    def figure(self, summary, rows, split):
        """Counts of true (rows) x predicted (columns) class, annotated."""
        classes, counts = summary["confusion_matrix"]["classes"], summary["confusion_matrix"][split]
        fig, (ax,) = new_figure(max(4.5, 1.5 + 0.8 * len(classes)), max(4.0, 1.2 + 0.8 * len(classes)))
        ax.imshow(counts, cmap="Blues")
        top = max(max(row) for row in counts) or 1
        for i, row in enumerate(counts):
            for j, n in enumerate(row):
                ax.text(j, i, str(n), ha="center", va="center", color="white" if n > top / 2 else "black")
        ax.set_xticks(range(len(classes)), classes)
        ax.set_yticks(range(len(classes)), classes)
        total = sum(map(sum, counts))
        ax.set(xlabel="predicted", ylabel="true",
               title=metrics_title(summary, split, ("accuracy", "macro_f1"), total, self.unit))
        return "confusion_matrix.png", fig


def _flat_classes(outputs, targets) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class indices, target indices) as flat int arrays, labelled units only."""
    if isinstance(outputs, (list, tuple)):
        parts = [_flat_classes(o, t) for o, t in zip(outputs, targets)]
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate([p for p, _ in parts]), np.concatenate([t for _, t in parts])
    out, tgt = torch.as_tensor(outputs).detach().cpu(), torch.as_tensor(targets).detach().cpu()
    pred = out.argmax(-1) if out.dim() == tgt.dim() + 1 else out
    pred, tgt = pred.reshape(-1).long().numpy(), tgt.reshape(-1).long().numpy()
    keep = tgt != IGNORE_INDEX
    return pred[keep], tgt[keep]
