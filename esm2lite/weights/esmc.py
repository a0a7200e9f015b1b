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


# EvolutionaryScale's `esm` package (ESMC .pth state dicts: embed, transformer, sequence_head), per block
# {i}: attn.layernorm_qkv = (LayerNorm, Linear d -> 3d: q, k, v stacked), attn.q_ln / k_ln, attn.out_proj,
# ffn = (LayerNorm, Linear d -> 2f: gate then up, SwiGLU's chunk(2) order, SwiGLU, Linear f -> d).
PTH_NAMES = [
    ("embed.weight", "embed_tokens.weight"),
    ("transformer.blocks.{i}.attn.layernorm_qkv.0.{p}", "layers.{i}.attn_norm.{p}"),
    ("transformer.blocks.{i}.attn.q_ln.weight", "layers.{i}.attn.q_norm.weight"),
    ("transformer.blocks.{i}.attn.k_ln.weight", "layers.{i}.attn.k_norm.weight"),
    ("transformer.blocks.{i}.attn.out_proj.weight", "layers.{i}.attn.o.weight"),
    ("transformer.blocks.{i}.ffn.0.{p}", "layers.{i}.ffn_norm.{p}"),
    ("transformer.blocks.{i}.ffn.3.weight", "layers.{i}.down.weight"),
    ("transformer.norm.weight", "final_norm.weight"),
    ("sequence_head.0.{p}", "lm_head.dense.{p}"),
    ("sequence_head.2.{p}", "lm_head.norm.{p}"),
    ("sequence_head.3.{p}", "lm_head.decoder.{p}"),
]
FUSED = {"attn.layernorm_qkv.1.weight": ("attn.q", "attn.k", "attn.v"), "ffn.1.weight": ("gate", "up")}
HEAD_DIM = 64  # every released ESM C (960 / 15, 1152 / 18, 2560 / 40): the files carry no config
BLOCK = re.compile(r"^transformer\.blocks\.(\d+)\.(.+)$")


def is_evolutionaryscale(state) -> bool:
    return isinstance(state, dict) and "embed.weight" in state and any(
        isinstance(k, str) and k.startswith("transformer.blocks.") for k in state)


def from_evolutionaryscale(state: dict) -> tuple[dict, list, dict]:
    """An ESMC .pth state dict -> ({our key: tensor}, [unexpected keys], the sizes ESMCConfig needs:
    d from the embedding, layers from the keys, heads = d / 64, the SwiGLU width from the down projection)."""
    ours, unexpected = {}, []
    for key, value in state.items():
        block = BLOCK.match(key)
        if block and block.group(2) in FUSED:
            parts = FUSED[block.group(2)]
            for name, piece in zip(parts, value.chunk(len(parts), dim=0)):
                ours[f"layers.{block.group(1)}.{name}.weight"] = piece.contiguous()
            continue
        name = rename(key, PTH_NAMES)
        if name is None:
            unexpected.append(key)
        else:
            ours[name] = value
    d = state["embed.weight"].shape[1]
    down = ours.get("layers.0.down.weight")
    sizes = {"num_layers": len({int(m.group(1)) for k in state if (m := BLOCK.match(k))}), "d_model": d,
             "num_heads": max(d // HEAD_DIM, 1), "ffn_dim": down.shape[1] if down is not None else 1,
             "vocab_size": state["embed.weight"].shape[0]}
    return ours, unexpected, sizes
