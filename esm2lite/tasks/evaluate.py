"""Scoring a whole split: every record forwarded once, in length-bucketed batches (split across
ranks under torchrun), outputs back in input order; and the task's metrics on them."""

import math

import torch
from tqdm import tqdm

from esm2lite.data.batching import collate, make_batches
from esm2lite.constants import IGNORE_INDEX
from esm2lite.runtime.device import amp_dtype_for
from esm2lite.runtime.distributed import Dist, gather
from esm2lite.errors import Esm2liteError
from esm2lite.tasks.labels import LabelSpace
from esm2lite.tasks.metrics import compute_metrics
from esm2lite.model.task_model import TaskModel


def _forward_mine(model: TaskModel, records, batches, d: Dist, precision: str, with_loss: bool, desc):
    """This rank's share of `batches`: [(record indices, per-record outputs, loss x batch size)]."""
    device = next(model.parameters()).device
    amp = amp_dtype_for(precision, device)
    mine = batches[d.rank::d.world]
    rounds = -(-len(batches) // d.world)  # every rank runs as many forwards: FSDP gathers are collective
    local = []
    quiet = True if desc is None or not d.main else None  # None: shown on a terminal only
    for j in tqdm(range(rounds), desc=desc, disable=quiet, leave=False):
        idx = mine[j] if j < len(mine) else batches[0]  # a spare rank repeats a batch and drops it
        batch = collate([records[i] for i in idx], model.labels if with_loss else None)
        tokens = batch["tokens"].to(device)  # [B, T]
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(tokens).float()  # [B, n] or [B, T, C]
        if j >= len(mine):
            continue
        loss = float(model.head.loss(out, batch["target"].to(device))) * len(idx) if with_loss else 0.0
        rows = [(out[row, : len(records[i].tokens)] if out.dim() == 3 else out[row]).cpu() for row, i in enumerate(idx)]
        local.append((idx, rows, loss))
    return local


@torch.no_grad()
def run_batches(model: TaskModel, records, batch_tokens: int, precision: str = "auto", desc: str | None = None,
                with_loss: bool = False, d: Dist | None = None):
    """Forward every record once. Returns (outputs, loss): outputs is a list of per-record fp32 CPU
    tensors in INPUT ORDER ([n_outputs], or [T_i, n_classes] for per-residue tasks, T_i = that
    record's tokens); loss is the record-weighted mean loss when with_loss (records need targets)."""
    d = d or Dist()
    was_training = model.training
    model.eval()
    batches = make_batches([len(r.tokens) for r in records], batch_tokens, shuffle=False)
    outputs, loss_sum = [None] * len(records), 0.0
    for part in gather(d, _forward_mine(model, records, batches, d, precision, with_loss, desc)):
        for idx, rows, loss in part:
            loss_sum += loss
            for i, row in zip(idx, rows):
                outputs[i] = row
    model.train(was_training)
    return outputs, (loss_sum / len(records) if with_loss else None)


def evaluate(model: TaskModel, records, batch_tokens: int, precision: str, split: str, d: Dist | None = None) -> dict:
    """{"loss", metric: value} of one split, on the original target scale."""
    return score(model, records, batch_tokens, precision, split, d)[0]


def score(model: TaskModel, records, batch_tokens: int, precision: str, split: str, d: Dist | None = None):
    """(evaluate's metrics, the per-record outputs in input order) of one split."""
    outputs, loss = run_batches(model, records, batch_tokens, precision, desc=f"eval {split}", with_loss=True, d=d)
    labels = model.labels
    if labels.task == "token-classification":  # per-record [T_i, C] outputs: pass as a list of batches
        out, targets = [o[None] for o in outputs], [labels.encode([r]) for r in records]
    else:
        out, targets = torch.stack(outputs), labels.encode(records)
    return finite(split, {"loss": loss, **compute_metrics(labels.task, out, targets, labels)}, outputs), outputs


def finite(split: str, metrics: dict, outputs) -> dict:
    """The metrics, or Esm2liteError saying why some are not finite numbers: they are written to
    JSON files (metrics.jsonl, summary.json, *.metrics.json) where NaN and Infinity are not numbers,
    and a NaN "best so far" would decide nothing."""
    bad = [f"{k} {v}" for k, v in metrics.items() if not math.isfinite(v)]
    if not bad:
        return metrics
    if math.isnan(metrics.get("accuracy", 0.0)):  # accuracy is NaN only without any labelled value
        why = "it has no labelled residues (every mask is 0), so there is nothing to score"
    elif not all(bool(torch.isfinite(o).all()) for o in outputs):
        why = "the model's outputs on it are not all finite numbers"
    else:
        why = "the targets or predictions are too large for the metrics to be computed"
    raise Esm2liteError(f"scoring the {split} split: {', '.join(bad)}: not finite; {why}")


# ---------------------------------------------------------------- what a person reads: rows and classes


def prediction_rows(labels: LabelSpace, records, outputs) -> list[dict]:
    """One row per record, in input order: its row (and id), sequence, true value(s), then the
    prediction(s): regression `prediction` (`prediction_<target>` with several targets);
    classification `prediction` and `prob_<class>`; per-residue the predicted label string and
    the `accuracy` over its labelled residues."""
    rows = []
    for r, out in zip(records, outputs):
        row = {records[0].row_name: r.row, **({"id": r.id} if records[0].id is not None else {}), "sequence": r.sequence}
        if labels.task == "regression":
            row.update(zip(labels.target_names, r.target))
            values = labels.decode(out[None])[0].tolist()
            names = ["prediction"] if len(values) == 1 else [f"prediction_{n}" for n in labels.target_names]
            row.update(zip(names, values))
            rows.append(row)
            continue
        row[labels.target_names[0]] = r.target
        if labels.task == "classification":
            row.update(prediction=labels.classes[int(out.argmax())],
                       **{f"prob_{c}": float(p) for c, p in zip(labels.classes, out.softmax(-1))})
        else:
            pred, true = _class_pairs(labels, [r], [out])
            row.update(**({"mask": r.mask} if r.mask is not None else {}),
                       prediction=labels.decode(out[None], lengths=[len(r.tokens) - 2])[0],
                       accuracy=float((pred == true).float().mean()) if len(true) else float("nan"))
        rows.append(row)
    return rows


def class_report(labels: LabelSpace, records, outputs) -> tuple[dict, list[list[int]]]:
    """Classification and per-residue tasks (labelled residues only): per class precision,
    recall, f1 (0 where undefined, as scikit-learn) and support; and the confusion matrix,
    counts[true class][predicted class], classes in labels.classes order."""
    pred, true = _class_pairs(labels, records, outputs)
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


def _class_pairs(labels: LabelSpace, records, outputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted, true) class indices: one per record, or one per labelled residue."""
    if labels.task == "classification":
        return torch.stack(outputs).argmax(-1), labels.encode(records)
    pred, true = [], []
    for r, out in zip(records, outputs):  # out: [T_i, C], aligned with the record's tokens
        target = labels.encode([r])[0]
        keep = target != IGNORE_INDEX
        pred.append(out.argmax(-1)[keep])
        true.append(target[keep])
    return torch.cat(pred), torch.cat(true)
