"""AdamW and its learning-rate schedule."""

import math

import torch


def lr_at(step: int, cfg, total: int) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup over cfg.warmup_steps, then
    cosine to 0 at `total` (cfg.schedule "cosine") or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, cfg) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.98 as BioNeMo); weight decay on matrices only; the head's LR is
    cfg.lr * cfg.head_lr_mult. Each group keeps its peak LR as "base_lr"."""
    groups = []
    for part, mult in ((model.encoder, 1.0), (model.head, cfg.head_lr_mult)):
        params = [p for p in part.parameters() if p.requires_grad]
        for decay in (True, False):
            chosen = [p for p in params if (p.dim() >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": cfg.lr * mult, "base_lr": cfg.lr * mult,
                               "weight_decay": cfg.weight_decay if decay else 0.0})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * multiplier
