"""HF peft adapter directories <-> esm2lite LoRA.

A peft LoRA directory holds adapter_config.json and adapter_model.safetensors with keys

    base_model.model.{module}.lora_A.weight   [r, K]     (A: our lora_a)
    base_model.model.{module}.lora_B.weight   [N, r]     (B: our lora_b)

where {module} is the module path in the transformers class the adapter is loaded onto:
encoder.layer.{i}.attention.self.query on EsmModel, esm.encoder.layer.{i}... on EsmForMaskedLM,
EsmForSequenceClassification and EsmForTokenClassification (their EsmModel sits under "esm.").
peft matches those keys by name; keys written for another class are not loaded, and without a
guard every lora_B stays zero with only a warning. Tensors of peft's modules_to_save (a
classification head, saved whole) have no LoRA suffix.

save_peft_adapter writes the keys of one chosen class, and target_modules as one regular
expression that peft matches against whole module paths: exactly the adapted modules of that
class. Loaded onto a class whose paths differ, peft stops with "Target modules ... not found in
the base model". The written directory is loaded back with peft onto that class (built on the
meta device: no weights) before it is renamed into place; an adapter tensor peft leaves out is an
error. Tied adapters are written once per layer. load_peft_adapter reads any of these layouts.
"""

import contextlib
import json
import os
import re
import warnings

import torch
from safetensors.torch import save_file

from esm2lite.files.atomic import atomic_dir
from esm2lite.weights.pretrained import HF_NAMES, read_safetensors, rename
from esm2lite.errors import CheckpointError
from esm2lite.model.esmc import ESMC
from esm2lite.weights import esmc
from esm2lite.model.lora import (ESMC_TARGETS, TARGETS, LoRAConfig, apply_lora, check_adapter_keys, expected_shapes, load_lora_state_dict,
                   lora_modules, module_name)

CONFIG_FILE, WEIGHTS_FILE, README_FILE = "adapter_config.json", "adapter_model.safetensors", "README.md"
# transformers class -> the path of its EsmModel (the prefix of every adapted module)
PEFT_CLASSES = {"EsmModel": "", "EsmForMaskedLM": "esm.", "EsmForSequenceClassification": "esm.",
                "EsmForTokenClassification": "esm.",
                # ESM C (adapters written, not read: load_peft_adapter reads ESM-2's layouts)
                "EsmcModel": "", "EsmcForMaskedLM": "esmc.", "EsmcForSequenceClassification": "esmc.",
                "EsmcForTokenClassification": "esmc."}


def _hf_template(target: str) -> str:
    """HF EsmModel module path of a target in block {i}, from checkpoint.HF_NAMES:
    "query" -> "encoder.layer.{i}.attention.self.query"."""
    hf = rename(f"{module_name(0, target)}.weight", HF_NAMES, reverse=True)  # esm.encoder.layer.0....weight
    return hf.removeprefix("esm.").removesuffix(".weight").replace(".0.", ".{i}.", 1)


HF_MODULES = {t: _hf_template(t) for t in TARGETS}  # our target -> HF module path (relative to EsmModel)
_HF_TARGET = {path.split("{i}.")[1]: t for t, path in HF_MODULES.items()}  # "attention.self.query" -> "query"
ADAPTER_KEY = re.compile(
    r"^base_model\.model\.(?:esm\.)?encoder\.layer\.(?P<i>\d+)\.(?P<module>"
    + "|".join(re.escape(m) for m in _HF_TARGET) + r")\.lora_(?P<ab>[AB])\.weight$")
ENCODER_PREFIX = re.compile(r"^base_model\.model\.(esm\.|encoder\.|embeddings\.)")

# adapter_config.json fields that do not change what the loaded adapter computes (the tensors
# in the file say which modules are adapted). Every other field must be peft's "off" value
# (None / False / {} / []) unless handled by name below.
IGNORED_FIELDS = {
    "base_model_name_or_path", "revision", "task_type", "inference_mode", "auto_mapping", "peft_version",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save",
    "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
}
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")  # these rewrite the base weights


def is_esmc_class(name: str) -> bool:
    return name.startswith("Esmc")


def same_layout(for_class: str) -> list[str]:
    """The classes an adapter written for `for_class` loads onto (the same family and module paths)."""
    return [c for c, prefix in PEFT_CLASSES.items()
            if prefix == PEFT_CLASSES[for_class] and is_esmc_class(c) == is_esmc_class(for_class)]


