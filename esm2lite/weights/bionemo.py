"""BioNeMo's HF-format ESM-2 checkpoints (NVEsmForMaskedLM, NVEsmModel, NVEsmForTokenClassification:
TransformerEngine layer names), brought to HF EsmForMaskedLM names.

The layout is read from BioNeMo's own converter, NVIDIA/bionemo-framework
bionemo-recipes/models/esm2/convert.py (`mapping`, `_pack_qkv_weight`, `_pack_qkv_bias`,
`_pad_weights`, `_pad_bias`; the same in src/esm/convert.py of earlier versions) and the
modeling file beside it, modeling_esm_te.py (NVEsmConfig, NVEsmForMaskedLM, NVEsmLMHead):

    P encoder.layers.{i}.self_attention.layernorm_qkv.weight   [3d, d]  fused q, k, v
    P encoder.layers.{i}.self_attention.layernorm_qkv.bias     [3d]
        rows [H, 3, hd] (per head: its q, k, v rows): the only order NVIDIA's converter writes,
        whatever the config's qkv_weight_interleaved says (NVEsmConfig's default: true). A file
        saying false is refused: TransformerEngine would read its rows as [3, H, hd] (all q, all k,
        all v), the converter wrote [H, 3, hd], and nothing in the file tells which it holds (the
        two orders are the same shape, and any split of random or trained rows is plausible)
    P encoder.layers.{i}.self_attention.layernorm_qkv.layer_norm_{weight,bias}  attention LayerNorm
    P encoder.layers.{i}.self_attention.proj.{weight,bias}          attention output
    P encoder.layers.{i}.layernorm_mlp.layer_norm_{weight,bias}     FFN LayerNorm
    P encoder.layers.{i}.layernorm_mlp.fc1_{weight,bias}, fc2_{weight,bias}
    P encoder.emb_layer_norm_after.{weight,bias}
    P embeddings.word_embeddings.weight          [padded_vocab_size, d]  rows past 33 are padding
    lm_head.dense.{weight,bias}
    lm_head.decoder.layer_norm_{weight,bias}     the LM head's LayerNorm
    lm_head.decoder.bias                         [padded_vocab_size]     padding = finfo.min
    lm_head.decoder.weight                       tied to the embedding (usually not saved)

P is "model." (NVEsmForMaskedLM now), "esm." (earlier exports, as the nvidia/esm2_* hub files)
or "" (NVEsmModel). No rotary inv_freq is saved (NVEsm's state_dict drops it; earlier exports
may hold P encoder.rotary_embeddings.inv_freq, used when present): TransformerEngine's
RotaryPositionEmbedding computes 1/10000^(2i/hd) in fp32, and so does esm2lite for these files
(not the fp16-rounded values of Meta's files: BioNeMo's conversion drops those).
"*._extra_state" entries are TransformerEngine's FP8 bookkeeping, not weights.

NVEsm runs the FFN through TransformerEngine's GELU, the tanh approximation; esm2lite computes
ESM-2 as Meta, transformers and fair-esm do (exact erf GELU), so its outputs on these weights
equal transformers' EsmForMaskedLM, not NVEsm's bit for bit.
"""

import json
import re

import torch

from esm2lite.errors import CheckpointError
from esm2lite.model.esm2 import rotary_inv_freq
from esm2lite.weights.names import rename

# (BioNeMo name without P, HF EsmForMaskedLM name) for the tensors that are only renamed.
TE_NAMES = [
    ("encoder.layers.{i}.self_attention.layernorm_qkv.layer_norm_{p}", "esm.encoder.layer.{i}.attention.LayerNorm.{p}"),
    ("encoder.layers.{i}.self_attention.proj.{p}", "esm.encoder.layer.{i}.attention.output.dense.{p}"),
    ("encoder.layers.{i}.layernorm_mlp.layer_norm_{p}", "esm.encoder.layer.{i}.LayerNorm.{p}"),
    ("encoder.layers.{i}.layernorm_mlp.fc1_{p}", "esm.encoder.layer.{i}.intermediate.dense.{p}"),
    ("encoder.layers.{i}.layernorm_mlp.fc2_{p}", "esm.encoder.layer.{i}.output.dense.{p}"),
    ("encoder.emb_layer_norm_after.{p}", "esm.encoder.emb_layer_norm_after.{p}"),
    ("lm_head.dense.{p}", "lm_head.dense.{p}"),
    ("lm_head.decoder.layer_norm_{p}", "lm_head.layer_norm.{p}"),
    ("encoder.rotary_embeddings.inv_freq", "esm.rotary_embeddings.inv_freq"),  # exports before NVEsm dropped it
]
# Padded to padded_vocab_size rows: (BioNeMo name without P, HF name), first 33 rows kept.
TE_PADDED = {
    "embeddings.word_embeddings.weight": "esm.embeddings.word_embeddings.weight",
    "lm_head.decoder.weight": "lm_head.decoder.weight",  # the tied copy, checked against the embedding
    "lm_head.decoder.bias": "lm_head.bias",
}
TE_QKV = re.compile(r"^encoder\.layers\.(?P<i>\d+)\.self_attention\.layernorm_qkv\.(?P<p>weight|bias)$")
TE_LAYER = re.compile(r"^(?P<prefix>esm\.|model\.)?encoder\.layers\.\d+\.")
TE_EXTRA_STATE = re.compile(r"(^|\.)_extra_state$")
SHARED_INV_FREQ = "esm.rotary_embeddings.inv_freq"  # the HF name esm2lite copies into every layer

