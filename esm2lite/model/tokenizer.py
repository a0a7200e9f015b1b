"""The ESM-2 alphabet (33 tokens, same ids as fair-esm and HuggingFace) and batch encoding.

A sequence becomes `<cls>` + one token per residue + `<eos>`; a batch is right-padded
with `<pad>` (id 1).
"""

import re

import numpy as np
import torch

from esm2lite.errors import TokenizerError

TOKENS = (
    ["<cls>", "<pad>", "<eos>", "<unk>"]
    + list("LAGVSERTIDPKQNFYMHWC")  # 4-23: the 20 standard amino acids
    + list("XBUZO")  # 24-28: unknown / ambiguous / rare residues
    + [".", "-", "<null_1>", "<mask>"]  # 29-32
)
CLS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 32
RESIDUES = "LAGVSERTIDPKQNFYMHWCXBUZO.-"  # every single-character token a sequence may hold

_LUT = np.full(256, -1, dtype=np.int64)  # byte -> token id, -1 = not allowed
for _c in RESIDUES:
    _LUT[ord(_c)] = TOKENS.index(_c)
    _LUT[ord(_c.lower())] = TOKENS.index(_c)
_PIECE = re.compile(r"<mask>|\s+|.", re.DOTALL)


class Tokenizer:
    """Maps protein sequences to ESM-2 token ids.

    Lowercase letters count as uppercase, whitespace is ignored, `<mask>` may appear
    inside a string; any other character raises TokenizerError (a ValueError).
    """

    vocab = TOKENS
    cls_id, pad_id, eos_id, unk_id, mask_id = CLS, PAD, EOS, UNK, MASK

    def encode(self, seq: str, index: int = 0, max_residues: int | None = None,
               truncate: bool = False) -> list[int]:
        """One sequence -> [cls, residues..., eos]. `index` only labels error messages."""
        if not isinstance(seq, str):
            raise TokenizerError(f"sequence {index}: expected a string, got {type(seq).__name__}")
        if seq.isascii() and "<" not in seq and not any(c.isspace() for c in seq):
            ids = _LUT[np.frombuffer(seq.encode("ascii"), dtype=np.uint8)]
            bad = np.flatnonzero(ids < 0)
            if bad.size:
                pos = int(bad[0])
                raise TokenizerError(
                    f"sequence {index}: unknown residue {seq[pos]!r} at position {pos + 1}")
            residues = ids.tolist()
        else:
            residues = self._encode_slow(seq, index)
        if not residues:
            raise TokenizerError(f"sequence {index}: empty sequence")
        if max_residues is not None and len(residues) > max_residues:
            if not truncate:
                raise TokenizerError(
                    f"sequence {index}: {len(residues)} residues, more than the maximum "
                    f"{max_residues} (ask for truncation to cut it)")
            residues = residues[:max_residues]
        return [CLS] + residues + [EOS]

    @staticmethod
    def _encode_slow(seq: str, index: int) -> list[int]:
        out = []
        for m in _PIECE.finditer(seq):
            piece = m.group()
            if piece == "<mask>":
                out.append(MASK)
            elif piece.isspace():
                continue
            else:
                code = ord(piece)
                if code > 255 or _LUT[code] < 0:
                    raise TokenizerError(
                        f"sequence {index}: unknown residue {piece!r} at position {m.start() + 1}")
                out.append(int(_LUT[code]))
        return out

    def batch_encode(self, seqs: list[str], max_residues: int | None = None,
                     truncate: bool = False) -> torch.Tensor:
        """list of B strings -> LongTensor tokens [B, T], right-padded with <pad> (1).

        `max_residues`: longer sequences raise TokenizerError, or are cut to that many
        residues when `truncate=True` (fair-esm's extract.py uses 1022).
        """
        if len(seqs) == 0:
            raise TokenizerError("no sequences to encode")
        return pad_tokens([self.encode(s, i, max_residues, truncate) for i, s in enumerate(seqs)])

    def decode(self, ids) -> str:
        """Token ids -> residue string (special tokens other than <mask> dropped)."""
        keep = {CLS, PAD, EOS}
        return "".join(TOKENS[i] for i in (int(x) for x in ids) if i not in keep)


def pad_tokens(encoded: list[list[int]]) -> torch.Tensor:
    """B token lists -> LongTensor [B, T], right-padded with <pad> (T = the longest). The one
    padding function: batches for training, scoring and embedding are all made here."""
    tokens = torch.full((len(encoded), max(map(len, encoded))), PAD, dtype=torch.long)
    for i, ids in enumerate(encoded):
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return tokens


def residue_mask(tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, T] -> bool [B, T], True on residues (not <cls>, <eos>, <pad>); <mask> counts as
    a residue."""
    return ~(tokens.eq(CLS) | tokens.eq(EOS) | tokens.eq(PAD))