def save_peft_adapter(model, path: str, base_model_name_or_path: str | None = None, overwrite: bool = False,
                      for_class: str = "EsmModel", readme: str | None = None, check: bool = True) -> str:
    """Write a peft LoRA directory for transformers' `for_class` (atomically): PeftModel.from_pretrained(
    for_class.from_pretrained(base), path) runs our encoder. With check, peft must load every adapter
    tensor onto that class first (CheckpointError otherwise, nothing written). Returns one line on
    what was checked."""
    if for_class not in PEFT_CLASSES:
        raise ValueError(f"save_peft_adapter: for_class must be one of {', '.join(PEFT_CLASSES)}")
    modules = lora_modules(model)
    if not modules:
        raise ValueError("save_peft_adapter: the model has no LoRA adapters (call apply_lora first)")
    prefix, tensors, paths = PEFT_CLASSES[for_class], {}, []
    for name, m in modules.items():
        hf = prefix + hf_module_path(name)
        paths.append(hf)
        # copies: safetensors refuses tensors that share memory (tied adapters)
        tensors[f"base_model.model.{hf}.lora_A.weight"] = m.lora_a.detach().to("cpu", copy=True)  # [r, K]
        tensors[f"base_model.model.{hf}.lora_B.weight"] = m.lora_b.detach().to("cpu", copy=True)  # [N, r]
    if is_esmc_class(for_class) != isinstance(model, ESMC):
        raise ValueError(f"save_peft_adapter: {for_class} is not a class of this model's family "
                         f"({'ESM C' if isinstance(model, ESMC) else 'ESM-2'})")
    adapter_config = _adapter_config(model.lora_config, for_class, target_regex(paths), base_model_name_or_path)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(adapter_config, f, indent=2)
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        if readme:
            with open(os.path.join(tmp, README_FILE), "w", encoding="utf-8") as f:
                f.write(readme)
        return check_in_peft(tmp, model.config.to_hf_config(), for_class, len(tensors), path) if check else ""


def _adapter_config(config: LoRAConfig, for_class: str, target_modules: str, base: str | None) -> dict:
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base,
        # AutoPeftModel.from_pretrained(path) builds this class from base_model_name_or_path
        "auto_mapping": {"base_model_class": for_class, "parent_library": "transformers.models."
                         + ("esmc.modeling_esmc" if is_esmc_class(for_class) else "esm.modeling_esm")},
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": target_modules, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def target_regex(paths: list[str]) -> str:
    """peft's target_modules as a regular expression (peft re.fullmatch-es it against module
    paths) that matches exactly `paths`: "esm\\.encoder\\.layer\\.(?:0|1)\\.(?:attention\\.self\\.query|...)"."""
    parts = [re.fullmatch(r"(.*?(?:encoder\.layer|layers)\.)(\d+)\.(.+)", p).groups() for p in paths]
    prefixes = sorted({p for p, _, _ in parts})
    layers = sorted({int(i) for _, i, _ in parts})
    names = sorted({m for _, _, m in parts})
    if len(prefixes) == 1 and len(layers) * len(names) == len(set(paths)):  # every target in every layer
        return (f"{re.escape(prefixes[0])}(?:{'|'.join(map(str, layers))})\\."
                f"(?:{'|'.join(re.escape(m) for m in names)})")
    return "|".join(re.escape(p) for p in sorted(set(paths)))