# NVEsmConfig fields whose other values compute something esm2lite does not: (required, default).
TE_REQUIRED = {
    "fuse_qkv_params": (True, True),
    "encoder_activation": ("gelu", "gelu"),
}


def is_bionemo(tensors: dict) -> bool:
    return any(TE_LAYER.match(k) for k in tensors)


def check_config(hf_config: dict, source: str) -> None:
    for field, (want, default) in TE_REQUIRED.items():
        got = hf_config.get(field, default)
        if got != want:
            raise CheckpointError(
                f"{source}: config.json field {field} is {got!r}; esm2lite reads BioNeMo checkpoints "
                f"with {field} {want!r} (NVEsmConfig's default)")
    interleaved = hf_config.get("qkv_weight_interleaved", True)
    if interleaved is not True:  # see the module docstring: false does not say how the rows are stored
        raise CheckpointError(
            f"{source}: config.json field qkv_weight_interleaved is {json.dumps(interleaved)[:40]}, which does not say how "
            "the fused QKV rows are stored (NVIDIA's converter writes per-head interleaved rows whatever this field "
            "says; TransformerEngine reads [q; k; v] rows with it false), so esm2lite refuses to guess; set it to "
            "true if the file came from NVIDIA's converter")


def padded_rows(hf_config: dict, source: str) -> int:
    """Rows of the padded embedding / decoder: padded_vocab_size (NVEsmConfig default 64; null = vocab_size)."""
    vocab = hf_config.get("vocab_size", 33)
    rows = hf_config.get("padded_vocab_size", 64)
    rows = vocab if rows is None else rows
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < vocab:
        raise CheckpointError(f"{source}: config.json field padded_vocab_size {rows!r} is not an integer >= vocab_size {vocab}")
    return rows


def split_qkv(fused: torch.Tensor, num_heads: int, key: str, source: str) -> tuple:
    """fused [3d, ...] -> (q, k, v), each [d, ...], from per-head interleaved rows [H, 3, hd]."""
    rows, rest = fused.shape[0], tuple(fused.shape[1:])
    if rows % (3 * num_heads):
        raise CheckpointError(f"{source}: {key} has {rows} rows, not 3 x {num_heads} heads x head size")
    hd = rows // (3 * num_heads)
    parts = fused.reshape(num_heads, 3, hd, *rest).transpose(0, 1)  # [3, H, hd, ...]
    return tuple(parts[j].reshape(num_heads * hd, *rest).contiguous() for j in range(3))  # [d, ...] each


def strip_prefix(key: str, prefix: str) -> str | None:
    """The key without P (lm_head.* never has one); None for a key outside the layout."""
    if key.startswith("lm_head."):
        return key
    return key[len(prefix):] if key.startswith(prefix) else None


def to_hf_names(tensors: dict, hf_config: dict, num_heads: int, head_dim: int, source: str) -> tuple[dict, dict]:
    """{BioNeMo key: tensor} -> ({HF EsmForMaskedLM key: tensor}, {HF key: BioNeMo key}).
    Keys no rule knows keep their own name (the caller reports them as unexpected)."""
    check_config(hf_config, source)
    prefix = next(m.group("prefix") or "" for m in map(TE_LAYER.match, tensors) if m)
    rows, vocab = padded_rows(hf_config, source), hf_config.get("vocab_size", 33)
    out, origin = {}, {}
    for key, value in tensors.items():
        if TE_EXTRA_STATE.search(key):
            continue
        bare = strip_prefix(key, prefix)
        qkv = TE_QKV.match(bare or "")
        if qkv:
            i, p = qkv.group("i"), qkv.group("p")
            for part, tensor in zip(("query", "key", "value"), split_qkv(value, num_heads, key, source)):
                name = f"esm.encoder.layer.{i}.attention.self.{part}.{p}"
                out[name], origin[name] = tensor, key
            continue
        if bare in TE_PADDED:
            name = TE_PADDED[bare]
            if value.dim() >= 1 and value.shape[0] == rows:  # a wrong size stays: a shape error later
                value = value[:vocab]
        else:
            name = (rename(bare, TE_NAMES) if bare is not None else None) or key
        out[name], origin[name] = value, key
    out.setdefault(SHARED_INV_FREQ, rotary_inv_freq(head_dim))
    return out, origin
