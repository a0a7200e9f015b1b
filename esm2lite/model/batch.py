"""What the model reads: a batch of sequences, their tokens in one of two layouts, with where each
sequence is and how long it is, and (training, evaluation) the task's targets.

    padded   tokens [B, T]   each sequence in its own row, right-padded with <pad> (T = the longest)
    packed   tokens [1, N]   the sequences end to end, no padding (N = their tokens together);
                             packed_lengths [B] says where each ends

Collation (data/batching.py) makes either; the encoder (positions, the attention mask, token
dropout), the heads (pooling over residues) and the losses read it through the properties below, so
a function that reads a Batch does not ask which layout it has. Heads return the padded layout
([B, n] pooled, [B, T, C] per residue) in both, so targets and losses are the same.

    tokens     [B, T] | [1, N]  token ids: <cls> residues <eos> (padded: then <pad>)
    lengths    [B]              tokens of each sequence, <cls> and <eos> included
    positions  like tokens      each token's position in its own sequence (<cls> at 0)
    offsets    [B + 1]          where each sequence starts in the tokens laid end to end
    segment    like tokens      the index of the sequence each token belongs to (padding: its row's)
    padding    like tokens      True at <pad> (never, packed)
    residues   like tokens      True at residue tokens (neither <cls>, <eos> nor <pad>)
    target                      the task's encoded targets (tasks: Task.encode), or None
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from esm2lite.model.attention import Spans
from esm2lite.model.tokenizer import PAD, residue_mask


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T] right-padded with <pad>, or packed [1, N]
    target: torch.Tensor | None = None
    packed_lengths: torch.Tensor | None = None  # [B] when packed, else None

    @classmethod
    def of(cls, batch_or_tokens) -> "Batch":
        """A Batch as it is; token ids [B, T] (right-padded) as a Batch without targets."""
        return batch_or_tokens if isinstance(batch_or_tokens, Batch) else cls(batch_or_tokens)

    @classmethod
    def of_rows(cls, rows, packed: bool, target: torch.Tensor | None = None) -> "Batch":
        """Token rows (lists or 1-D tensors: <cls> .. <eos>) -> a Batch, right-padded [B, T] or packed
        end to end [1, N]."""
        rows = [torch.as_tensor(r, dtype=torch.long) for r in rows]
        if packed:
            return cls(torch.cat(rows)[None], target, torch.tensor([len(r) for r in rows]))
        return cls(torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=PAD), target)

    @property
    def packed(self) -> bool:
        return self.packed_lengths is not None

    @cached_property
    def padding(self) -> torch.Tensor:
        return self.tokens.eq(PAD) if not self.packed else torch.zeros_like(self.tokens, dtype=torch.bool)

    @cached_property
    def residues(self) -> torch.Tensor:
        return residue_mask(self.tokens)

    @cached_property
    def lengths(self) -> torch.Tensor:
        return self.packed_lengths if self.packed else (~self.padding).sum(-1)  # [B]

    @cached_property
    def offsets(self) -> torch.Tensor:
        return torch.nn.functional.pad(self.lengths.cumsum(0), (1, 0))  # [B + 1]

    @cached_property
    def segment(self) -> torch.Tensor:
        B, T = self.tokens.shape
        if not self.packed:
            return torch.arange(B, device=self.tokens.device)[:, None].expand(B, T)
        seqs = torch.arange(len(self.lengths), device=self.tokens.device)
        return seqs.repeat_interleave(self.lengths)[None]  # [1, N]

    @cached_property
    def positions(self) -> torch.Tensor:
        B, T = self.tokens.shape
        index = torch.arange(T, device=self.tokens.device).expand(B, T)  # right padding: 0 at <cls>
        return index if not self.packed else index - self.offsets[:-1][self.segment]  # restart per sequence

    @cached_property
    def attention_mask(self) -> torch.Tensor | Spans | None:
        """Who attends to whom: padded, bool [B, 1, 1, T], True at the keys a query may attend (not
        <pad>; None without padding); packed, Spans (lengths, cu_seqlens): each sequence attends to
        itself alone (model/attention.py)."""
        if self.packed:
            return Spans.of(self.lengths)
        return (~self.padding)[:, None, None, :] if self.padding.any() else None

    def per_sequence_sum(self, x: torch.Tensor) -> torch.Tensor:
        """x laid out like tokens ([B, T, ...] or [1, N, ...]) -> [B, ...]: each sequence's sum."""
        if not self.packed:
            return x.sum(1)
        out = x.new_zeros((len(self.lengths), *x.shape[2:]))
        return out.index_add(0, self.segment[0], x[0])

    def per_token(self, v: torch.Tensor) -> torch.Tensor:
        """v [B, ...] -> laid out like tokens: each token gets its sequence's value."""
        return v[self.segment]

    def unpack(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """Packed [1, N, ...] -> padded [B, T, ...] (`fill` past each sequence's end); padded: x itself."""
        if not self.packed:
            return x
        B, T = len(self.lengths), int(self.lengths.max())
        out = x.new_full((B, T, *x.shape[2:]), fill)
        within = self.positions[0]
        out[self.segment[0], within] = x[0]
        return out

    def padded(self) -> "Batch":
        """The same sequences in the padded layout (the same target)."""
        return self if not self.packed else Batch(self.unpack(self.tokens, fill=PAD), self.target)

    def pack(self) -> "Batch":
        """The same sequences packed end to end (the same target)."""
        keep = ~self.padding
        return self if self.packed else Batch(self.tokens[keep][None], self.target, keep.sum(1))

    def to(self, device) -> "Batch":
        move = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return Batch(self.tokens.to(device), move(self.target), move(self.packed_lengths))