def check_in_peft(adapter_dir: str, hf_config: dict, for_class: str, n_tensors: int, name: str) -> str:
    """Load the directory with peft onto `for_class` built on the meta device (its structure, no
    weights): CheckpointError (naming `name`) unless its n_tensors adapter tensors and the LoRA
    tensors peft makes on that class match one to one. Without peft / transformers: not checked."""
    try:
        import peft
        import transformers
    except ImportError:
        return "not checked with peft (peft or transformers is not installed here)"
    with warnings.catch_warnings(), _transformers_quiet(transformers):
        warnings.simplefilter("ignore")
        try:
            family = transformers.EsmcConfig if is_esmc_class(for_class) else transformers.EsmConfig
            fields = {k: v for k, v in hf_config.items() if k not in ("architectures", "model_type")}
            with torch.device("meta"):
                base = getattr(transformers, for_class)(family(**fields))
            model = peft.PeftModel(base, peft.PeftConfig.from_pretrained(adapter_dir), low_cpu_mem_usage=True)
            result = model.load_adapter(adapter_dir, "default", low_cpu_mem_usage=True, torch_device="cpu")
        except Exception as e:  # peft's own errors, e.g. target modules not found in the model
            raise CheckpointError(f"{name}: peft {peft.__version__} cannot load this adapter onto {for_class} "
                                  f"({' '.join(str(e).split())[:300]}); nothing written") from None
    # every LoRA tensor peft made got a key from the file (missing_keys, adapter keys only) and every
    # key in the file landed (unexpected_keys); as many as written: nothing adapted besides
    made = sum(1 for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if missing or unexpected or made != n_tensors:
        example = (unexpected + missing)[:1]
        raise CheckpointError(
            f"{name}: peft {peft.__version__} finds no module on {for_class} for {len(unexpected)} of the {n_tensors} "
            f"adapter tensors written and no value for {len(missing)} of the {made} LoRA tensors it makes there "
            f"(e.g. {example[0] if example else 'a count mismatch'}); nothing written")
    return f"checked with peft {peft.__version__}: {for_class} takes all {n_tensors} adapter tensors"


@contextlib.contextmanager
def _transformers_quiet(transformers):
    """transformers' logging at error level for a while (its notices would reach stderr)."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


def hf_module_path(name: str) -> str:
    """"layers.3.attn.query" -> "encoder.layer.3.attention.self.query"; ESM C: "layers.3.attn.q" ->
    "layers.3.self_attn.q_proj", "layers.3.gate" -> "layers.3.mlp.gate_proj"."""
    parts = name.split(".")
    if parts[-1] in ESMC_TARGETS:
        return rename(f"{name}.weight", esmc.NAMES, reverse=True).removeprefix("esmc.").removesuffix(".weight")
    return HF_MODULES[parts[-1]].format(i=int(parts[1]))


def load_peft_adapter(model, path: str) -> dict:
    """Apply the LoRA adapter in a peft directory (saved on EsmModel, EsmForMaskedLM or
    EsmForSequenceClassification) to our model, with its r / lora_alpha / lora_dropout and the
    modules its weights file adapts. Returns the modules_to_save tensors (e.g. a classifier
    head: {"classifier.dense.weight": ...}), which have no place in ESM2; {} for a plain adapter."""
    config_file, weights_file = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    fields = _read_adapter_config(config_file)
    if not os.path.exists(weights_file) and os.path.exists(os.path.join(path, "adapter_model.bin")):
        raise CheckpointError(f"{path}: has adapter_model.bin but no {WEIGHTS_FILE}; esm2lite reads safetensors only")
    adapters, heads = _split_tensors(read_safetensors(weights_file), weights_file)
    pairs = {(i, t) for i, t, _ in adapters}
    layers = sorted({i for i, _ in pairs})
    targets = tuple(t for t in TARGETS if any(t == u for _, u in pairs))
    if len(pairs) != len(layers) * len(targets):
        raise CheckpointError(
            f"{weights_file}: adapts {len(pairs)} modules that are not every target ({', '.join(targets)}) "
            f"in every layer ({layers}); esm2lite applies the same targets to each selected layer")
    try:
        config = LoRAConfig(rank=fields.get("r", 8), alpha=fields.get("lora_alpha", 8),
                            dropout=fields.get("lora_dropout", 0.0), targets=targets,
                            layers=None if layers == list(range(len(model.layers))) else layers)
        expected = expected_shapes(model, config)
    except ValueError as e:
        raise CheckpointError(f"{config_file}: {e}") from None
    sd = {f"{module_name(i, t)}.lora_{ab.lower()}": v for (i, t, ab), v in adapters.items()}
    check_adapter_keys(expected, sd, weights_file)
    apply_lora(model, config)
    load_lora_state_dict(model, sd, weights_file)
    return heads


def _read_adapter_config(config_file: str) -> dict:
    try:
        with open(config_file, encoding="utf-8") as f:
            fields = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{config_file}: file not found") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object")
    for k, v in fields.items():
        if k == "peft_type":
            ok = v == "LORA"
        elif k == "bias":
            ok = v == "none"
        elif k == "init_lora_weights":
            ok = not (isinstance(v, str) and v.lower().startswith(BASE_CHANGING_INITS))
        else:
            ok = k in IGNORED_FIELDS or k in ("r", "lora_alpha", "lora_dropout") or not v
        if not ok:
            raise CheckpointError(f"{config_file}: field {k} = {v!r} is not supported by esm2lite (plain LoRA only)")
    if fields.get("peft_type") != "LORA":
        raise CheckpointError(f"{config_file}: field peft_type must be \"LORA\"")
    return fields


def _split_tensors(tensors: dict, weights_file: str) -> tuple[dict, dict]:
    """-> ({(layer, target, "A"|"B"): tensor}, {head tensor name: tensor})."""
    adapters, heads = {}, {}
    for key, v in tensors.items():
        m = ADAPTER_KEY.match(key)
        if m:
            adapters[int(m["i"]), _HF_TARGET[m["module"]], m["ab"]] = v
        elif ".lora_" in key or not key.startswith("base_model.model."):
            raise CheckpointError(f"{weights_file}: tensor {key} adapts a module esm2lite does not map "
                                  f"(supported: {', '.join(_HF_TARGET)} in encoder layers)")
        elif ENCODER_PREFIX.match(key):
            raise CheckpointError(f"{weights_file}: tensor {key} is a fully trained encoder module "
                                  "(modules_to_save); esm2lite loads LoRA adapters only")
        else:
            heads[key.removeprefix("base_model.model.")] = v
    if not adapters:
        raise CheckpointError(f"{weights_file}: no LoRA adapter tensors (*.lora_A.weight / *.lora_B.weight)")
    return adapters, heads
