"""Key layouts of ESM-2 checkpoints, mapped onto esm2lite's names.

    HF EsmForMaskedLM                  esm.* + lm_head.*
    HF EsmForSequenceClassification /  esm.* + classifier.*                 (no LM head)
       EsmForTokenClassification
    HF EsmModel                        embeddings.*, encoder.*, pooler.*    (no prefix, no LM head)
    BioNeMo NVEsmForMaskedLM, ...      TransformerEngine names, fused QKV   (esm2lite.weights.bionemo)
    fair-esm .pt                       encoder.sentence_encoder.* or encoder.*

Every directory is first brought to EsmForMaskedLM names (normalize_hf), then one table maps
those onto ours. Task-head tensors (classifier, pooler, contact head) are set aside, to be
reported as ignored; the LM head is optional, but all of it or none (check_keys).
"""

import re

import torch

from esm2lite.weights import bionemo
from esm2lite.errors import CheckpointError
from esm2lite.weights.names import rename

# (HF name, esm2lite name); {i} = layer index, {p} = weight|bias.
HF_NAMES = [
    ("esm.embeddings.word_embeddings.weight", "embed_tokens.weight"),
    ("esm.encoder.layer.{i}.attention.self.query.{p}", "layers.{i}.attn.query.{p}"),
    ("esm.encoder.layer.{i}.attention.self.key.{p}", "layers.{i}.attn.key.{p}"),
    ("esm.encoder.layer.{i}.attention.self.value.{p}", "layers.{i}.attn.value.{p}"),
    ("esm.encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq", "layers.{i}.attn.inv_freq"),
    ("esm.encoder.layer.{i}.attention.output.dense.{p}", "layers.{i}.attn.out.{p}"),
    ("esm.encoder.layer.{i}.attention.LayerNorm.{p}", "layers.{i}.attn_norm.{p}"),
    ("esm.encoder.layer.{i}.intermediate.dense.{p}", "layers.{i}.fc1.{p}"),
    ("esm.encoder.layer.{i}.output.dense.{p}", "layers.{i}.fc2.{p}"),
    ("esm.encoder.layer.{i}.LayerNorm.{p}", "layers.{i}.ffn_norm.{p}"),
    ("esm.encoder.emb_layer_norm_after.{p}", "final_norm.{p}"),
    ("lm_head.dense.{p}", "lm_head.dense.{p}"),
    ("lm_head.layer_norm.{p}", "lm_head.norm.{p}"),
    ("lm_head.bias", "lm_head.bias"),
]
HF_IGNORED = re.compile(r"^esm\.embeddings\.(position_embeddings\.weight|position_ids)$")  # legacy, unused
# transformers 5.x saves one inv_freq for all layers, under either of these names, and
# LayerNorm parameters under their legacy gamma/beta names.
HF_SHARED_INV_FREQ = ("esm.rotary_embeddings.inv_freq", "esm.encoder.layer.*.attention.self.rotary_embeddings.inv_freq")
HF_LEGACY_LN = re.compile(r"(LayerNorm|layer_norm|emb_layer_norm_after)\.(gamma|beta)$")
HF_TIED = "lm_head.decoder.weight"
# EsmModel's keys are EsmForMaskedLM's "esm.*" keys without the prefix.
HF_BARE_ROOTS = ("embeddings.", "encoder.", "rotary_embeddings.")

