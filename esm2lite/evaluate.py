"""Scoring a whole split: every record forwarded once, in length-bucketed batches (split across
ranks under torchrun), outputs back in input order; and the task's metrics on them."""

import torch
from tqdm import tqdm

from .batching import collate, make_batches
from .device import amp_dtype_for
from .distributed import Dist, gather
from .metrics import compute_metrics
from .task_model import TaskModel


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
    outputs, loss = run_batches(model, records, batch_tokens, precision, desc=f"eval {split}", with_loss=True, d=d)
    labels = model.labels
    if labels.task == "token-classification":  # per-record [T_i, C] outputs: pass as a list of batches
        outputs, targets = [o[None] for o in outputs], [labels.encode([r]) for r in records]
    else:
        outputs, targets = torch.stack(outputs), labels.encode(records)
    return {"loss": loss, **compute_metrics(labels.task, outputs, targets, labels)}
