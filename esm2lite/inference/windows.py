"""Proteins longer than the context: window arithmetic, batched forwards over token rows, and
windowed embeddings.

Coordinates are token indices into the whole protein's row `[<cls>, r_1 .. r_L, <eos>]`
(T = L + 2 tokens; residue p, 1-based, sits at token p). A window is a half-open slice
[start, end) of that row, at most W = max_residues + 2 tokens long. Windows are plain slices:
<cls> is in the first window only and <eos> in the last only, where the protein has them; a
window in the middle holds residues and nothing else (ProteinGym does the same).

Two rules:

    tile_windows      embeddings: the fewest windows of W tokens whose neighbours share at
                      least `min_overlap` tokens, their starts spread evenly over 0 .. T - W;
                      each token's representation is the mean over the windows that hold it.
    optimal_window    scoring (ProteinGym's "optimal" rule, get_optimal_window): the window of
                      W tokens that gives the position at token i the most context:
                      [0, W) when i < W // 2, [T - W, T) when i >= T - W // 2, otherwise
                      [i - W // 2, i + W // 2).

A protein of at most max_residues residues (T <= W) has the one window [0, T): the plain,
unwindowed forward.
"""

from dataclasses import dataclass

import torch
from tqdm import tqdm

from esm2lite.data.batching import make_batches
from esm2lite.runtime.device import PRECISIONS, amp_dtype_for, packs
from esm2lite.model.batch import Batch
from esm2lite.errors import DataError, TokenizerError
from esm2lite.model.tokenizer import MASK, Tokenizer


def window_size(max_residues: int | None) -> int | None:
    """Tokens in a full window: the residues plus <cls> and <eos> (None = no limit)."""
    if max_residues is None:
        return None
    if int(max_residues) < 1:
        raise DataError(f"max_residues must be at least 1, got {max_residues}")
    return int(max_residues) + 2


def optimal_window(i: int, n_tokens: int, window: int | None) -> tuple[int, int]:
    """ProteinGym's optimal window around token i of a row of n_tokens: -> (start, end)."""
    if window is None or n_tokens <= window:
        return 0, n_tokens
    half = window // 2
    if i < half:
        return 0, window
    if i >= n_tokens - half:
        return n_tokens - window, n_tokens
    return i - half, i + half


