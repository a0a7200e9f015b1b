"""Embeddings from an ESM-2 encoder (a plain one or a fine-tuned model's): per-sequence means and
per-residue states of chosen layers, in length-bucketed token-budget batches, keyed by id; proteins
longer than the model reads are embedded in overlapping windows (windows.py) or cut."""

import json

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from esm2lite.files.atomic import atomic_path
from esm2lite.data.batching import collate, make_batches
from esm2lite.runtime.device import amp_dtype_for, packs
from esm2lite.runtime.distributed import Dist, gather
from esm2lite.model.heads import mean_pool
from esm2lite.model.esm2 import ESM2
from esm2lite.data.records import Record, encode_sequence
from esm2lite.model.tokenizer import EOS, TOKENS
from esm2lite.inference.windows import embed_windowed, padded_outputs


@torch.no_grad()
def embed(encoder: ESM2, records, ids, batch_tokens: int = 8192, precision: str = "auto", layers=None,
          per_residue: bool = False, d: Dist | None = None, layout: str = "auto") -> dict[str, torch.Tensor]:
    """Embeddings keyed "mean/{layer}/{id}" ([d], mean over residues) and, with per_residue,
    "per_residue/{layer}/{id}" ([n_residues, d]). Layers follow fair-esm: 0 = embeddings,
    L = final LayerNorm output (the default). Under torchrun each rank embeds its share of
    the batches and every rank gets the whole result. layout: padded, packed or auto
    (runtime/device.packs): the same embeddings."""
    d = d or Dist()
    device = next(encoder.parameters()).device
    amp = amp_dtype_for(precision, device)
    packed = packs(layout, device)
    layers = list(layers) if layers else [encoder.config.num_layers]
    out = {}
    lengths = [len(r.tokens) for r in records]
    batches = make_batches(lengths, batch_tokens, shuffle=False, packed=packed)[d.rank::d.world]
    for idx in tqdm(batches, desc="embed", disable=None if d.main else True):  # None: on a terminal only
        batch = collate([records[i] for i in idx], None, packed).to(device)  # [B, T] or packed [1, N]
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out_batch = encoder(batch, repr_layers=layers, logits=False)
        hidden = padded_outputs(batch, out_batch)["hidden_states"]  # {layer: [B, T, d]}
        tokens = batch.padded().tokens  # [B, T]
        for layer in layers:
            h = hidden[layer].float()  # [B, T, d]
            pooled = mean_pool(h, tokens)  # [B, d]
            for row, i in enumerate(idx):
                out[f"mean/{layer}/{ids[i]}"] = pooled[row].cpu().contiguous()
                if per_residue:
                    n = len(records[i].tokens)
                    out[f"per_residue/{layer}/{ids[i]}"] = h[row, 1: n - 1].cpu().contiguous()
    return {k: v for part in gather(d, out) for k, v in part.items()}


def embed_any(encoder: ESM2, ids, sequences, max_residues: int = 1022, truncate: bool = False,
              batch_tokens: int = 8192, precision: str = "auto", layers=None, per_residue: bool = False,
              d: Dist | None = None, layout: str = "auto") -> tuple[dict[str, torch.Tensor], dict]:
    """Embeddings (keys as `embed`) of sequences of any length. Those over max_residues are cut to it
    (truncate) or embedded in overlapping windows (windows.embed_windowed: each residue the mean over
    the windows holding it, <cls>/<eos> only at the real ends); the others get `embed`'s plain forward.
    -> (tensors, {"windows": {id: [[start, end], ...]}, "residues_scored": {id: n}}) for the sequences
    windowed or cut."""
    d = d or Dist()
    tokens = [encode_sequence(s, f"sequence {k} ({ids[k]!r})") for k, s in enumerate(sequences)]
    long = [i for i, t in enumerate(tokens) if len(t) - 2 > max_residues]
    info = {"windows": {}, "residues_scored": {}}
    if truncate:
        info["residues_scored"] = {ids[i]: max_residues for i in long}
        tokens = [t if len(t) - 2 <= max_residues else t[: max_residues + 1] + [EOS] for t in tokens]
        long = []
    short = [i for i in range(len(tokens)) if i not in set(long)]
    records = [Record(sequences[i], tokens[i], None, None, "<memory>", i) for i in short]
    tensors = embed(encoder, records, [ids[i] for i in short], batch_tokens, precision, layers, per_residue, d,
                    layout) if short else {}
    mine = long[d.rank::d.world]  # under torchrun each rank windows its share of the long proteins
    out, windows = {}, {}
    if mine:
        residues = ["".join(TOKENS[t] for t in tokens[i][1:-1]) for i in mine]  # as the tokenizer read them
        emb = embed_windowed(encoder, residues, layers, max_residues, None, batch_tokens, precision, layout)
        for k, i in enumerate(mine):
            windows[ids[i]] = [list(w) for w in emb.windows[k]]
            for layer in emb.hidden[k]:
                out[f"mean/{layer}/{ids[i]}"] = emb.mean(k, layer).contiguous()
                if per_residue:
                    out[f"per_residue/{layer}/{ids[i]}"] = emb.per_residue(k, layer).contiguous()
    for part_tensors, part_windows in gather(d, (out, windows)):
        tensors.update(part_tensors)
        windows.update(part_windows)
    info["windows"] = {ids[i]: windows[ids[i]] for i in long}  # input order, whichever rank ran them
    return tensors, info


def write_embeddings(path: str, tensors: dict, ids, info: dict | None = None) -> None:
    """safetensors, with the ids in input order in the metadata, and JSON of the windows used
    ("windows") and of the residues kept by --truncate ("residues_scored") when there were any."""
    metadata = {"ids": "\n".join(ids), "format": "esm2lite-embeddings"}
    metadata.update({k: json.dumps(v) for k, v in (info or {}).items() if v})
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
