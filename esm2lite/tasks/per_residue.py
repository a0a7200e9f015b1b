"""Per-residue classification ("token-classification"): one label per residue, e.g. secondary
structure HHHEEECCC; a mask (1/0 per residue) may say which residues are labelled.

    head      non-residue rows zeroed -> Conv1d(d, hidden, 7, pad 3) -> ReLU -> Dropout
              -> Conv1d(hidden, n_classes, 7, pad 3)
    loss      cross-entropy over the labelled residues
    metrics   accuracy, macro_f1 over the labelled residues of the whole split (so neither depends
              on how the split is batched); per class and the confusion matrix as classification
"""

import torch
import torch.nn.functional as F

from esm2lite.constants import IGNORE_INDEX
from esm2lite.errors import DataError
from esm2lite.model.heads import ConvHead
from esm2lite.model.tokenizer import residue_mask
from esm2lite.tasks.base import no_autocast
from esm2lite.tasks.classification import Classification


class PerResidue(Classification):
    name = "token-classification"
    help = "a label per residue (e.g. HHHEEECCC)"
    per_residue = True
    unit = "labelled residues"

    # ------------------------------------------------------------ reading

    def check_residue_labels(self, target, mask, n, target_here, mask_here) -> None:
        if any(c.isspace() for c in target):
            raise DataError(f"{target_here}: per-residue labels contain whitespace")
        if len(target) != n:
            raise DataError(f"{target_here}: {len(target)} per-residue labels for a sequence of {n} residues")
        if mask is None:
            return
        if len(mask) != n:
            raise DataError(f"{mask_here}: mask of length {len(mask)} for a sequence of {n} residues")
        bad = next((i for i, c in enumerate(mask) if c not in "01"), None)
        if bad is not None:
            raise DataError(f"{mask_here}: mask character {mask[bad]!r} at position {bad + 1} "
                            f"(only '0' and '1' are allowed)")

    def cut(self, target, mask, max_residues):
        return target[:max_residues], (mask[:max_residues] if mask is not None else None)

    # ------------------------------------------------------------ the label space

    def labels_of(self, record) -> list[tuple[int, str]]:
        """(position, label) of each labelled residue (mask "1", or every residue without a mask)."""
        mask = record.mask or "1" * len(record.target)
        return [(i, c) for i, (c, m) in enumerate(zip(record.target, mask)) if m == "1"]

    def check(self, labels, records) -> None:
        for r in records:
            for i, c in self.labels_of(r):
                if c not in labels.index:
                    raise DataError(f"{r.where(r.target_column)}: label {c!r} at position {i + 1} was "
                                    f"not seen in training (labels: {''.join(labels.classes)})")

    def encode(self, labels, records) -> torch.Tensor:
        """long [N, T_max] aligned with the padded tokens: residue i at i + 1; <cls>, <eos>, padding
        and residues masked 0 are IGNORE_INDEX."""
        out = torch.full((len(records), max(len(r.tokens) for r in records)), IGNORE_INDEX, dtype=torch.long)
        for b, r in enumerate(records):
            for i, c in self.labels_of(r):
                out[b, 1 + i] = labels.index[c]
        return out

    def decode(self, labels, outputs, lengths=None, tokens=None) -> list[str]:
        """logits [N, T, C] (or indices [N, T]) -> one label string per sequence, a character per
        residue; needs `lengths` (residues per sequence) or the padded `tokens` [N, T]."""
        outputs = torch.as_tensor(outputs).detach()
        if lengths is None:
            if tokens is None:
                raise ValueError("per-residue decode needs lengths or tokens")
            lengths = residue_mask(torch.as_tensor(tokens)).sum(-1).tolist()
        idx = (outputs if outputs.dim() == 2 else outputs.argmax(-1)).cpu().tolist()
        return ["".join(labels.classes[c] for c in row[1: 1 + int(n)]) for row, n in zip(idx, lengths)]

    # ------------------------------------------------------------ head and loss

    def head(self, d_model, num_outputs, hidden=256, dropout=0.25):
        return ConvHead(self.name, d_model, num_outputs, hidden, dropout)

    def loss_sum(self, outputs, target):
        """Cross-entropy summed over the labelled residues; one unit per labelled residue (0 with
        a graph when there is none)."""
        with no_autocast(outputs):
            logits = outputs.float().reshape(-1, outputs.shape[-1])
            target = target.long().reshape(-1)
            count = int(target.ne(IGNORE_INDEX).sum())
            if count == 0:
                return logits.sum() * 0.0, 0
            return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum"), count

    # ------------------------------------------------------------ a split's metrics

    def class_pairs(self, labels, records, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted, true) class index of every labelled residue of the split."""
        pred, true = [], []
        for r, out in zip(records, outputs):  # out: [T_i, C], aligned with the record's tokens
            target = self.encode(labels, [r])[0]
            keep = target != IGNORE_INDEX
            pred.append(out.argmax(-1)[keep])
            true.append(target[keep])
        return torch.cat(pred), torch.cat(true)

    def split_metrics(self, labels, records, outputs) -> dict:
        """Over the labelled residues of the whole split (per-record outputs [T_i, C])."""
        return self.metrics_of(labels, [o[None] for o in outputs], [self.encode(labels, [r]) for r in records])

    # ------------------------------------------------------------ what a person reads

    def prediction_columns(self, labels) -> list[str]:
        return ["prediction"]

    def prediction(self, labels, output) -> dict:
        return {"prediction": self.decode(labels, output[None], lengths=[output.shape[0] - 2])[0]}

    def predictions_row(self, labels, record, output) -> dict:
        """The labels and mask as given, the predicted labels, and the accuracy over the labelled residues."""
        pred, true = self.class_pairs(labels, [record], [output])
        return {labels.target_names[0]: record.target, **({"mask": record.mask} if record.mask is not None else {}),
                **self.prediction(labels, output),
                "accuracy": float((pred == true).float().mean()) if len(true) else float("nan")}
