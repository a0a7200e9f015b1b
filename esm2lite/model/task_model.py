"""The task model: an ESM-2 encoder and a task head. It computes and does nothing else; what
trains is the mode's business (modes.py), its files the checkpoint's (ckpt_dir.py)."""

import contextlib

import torch
from torch import nn

from esm2lite.model.batch import Batch
from esm2lite.model.esm2 import ESM2


class TaskModel(nn.Module):
    """tokens [B, T] -> head outputs: [B, n_outputs], or [B, T, n_classes] per residue.

    `labels` says what the outputs mean (LabelSpace.decode); `frozen_encoder` runs the encoder
    without autograd (nothing in it trains, so nothing of it need be saved for backward)."""

    def __init__(self, encoder: ESM2, head: nn.Module, labels, frozen_encoder: bool = False):
        super().__init__()
        self.encoder, self.head, self.labels = encoder, head, labels
        self.frozen_encoder = frozen_encoder

    def forward(self, batch) -> torch.Tensor:
        """batch: a Batch (or its tokens [B, T]) -> head outputs."""
        batch = Batch.of(batch)
        with torch.no_grad() if self.frozen_encoder else contextlib.nullcontext():
            hidden = self.encoder(batch, logits=False)["last_hidden_state"]  # [B, T, d]
        return self.head(hidden, batch)
