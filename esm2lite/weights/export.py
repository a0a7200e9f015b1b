"""Exports of a fine-tuned model (the command: esm2lite-export, commands/export.py):

--merged:   the encoder with LoRA merged into its weights, as an HF-layout directory that
            transformers (EsmForMaskedLM / EsmModel) and esm2lite load. The task head is not
            part of that layout; it stays in the esm2lite checkpoint.
--peft:     the adapters in HF peft format (adapter_config.json + adapter_model.safetensors +
            README.md), for one transformers class (--peft-for): EsmModel's module paths have no
            "esm." prefix, the three EsmFor* classes share theirs, so an adapter for one EsmFor*
            class loads onto the other two. Default: EsmForMaskedLM when the base model has an
            LM head, EsmModel when it has none. peft loads the written directory onto that class
            before it is put in place; onto a class with other module paths peft refuses it.
            What it reproduces is the fine-tuned encoder (hidden states; EsmForMaskedLM: logits
            too), never esm2lite's task head.
"""

import os

import torch

from esm2lite.model.config import read_json_object
from esm2lite.errors import CheckpointError, Esm2liteError
from esm2lite.model.lora import merge_lora
from esm2lite.model.esm2 import ESM2
from esm2lite.model.esmc import ESMC
from esm2lite.weights.peft import PEFT_CLASSES, is_esmc_class, same_layout, save_peft_adapter

# The output a class adds to the encoder's hidden states, which is not esm2lite's.
THEIR_HEAD = {
    "EsmModel": "EsmModel's pooler_output comes from transformers' pooler",
    "EsmForSequenceClassification": "EsmForSequenceClassification's logits come from transformers' own classifier "
                                    "(dense-tanh-dense on the <cls> token; the base's, or newly initialised)",
    "EsmForTokenClassification": "EsmForTokenClassification's logits come from transformers' own classifier "
                                 "(one linear layer per token; the base's, or newly initialised)",
}


def merged_encoder(encoder: ESM2 | ESMC) -> ESM2 | ESMC:
    """A plain encoder of the same family (ESM2 or ESMC) whose weights include the merged adapters (if any)."""
    merge_lora(encoder)
    state = {k: v for k, v in encoder.state_dict().items() if "lora_" not in k}
    with torch.device("meta"):
        plain = type(encoder)(encoder.config)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain.eval()


def peft_class(chosen: str | None, encoder: ESM2 | ESMC, base: str | None) -> str:
    """--peft-for, or its default; EsmForMaskedLM needs a base model with an LM head (ESM C: the Esmc
    classes, EsmcForMaskedLM likewise)."""
    family = "Esmc" if isinstance(encoder, ESMC) else "Esm"
    if chosen is None:
        return f"{family}ForMaskedLM" if encoder.config.lm_head else f"{family}Model"
    if is_esmc_class(chosen) != isinstance(encoder, ESMC):
        raise Esm2liteError(f"--peft-for {chosen}: the model is {'ESM C' if isinstance(encoder, ESMC) else 'ESM-2'}; "
                            f"choose one of {', '.join(c for c in PEFT_CLASSES if is_esmc_class(c) == (family == 'Esmc'))}")
    if chosen.endswith("ForMaskedLM") and not encoder.config.lm_head:
        raise Esm2liteError(
            f"--peft-for {chosen}: the base model {base} has no LM head, so {chosen}.from_pretrained "
            "would add a random one (choose EsmModel, EsmForSequenceClassification or EsmForTokenClassification)")
    return chosen


def transformers_reads(base: str | None) -> bool:
    """Whether transformers' Esm classes can load the base model path as it is (an HF ESM directory
    or a hub id; not a fair-esm .pt, a BioNeMo directory or a random architecture)."""
    if not base or os.path.isfile(base):
        return False
    if not os.path.isdir(base):
        return True  # a hub id (load_model found it)
    try:
        return read_json_object(os.path.join(base, "config.json")).get("model_type") in ("esm", "esmc")
    except CheckpointError:  # no config.json, not JSON, not an object
        return False


def peft_notes(for_class: str, base: str | None, head_kind: str) -> list[str]:
    """Where the adapter loads, what it reproduces there and what it does not: one line each."""
    others = [c for c in same_layout(for_class) if c != for_class]
    refused = [c for c in PEFT_CLASSES if c not in same_layout(for_class)]
    notes = [f"also loads onto {', '.join(others)} (the same module paths); " if others else ""]
    notes[0] += (f"peft refuses it on {', '.join(refused)} (\"Target modules ... not found\"): "
                 "export again with --peft-for the class it is loaded onto")
    notes.append("reproduces: the fine-tuned encoder's hidden states (last_hidden_state"
                 + ("" if for_class.endswith("Model") else f" of model.{'esmc' if is_esmc_class(for_class) else 'esm'}(...)")
                 + (") and masked-LM logits" if for_class.endswith("ForMaskedLM") else ")"))
    notes.append(f"does not reproduce: esm2lite's {head_kind} head, which stays in the esm2lite checkpoint "
                 "(predictions: infer.py)" + (f"; {THEIR_HEAD[for_class]}, not from esm2lite"
                                              if for_class in THEIR_HEAD else ""))
    if not base:
        notes.append("the base model is a random initialisation with no file transformers could load: "
                     "--merged writes the tuned encoder as an HF directory instead")
    elif not transformers_reads(base):
        notes.append(f"transformers cannot load the base model {base} as it is: write it as an HF directory "
                     "(esm2lite-convert BASE DIR) and load the adapter onto that")
    return notes


def peft_readme(for_class: str, base: str | None, adapter: str, notes: list[str]) -> str:
    lines = [f"# LoRA adapter exported by esm2lite for transformers' {for_class}", "", "```python",
             "from peft import PeftModel", f"from transformers import {for_class}", "",
             f"base = {for_class}.from_pretrained({base or 'BASE'!r})",
             f"model = PeftModel.from_pretrained(base, {adapter!r}).eval()", "```", ""]
    return "\n".join(lines + [f"- {n[0].upper()}{n[1:]}." for n in notes]) + "\n"


def export_peft(model, spec, args) -> None:
    base = args.base_path or spec.base.path
    for_class = peft_class(args.peft_for, model.encoder, base)
    notes = peft_notes(for_class, base, spec.head["kind"])
    checked = save_peft_adapter(model.encoder, args.peft, base_model_name_or_path=base, overwrite=args.overwrite,
                                for_class=for_class, readme=peft_readme(for_class, base, args.peft, notes))
    print(f"wrote peft adapter to {args.peft} for transformers' {for_class} ({checked})")
    for note in notes:
        print(f"  {note}")
