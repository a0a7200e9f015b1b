"""Key layouts of ESM C checkpoints saved by transformers' Esmc classes, mapped onto esm2lite's ESMC.

    EsmcForMaskedLM                  esmc.* + lm_head.*
    EsmcForSequenceClassification    esmc.* + classifier.*     (no LM head)
    EsmcForTokenClassification       esmc.* + score.*          (no LM head)
    EsmcModel                        the esmc.* keys without the prefix

Rotary frequencies are not stored (computed from the head size, base 10000, as transformers does).
"""

import re

from esm2lite.weights.names import rename

# (EsmcForMaskedLM name, esm2lite name); {i} = layer index, {p} = weight|bias.
NAMES = [
    ("esmc.embed_tokens.weight", "embed_tokens.weight"),
    *((f"esmc.layers.{{i}}.self_attn.{x}_proj.weight", f"layers.{{i}}.attn.{x}.weight") for x in "qkvo"),
    ("esmc.layers.{i}.self_attn.q_norm.weight", "layers.{i}.attn.q_norm.weight"),
    ("esmc.layers.{i}.self_attn.k_norm.weight", "layers.{i}.attn.k_norm.weight"),
    ("esmc.layers.{i}.input_layernorm.{p}", "layers.{i}.attn_norm.{p}"),
    ("esmc.layers.{i}.post_attention_layernorm.{p}", "layers.{i}.ffn_norm.{p}"),
    *((f"esmc.layers.{{i}}.mlp.{x}_proj.weight", f"layers.{{i}}.{x}.weight") for x in ("gate", "up", "down")),
    ("esmc.norm.weight", "final_norm.weight"),
    ("lm_head.dense.{p}", "lm_head.dense.{p}"),
    ("lm_head.layer_norm.{p}", "lm_head.norm.{p}"),
    ("lm_head.decoder.{p}", "lm_head.decoder.{p}"),
]
TASK_HEADS = re.compile(r"^(classifier|score)\.")  # a trained head on the encoder: left out, and named
BARE_ROOTS = ("embed_tokens.", "layers.", "norm.")  # EsmcModel saves the encoder without "esmc."


def is_esmc(hf_config: dict) -> bool:
    return hf_config.get("model_type") == "esmc"


def to_esmc_keys(tensors: dict) -> tuple[dict, list, list]:
    """{file key: tensor} -> ({our key: tensor}, [unexpected file keys], [task-head keys left out])."""
    ours, unexpected, heads = {}, [], []
    bare = not any(k.startswith("esmc.") for k in tensors)
    for key, value in tensors.items():
        if TASK_HEADS.match(key):
            heads.append(key)
            continue
        name = rename("esmc." + key if bare and key.startswith(BARE_ROOTS) else key, NAMES)
        if name is None:
            unexpected.append(key)
        else:
            ours[name] = value
    return ours, unexpected, sorted(heads)