# fair-esm names after stripping "encoder.sentence_encoder." / "encoder.".
FAIR_NAMES = [
    ("embed_tokens.weight", "embed_tokens.weight"),
    ("layers.{i}.self_attn.q_proj.{p}", "layers.{i}.attn.query.{p}"),
    ("layers.{i}.self_attn.k_proj.{p}", "layers.{i}.attn.key.{p}"),
    ("layers.{i}.self_attn.v_proj.{p}", "layers.{i}.attn.value.{p}"),
    ("layers.{i}.self_attn.rot_emb.inv_freq", "layers.{i}.attn.inv_freq"),
    ("layers.{i}.self_attn.out_proj.{p}", "layers.{i}.attn.out.{p}"),
    ("layers.{i}.self_attn_layer_norm.{p}", "layers.{i}.attn_norm.{p}"),
    ("layers.{i}.fc1.{p}", "layers.{i}.fc1.{p}"),
    ("layers.{i}.fc2.{p}", "layers.{i}.fc2.{p}"),
    ("layers.{i}.final_layer_norm.{p}", "layers.{i}.ffn_norm.{p}"),
    ("emb_layer_norm_after.{p}", "final_norm.{p}"),
    ("lm_head.dense.{p}", "lm_head.dense.{p}"),
    ("lm_head.layer_norm.{p}", "lm_head.norm.{p}"),
    ("lm_head.bias", "lm_head.bias"),
]
FAIR_IGNORED = re.compile(r"(?!)")  # nothing
FAIR_TIED = "lm_head.weight"
FAIR_PREFIX = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")

# Task heads: weights of a model built on the encoder, not of ESM-2 itself. Matched on the
# file's own names (before any renaming), reported once as ignored.
HF_TASK_HEADS = re.compile(r"^((esm|model)\.)?(pooler|contact_head)\.|^classifier\.")
FAIR_TASK_HEADS = re.compile(r"^contact_head\.")
# Of those, what every hub file carries: the contact head (EsmForMaskedLM, EsmModel, fair-esm) and
# EsmModel's pooler, neither trained by anything a user ran. Left out without a word; a classifier
# is someone's trained head, and is named when it is left out.
EXPECTED_HEADS = re.compile(r"^((esm|model)\.)?(pooler|contact_head)\.")


def split_task_heads(tensors: dict, pattern: re.Pattern) -> tuple[dict, list]:
    """{key: tensor} -> (the rest, [sorted task-head keys])."""
    heads = sorted(k for k in tensors if pattern.match(k))
    return {k: v for k, v in tensors.items() if not pattern.match(k)}, heads


def normalize_hf(tensors: dict, hf_config: dict, num_heads: int, head_dim: int, source: str) -> tuple[dict, dict]:
    """An HF-format directory's tensors (task heads already split off) -> ({EsmForMaskedLM
    key: tensor}, {renamed key: the file's key}). Keys no rule knows keep their own name."""
    if bionemo.is_bionemo(tensors):
        return bionemo.to_hf_names(tensors, hf_config, num_heads, head_dim, source)
    if any(k.startswith("esm.") for k in tensors):  # EsmForMaskedLM, EsmFor*Classification
        return tensors, {}
    out, origin = {}, {}  # EsmModel
    for key, value in tensors.items():
        name = f"esm.{key}" if key.startswith(HF_BARE_ROOTS) else key
        out[name], origin[name] = value, key
    return out, origin


def to_esm2lite_keys(tensors: dict, table, ignored: re.Pattern, tied: str, num_layers: int,
                     source: str) -> tuple[dict, list]:
    """{their key: tensor} -> ({our key: tensor}, [unexpected keys])."""
    ours, unexpected = {}, []
    shared = [tensors.pop(k) for k in HF_SHARED_INV_FREQ if k in tensors]
    tied_weight = tensors.pop(tied, None)
    for key, value in tensors.items():
        modern = HF_LEGACY_LN.sub(lambda m: f"{m.group(1)}.{'weight' if m.group(2) == 'gamma' else 'bias'}", key)
        name = rename(modern, table)
        if name is not None:
            ours[name] = value
        elif not ignored.match(modern):
            unexpected.append(key)
    if shared:
        for i in range(num_layers):
            ours.setdefault(f"layers.{i}.attn.inv_freq", shared[0].clone())  # one buffer per layer
    if tied_weight is not None and "embed_tokens.weight" in ours:
        if not torch.equal(tied_weight, ours["embed_tokens.weight"]):
            raise CheckpointError(f"{source}: {tied} differs from the token embedding; ESM-2's LM head is tied")
    return ours, unexpected


def has_lm_head(state: dict) -> bool:
    """An LM head is optional: present when any of its weights is (then all must be)."""
    return any(k.startswith("lm_head.") for k in state)
