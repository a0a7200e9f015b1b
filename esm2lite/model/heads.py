"""Task heads on the final-LayerNorm hidden states (BioNeMo's designs).

    RegressionHead            mean over residues -> Linear(d, 256) -> ReLU -> Dropout(0.25)
                              -> Linear(256, n_targets); MSE
    ClassificationHead        the same MLP with one output per class; cross-entropy
    TokenClassificationHead   non-residue rows zeroed -> Conv1d(d, hidden, 7, pad 3) -> ReLU
                              -> Dropout -> Conv1d(hidden, n_classes, 7, pad 3); cross-entropy
                              over labelled residues only (IGNORE_INDEX)

Heads and losses run in fp32 whatever the hidden states' dtype and even under autocast
(a head kept in another dtype computes in that dtype). `config` holds all that is needed
to rebuild a head: head_from_config(head.config).
"""

import torch
import torch.nn.functional as F
from torch import nn

from esm2lite.constants import IGNORE_INDEX
from esm2lite.model.tokenizer import PAD, residue_mask


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def mean_pool(hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, d], tokens [B, T] -> [B, d]: mean over residue positions only (cls,
    eos and padding excluded; padding rows may hold anything, even NaN). Computed and
    returned in fp32 (fp64 input stays fp64)."""
    mask = residue_mask(tokens)[..., None]  # [B, T, 1]
    h = torch.where(mask, _at_least_fp32(hidden), 0.0)
    count = mask.sum(1).clamp(min=1).to(h.dtype)  # [B, 1]
    return h.sum(1) / count


class _Head(nn.Module):
    kind = ""

    def __init__(self, d_model: int, num_outputs: int, hidden: int = 256, dropout: float = 0.25):
        super().__init__()
        if d_model < 1 or num_outputs < 1 or hidden < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"bad head size: d_model={d_model}, num_outputs={num_outputs}, "
                             f"hidden={hidden}, dropout={dropout}")
        self.d_model, self.num_outputs, self.hidden, self.dropout = d_model, num_outputs, hidden, dropout

    @property
    def config(self) -> dict:
        return {"kind": self.kind, "d_model": self.d_model, "hidden": self.hidden,
                "dropout": self.dropout, "num_outputs": self.num_outputs}

    def _no_autocast(self, hidden):
        return torch.autocast(device_type=hidden.device.type, enabled=False)


class _MLPHead(_Head):
    """Mean-pooled embedding -> Linear -> ReLU -> Dropout -> Linear."""

    def __init__(self, d_model, num_outputs, hidden=256, dropout=0.25):
        super().__init__(d_model, num_outputs, hidden, dropout)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, num_outputs))

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, d], tokens [B, T] -> [B, num_outputs] (fp32)."""
        with self._no_autocast(hidden):
            pooled = mean_pool(hidden, tokens).to(self.mlp[0].weight.dtype)
            return self.mlp(pooled)


class RegressionHead(_MLPHead):
    kind = "regression"

    def __init__(self, d_model, num_outputs=1, hidden=256, dropout=0.25):
        super().__init__(d_model, num_outputs, hidden, dropout)

    def loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean squared error over all sequences and targets; target [B, n] (or [B] for n=1)."""
        with self._no_autocast(outputs):
            return F.mse_loss(outputs.float(), target.float().reshape(outputs.shape))


class ClassificationHead(_MLPHead):
    kind = "classification"

    def loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy; outputs [B, C] logits, target [B] class indices."""
        with self._no_autocast(outputs):
            return F.cross_entropy(outputs.float(), target.long())


class TokenClassificationHead(_Head):
    kind = "token-classification"

    def __init__(self, d_model, num_outputs, hidden=256, dropout=0.25):
        super().__init__(d_model, num_outputs, hidden, dropout)
        self.conv1 = nn.Conv1d(d_model, hidden, kernel_size=7, padding=3)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(hidden, num_outputs, kernel_size=7, padding=3)

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, d], tokens [B, T] -> logits [B, T, C] (fp32). Non-residue rows of
        the input are zeroed, and the first conv's output at padding too (conv2 sees zeros past
        the end, as for the sequence alone): a sequence's predictions do not depend on its batch."""
        with self._no_autocast(hidden):
            mask = residue_mask(tokens)[..., None]
            x = torch.where(mask, hidden.to(self.conv1.weight.dtype), 0.0)
            x = F.relu(self.conv1(x.transpose(1, 2)))  # [B, hidden, T]
            x = torch.where(tokens.ne(PAD)[:, None, :], x, 0.0)
            return self.conv2(self.drop(x)).transpose(1, 2)  # [B, T, C]

    def loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over positions with target != IGNORE_INDEX; 0 (with a graph) if none."""
        with self._no_autocast(outputs):
            logits = outputs.float().reshape(-1, outputs.shape[-1])
            target = target.long().reshape(-1)
            if not target.ne(IGNORE_INDEX).any():
                return logits.sum() * 0.0
            return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


_HEADS = {head.kind: head for head in (RegressionHead, ClassificationHead, TokenClassificationHead)}


def build_head(task: str, d_model: int, num_outputs: int, hidden: int = 256,
               dropout: float = 0.25) -> nn.Module:
    if task not in _HEADS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(_HEADS)}")
    return _HEADS[task](d_model, num_outputs, hidden=hidden, dropout=dropout)


def head_from_config(config: dict) -> nn.Module:
    """Rebuild a head (random weights) from head.config."""
    try:
        return build_head(config["kind"], int(config["d_model"]), int(config["num_outputs"]),
                          hidden=int(config["hidden"]), dropout=float(config["dropout"]))
    except (KeyError, TypeError) as e:
        raise ValueError(f"bad head config {config!r}: {e}") from None
