"""What the model reads: a batch of sequences, their tokens right-padded into one [B, T] matrix, with
where each sequence is and how long it is, and (training, evaluation) the task's targets.

Collation (data/batching.py) makes it; the encoder (positions, the attention mask, token dropout),
the heads (pooling over residues) and the losses read it. Another layout of the same sequences
(packed end to end) changes what a Batch holds, not every function that reads one.

    tokens     [B, T]   token ids: <cls> residues <eos>, then <pad>
    lengths    [B]      tokens of each sequence, <cls> and <eos> included
    positions  [B, T]   each token's position in its sequence (<cls> at 0)
    offsets    [B + 1]  where each sequence starts in the batch's tokens laid end to end
    padding    [B, T]   True at <pad>
    residues   [B, T]   True at residue tokens (neither <cls>, <eos> nor <pad>)
    target              the task's encoded targets (tasks: Task.encode), or None
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from esm2lite.model.tokenizer import PAD, residue_mask


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T] right-padded with <pad>
    target: torch.Tensor | None = None

    @classmethod
    def of(cls, batch_or_tokens) -> "Batch":
        """A Batch as it is; token ids [B, T] (right-padded) as a Batch without targets."""
        return batch_or_tokens if isinstance(batch_or_tokens, Batch) else cls(batch_or_tokens)

    @cached_property
    def padding(self) -> torch.Tensor:
        return self.tokens.eq(PAD)  # [B, T]

    @cached_property
    def residues(self) -> torch.Tensor:
        return residue_mask(self.tokens)  # [B, T]

    @cached_property
    def lengths(self) -> torch.Tensor:
        return (~self.padding).sum(-1)  # [B]

    @cached_property
    def positions(self) -> torch.Tensor:
        B, T = self.tokens.shape
        return torch.arange(T, device=self.tokens.device).expand(B, T)  # [B, T]; right padding: 0 at <cls>

    @cached_property
    def offsets(self) -> torch.Tensor:
        return torch.nn.functional.pad(self.lengths.cumsum(0), (1, 0))  # [B + 1]

    def to(self, device) -> "Batch":
        return Batch(self.tokens.to(device), self.target.to(device) if self.target is not None else None)
