"""Heads on the final-LayerNorm hidden states (BioNeMo's designs); each task (tasks/) chooses one
and gives it its loss.

    MLPHead    mean over residues -> Linear(d, hidden) -> ReLU -> Dropout -> Linear(hidden, outputs)
    ConvHead   non-residue rows zeroed -> Conv1d(d, hidden, 7, pad 3) -> ReLU -> Dropout
               -> Conv1d(hidden, outputs, 7, pad 3): outputs per token

Heads run in fp32 whatever the hidden states' dtype and even under autocast (a head kept in another
dtype computes in that dtype). `config` holds all that is needed to rebuild a head, its task's name
as `kind` (tasks.head_from_config).
"""

import torch
import torch.nn.functional as F
from torch import nn

from esm2lite.model.batch import Batch
from esm2lite.model.tokenizer import residue_mask  # noqa: F401  (heads' tests read it here)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def mean_pool(hidden: torch.Tensor, batch) -> torch.Tensor:
    """hidden [B, T, d], a Batch (or its tokens [B, T]) -> [B, d]: mean over residue positions only
    (cls, eos and padding excluded; padding rows may hold anything, even NaN). Computed and
    returned in fp32 (fp64 input stays fp64)."""
    batch = Batch.of(batch)
    mask = batch.residues[..., None]  # [B, T, 1] (packed: [1, N, 1])
    h = torch.where(mask, _at_least_fp32(hidden), 0.0)
    count = batch.per_sequence_sum(mask.to(h.dtype)).clamp(min=1)  # [B, 1]
    return batch.per_sequence_sum(h) / count


class Head(nn.Module):
    """A head's sizes, and `kind`: the name of the task it serves (stored with it, to rebuild it)."""

    def __init__(self, kind: str, d_model: int, num_outputs: int, hidden: int = 256, dropout: float = 0.25):
        super().__init__()
        if d_model < 1 or num_outputs < 1 or hidden < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"bad head size: d_model={d_model}, num_outputs={num_outputs}, "
                             f"hidden={hidden}, dropout={dropout}")
        self.kind = kind
        self.d_model, self.num_outputs, self.hidden, self.dropout = d_model, num_outputs, hidden, dropout

    @property
    def config(self) -> dict:
        return {"kind": self.kind, "d_model": self.d_model, "hidden": self.hidden,
                "dropout": self.dropout, "num_outputs": self.num_outputs}

    def _no_autocast(self, hidden):
        return torch.autocast(device_type=hidden.device.type, enabled=False)


class MLPHead(Head):
    """Mean-pooled embedding -> Linear -> ReLU -> Dropout -> Linear: [B, num_outputs]."""

    def __init__(self, kind, d_model, num_outputs, hidden=256, dropout=0.25):
        super().__init__(kind, d_model, num_outputs, hidden, dropout)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, num_outputs))

    def forward(self, hidden: torch.Tensor, batch) -> torch.Tensor:
        """hidden [B, T, d], a Batch (or its tokens) -> [B, num_outputs] (fp32)."""
        with self._no_autocast(hidden):
            pooled = mean_pool(hidden, batch).to(self.mlp[0].weight.dtype)
            return self.mlp(pooled)


class ConvHead(Head):
    """Two convolutions over the residues: [B, T, num_outputs], an output per token."""

    def __init__(self, kind, d_model, num_outputs, hidden=256, dropout=0.25):
        super().__init__(kind, d_model, num_outputs, hidden, dropout)
        self.conv1 = nn.Conv1d(d_model, hidden, kernel_size=7, padding=3)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(hidden, num_outputs, kernel_size=7, padding=3)

    def forward(self, hidden: torch.Tensor, batch) -> torch.Tensor:
        """hidden [B, T, d], a Batch (or its tokens) -> logits [B, T, C] (fp32). Non-residue rows of
        the input are zeroed, and the first conv's output at padding too (conv2 sees zeros past
        the end, as for the sequence alone): a sequence's predictions do not depend on its batch."""
        batch = Batch.of(batch)
        hidden, batch = batch.unpack(hidden), batch.padded()  # convolutions must not reach the next sequence
        with self._no_autocast(hidden):
            x = torch.where(batch.residues[..., None], hidden.to(self.conv1.weight.dtype), 0.0)
            x = F.relu(self.conv1(x.transpose(1, 2)))  # [B, hidden, T]
            x = torch.where(~batch.padding[:, None, :], x, 0.0)
            return self.conv2(self.drop(x)).transpose(1, 2)  # [B, T, C]
