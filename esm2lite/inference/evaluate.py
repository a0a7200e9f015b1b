"""Scoring a whole split: every record forwarded once, in length-bucketed batches (split across
ranks under torchrun), outputs back in input order; and the task's metrics on them. The loss is
summed over the task's units (sequences, or labelled residues) and divided once for the split, so
neither it nor any metric depends on how the split is batched."""

import math

import torch
from tqdm import tqdm

from esm2lite.data.batching import collate, make_batches
from esm2lite.runtime.device import amp_dtype_for, packs
from esm2lite.runtime.distributed import Dist, gather
from esm2lite.errors import Esm2liteError
from esm2lite.tasks.labels import LabelSpace
from esm2lite.model.task_model import TaskModel


def _forward_mine(model: TaskModel, records, batches, d: Dist, precision: str, with_loss: bool, desc,
                  packed: bool):
    """This rank's share of `batches`: [(record indices, per-record outputs, (loss sum, units))]."""
    device = next(model.parameters()).device
    amp = amp_dtype_for(precision, device)
    mine = batches[d.rank::d.world]
    rounds = -(-len(batches) // d.world)  # every rank runs as many forwards: FSDP gathers are collective
    local = []
    quiet = True if desc is None or not d.main else None  # None: shown on a terminal only
    for j in tqdm(range(rounds), desc=desc, disable=quiet, leave=False):
        idx = mine[j] if j < len(mine) else batches[0]  # a spare rank repeats a batch and drops it
        batch = collate([records[i] for i in idx], model.labels if with_loss else None, packed)
        batch = batch.to(device)  # tokens [B, T], targets
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(batch).float()  # [B, n] or [B, T, C]
        if j >= len(mine):
            continue
        if with_loss:
            total, units = model.labels.task.loss_sum(out, batch.target)
            loss = (float(total), units)
        else:
            loss = (0.0, 0)
        rows = [(out[row, : len(records[i].tokens)] if out.dim() == 3 else out[row]).cpu() for row, i in enumerate(idx)]
        local.append((idx, rows, loss))
    return local


@torch.no_grad()
def run_batches(model: TaskModel, records, batch_tokens: int, precision: str = "auto", desc: str | None = None,
                with_loss: bool = False, d: Dist | None = None, layout: str = "auto"):
    """Forward every record once. Returns (outputs, loss): outputs is a list of per-record fp32 CPU
    tensors in INPUT ORDER ([n_outputs], or [T_i, n_classes] for per-residue tasks, T_i = that
    record's tokens); loss, when with_loss (records need targets), is the task's loss summed over
    every unit of the split divided by their number. layout: padded, packed or auto (device.packs)."""
    outputs, loss_sum, units = forward_all(model, records, batch_tokens, precision, desc, with_loss, d, layout)
    return outputs, (loss_sum / max(units, 1) if with_loss else None)


@torch.no_grad()
def forward_all(model: TaskModel, records, batch_tokens: int, precision: str, desc: str | None, with_loss: bool,
                d: Dist | None = None, layout: str = "auto") -> tuple[list, float, int]:
    """run_batches, with the loss as (sum over the units, number of units)."""
    d = d or Dist()
    was_training = model.training
    model.eval()
    packed = packs(layout, next(model.parameters()).device)
    batches = make_batches([len(r.tokens) for r in records], batch_tokens, shuffle=False, packed=packed)
    outputs, loss_sum, units = [None] * len(records), 0.0, 0
    for part in gather(d, _forward_mine(model, records, batches, d, precision, with_loss, desc, packed)):
        for idx, rows, (total, n) in part:
            loss_sum, units = loss_sum + total, units + n
            for i, row in zip(idx, rows):
                outputs[i] = row
    model.train(was_training)
    return outputs, loss_sum, units


def evaluate(model: TaskModel, records, batch_tokens: int, precision: str, split: str, d: Dist | None = None,
             layout: str = "auto") -> dict:
    """{"loss", metric: value} of one split, on the original target scale."""
    return score(model, records, batch_tokens, precision, split, d, layout)[0]


def score(model: TaskModel, records, batch_tokens: int, precision: str, split: str, d: Dist | None = None,
          layout: str = "auto"):
    """(evaluate's metrics, the per-record outputs in input order) of one split."""
    outputs, loss = run_batches(model, records, batch_tokens, precision, desc=f"eval {split}", with_loss=True, d=d,
                                layout=layout)
    labels = model.labels
    labels.check(records)
    return finite(split, {"loss": loss, **labels.task.split_metrics(labels, records, outputs)}, outputs), outputs


def score_groups(model: TaskModel, records, groups: dict[str, list[int]], batch_tokens: int, precision: str,
                 d: Dist | None = None, layout: str = "auto") -> tuple[dict, dict, list]:
    """An input whose rows fall in groups (infer.py's split column): each group forwarded and scored
    as a split of its own, so its numbers are those of its rows scored alone; and every row ("all":
    the loss summed over every group's units and divided once, the metrics on every output).
    -> ({"all": metrics, group: metrics...}, {the same keys: their records}, outputs in input order)."""
    labels = model.labels
    labels.check(records)
    outputs, metrics, parts, total, units = [None] * len(records), {}, {"all": records}, 0.0, 0
    for name, idx in groups.items():
        part = [records[i] for i in idx]
        outs, loss_sum, n = forward_all(model, part, batch_tokens, precision, f"eval {name}", True, d, layout)
        for i, out in zip(idx, outs):
            outputs[i] = out
        metrics[name] = finite(name, {"loss": loss_sum / max(n, 1), **labels.task.split_metrics(labels, part, outs)},
                               outs)
        parts[name], total, units = part, total + loss_sum, units + n
    every = finite("input", {"loss": total / max(units, 1), **labels.task.split_metrics(labels, records, outputs)},
                   outputs)
    return {"all": every, **metrics}, parts, outputs


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
    """One row per record, in input order: its id (reading.ID_RULE), sequence, then its task's columns: the
    true value(s) and the prediction(s) (tasks: Task.predictions_row)."""
    return [{"id": r.id, "sequence": r.sequence,
             **labels.task.predictions_row(labels, r, out)} for r, out in zip(records, outputs)]