def tile_windows(n_tokens: int, window: int | None, min_overlap: int | None = None) -> list[tuple[int, int]]:
    """Windows of `window` tokens covering [0, n_tokens), neighbours sharing >= min_overlap
    tokens (default window // 2). n = 1 + ceil((T - W) / (W - min_overlap)) windows, the k-th
    starting at floor(k * (T - W) / (n - 1))."""
    if window is None or n_tokens <= window:
        return [(0, n_tokens)]
    overlap = window // 2 if min_overlap is None else int(min_overlap)
    if not 0 <= overlap < window:
        raise DataError(f"window overlap must be in 0..{window - 1} tokens, got {overlap}")
    span = n_tokens - window  # how far the last window's start is from the first
    n = 1 + -(-span // (window - overlap))
    return [(k * span // (n - 1), k * span // (n - 1) + window) for k in range(n)]


def autocast_dtype(precision: str, device: torch.device):
    """"auto": bf16 on GPU, fp32 elsewhere; otherwise as named. None = no autocast."""
    if precision not in PRECISIONS:
        raise DataError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return amp_dtype_for(precision, device)


@dataclass
class Rows:
    """Token rows to run: row r is bases[base[r]][start[r]:end[r]] with <mask> at token
    mask[r] (protein coordinates; -1 = no mask). Rows are built only when their batch runs."""

    bases: list[torch.Tensor]  # each [T_b] long: a whole protein, <cls> .. <eos>
    base: list[int]
    start: list[int]
    end: list[int]
    mask: list[int]

    def __len__(self):
        return len(self.base)

    def row(self, r: int) -> torch.Tensor:
        """Row r's tokens [end - start]: its slice of the protein, <mask> put in."""
        s, e = self.start[r], self.end[r]
        out = self.bases[self.base[r]][s:e].clone()
        if self.mask[r] >= 0:
            out[self.mask[r] - s] = MASK
        return out

    def batch(self, idx: list[int], packed: bool) -> Batch:
        """The rows idx as one Batch: right-padded [B, T_max], or packed end to end [1, N]."""
        return Batch.of_rows([self.row(r) for r in idx], packed)


def padded_outputs(batch: Batch, out: dict) -> dict:
    """The model's outputs in the padded layout ([B, T, ...], a row per sequence) whichever layout ran."""
    if not batch.packed:
        return out
    hidden = {layer: batch.unpack(h) for layer, h in out.get("hidden_states", {}).items()}
    return {k: batch.unpack(v) if k != "hidden_states" else hidden for k, v in out.items()}


@torch.inference_mode()
def run_rows(model, rows: Rows, batch_tokens: int, precision: str = "auto", repr_layers=(), logits=True,
             desc: str | None = None, layout: str = "auto"):
    """Forward every row once in length-bucketed batches of at most batch_tokens tokens (padding
    included; packed batches, the layout runtime/device.packs picks from `layout`, count real tokens).
    Yields (idx: row indices, out: the model's output dict for those rows, padded layout [B, T, ...],
    on the model's device). With `desc`, a progress bar on a terminal."""
    model.eval()
    device = next(model.parameters()).device
    amp = autocast_dtype(precision, device)
    packed = packs(layout, device)
    lengths = [e - s for s, e in zip(rows.start, rows.end)]
    batches = make_batches(lengths, batch_tokens, shuffle=False, packed=packed)
    for idx in tqdm(batches, desc=desc, disable=None if desc else True, leave=False):  # None: on a terminal only
        batch = rows.batch(idx, packed).to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(batch, repr_layers=repr_layers, logits=logits)
        yield idx, padded_outputs(batch, out)


def encode_protein(seq: str, where: str) -> torch.Tensor:
    """A residue string -> its whole token row [L + 2] (no length limit); bad letters and
    <mask> -> DataError at `where`."""
    if not isinstance(seq, str):
        raise DataError(f"{where}: expected a sequence string, got {type(seq).__name__}")
    try:
        ids = Tokenizer().encode(seq)
    except TokenizerError as e:
        raise DataError(f"{where}: {str(e).split(': ', 1)[-1]}") from None
    if MASK in ids:
        raise DataError(f"{where}: <mask> is not allowed here")
    return torch.tensor(ids, dtype=torch.long)



@dataclass
class Embeddings:
    """Per-protein hidden states, input order: hidden[k][layer] is [T_k, d] fp32 on the CPU
    (row 0 = <cls>, rows 1..L = residues, row T-1 = <eos>); windows[k] lists the windows used."""

    hidden: list[dict[int, torch.Tensor]]
    windows: list[list[tuple[int, int]]]
    forwards: int
    batches: int

    def per_residue(self, k: int, layer: int) -> torch.Tensor:
        return self.hidden[k][layer][1:-1]  # [L, d]

    def mean(self, k: int, layer: int) -> torch.Tensor:
        return self.per_residue(k, layer).mean(0)  # [d]


def embed_windowed(model, sequences, layers=None, max_residues: int | None = 1022, min_overlap: int | None = None,
                   batch_tokens: int = 8192, precision: str = "auto", layout: str = "auto") -> Embeddings:
    """Hidden states of whole proteins of any length. A protein over max_residues is cut into
    tile_windows(T, max_residues + 2, min_overlap); every token's representation is the mean
    over the windows holding it. Shorter proteins get their plain forward."""
    W = window_size(max_residues)
    layers = sorted(set(layers)) if layers else [model.config.num_layers]
    bases = [encode_protein(s, f"sequence {k}") for k, s in enumerate(sequences)]
    if not bases:
        raise DataError("no sequences to embed")
    windows = [tile_windows(len(t), W, min_overlap) for t in bases]
    owner = [k for k, ws in enumerate(windows) for _ in ws]
    flat = [w for ws in windows for w in ws]
    rows = Rows(bases, owner, [s for s, _ in flat], [e for _, e in flat], [-1] * len(flat))
    d = model.config.d_model
    sums = [{layer: torch.zeros(len(t), d, dtype=torch.float64) for layer in layers} for t in bases]
    counts = [torch.zeros(len(t), 1, dtype=torch.float64) for t in bases]
    n_batches = 0
    for idx, out in run_rows(model, rows, batch_tokens, precision, repr_layers=layers, logits=False,
                             desc="embed (windows)", layout=layout):
        n_batches += 1
        for b, r in enumerate(idx):  # hidden_states[layer]: [B, T_max, d]
            k, s, e = owner[r], rows.start[r], rows.end[r]
            for layer in layers:
                sums[k][layer][s:e] += out["hidden_states"][layer][b, : e - s].double().cpu()
            counts[k][s:e] += 1
    hidden = [{layer: (sums[k][layer] / counts[k]).float() for layer in layers} for k in range(len(bases))]
    return Embeddings(hidden, windows, len(rows), n_batches)
