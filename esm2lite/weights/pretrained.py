"""ESM-2 weights in the files users already have, mapped onto esm2lite's names.

- HuggingFace directory: config.json + model.safetensors (or shards + index.json), saved from
  EsmForMaskedLM, EsmModel, EsmForSequenceClassification / EsmForTokenClassification, or
  BioNeMo's NVEsm classes (key layouts: esm2lite.weights.layouts, esm2lite.weights.bionemo)
- fair-esm .pt: a pickle read with weights_only=True, argparse.Namespace the one allowed class
- hub id ("facebook/esm2_t33_650M_UR50D"), downloaded with huggingface_hub

Loading is strict (missing, unexpected and mis-shaped keys are one error; task-head weights
such as classifier.* are reported once as ignored; the LM head is optional) and keeps one
copy of the weights: the model is built on the meta device, then the loaded tensors are
assigned to it.
"""

import argparse
import dataclasses
import json
import os
import pickle
import re
import sys
import zipfile
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from esm2lite.files.atomic import atomic_dir
from esm2lite.model.config import ESM2Config, read_json_object
from esm2lite.errors import CheckpointError, Esm2liteError, key_mismatch
from esm2lite.weights.layouts import (FAIR_IGNORED, FAIR_NAMES, FAIR_PREFIX, FAIR_TASK_HEADS, FAIR_TIED, HF_IGNORED, HF_NAMES,
                      EXPECTED_HEADS, HF_TASK_HEADS, HF_TIED, has_lm_head, normalize_hf, split_task_heads, to_esm2lite_keys)
from esm2lite.model.esm2 import ESM2
from esm2lite.model.esmc import ESMC, ESMCConfig
from esm2lite.weights import esmc
from esm2lite.weights.names import rename
from esm2lite.model.tokenizer import TOKENS
from esm2lite.files.textfiles import MAX_JSON_BYTES, open_file, read_text

__all__ = ["HF_NAMES", "FAIR_NAMES", "rename", "load_pretrained", "load_base", "random_base", "build_model",
           "check_keys", "read_checkpoint", "save_hf_dir", "resolve_dtype", "weights_hash", "WeightsHash"]

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise CheckpointError(f"unsupported dtype {dtype!r}; use fp32, bf16 or fp16")


# ---------------------------------------------------------------- reading files


def _regular_file(path: str) -> None:
    """CheckpointError unless `path` is a regular file (a FIFO or a device would block or never end
    a read); checked on the opened descriptor, without blocking (textfiles.open_file)."""
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: file not found")
    open_file(path, CheckpointError, regular=True)[0].close()


def read_safetensors(path: str) -> dict:
    _regular_file(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except MemoryError:
        raise  # cli.run_main: one line saying so, not "corrupt"
    except Exception as e:  # safetensors raises its own error types for bad headers / sizes
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({_one_line(e)})") from None


def read_hf_dir(path: str) -> tuple[dict, ESM2Config | ESMCConfig, dict]:
    """HF directory -> (config.json's fields, config (ESM-2 or ESM C), {file key: tensor})."""
    config_json = os.path.join(path, "config.json")
    hf_config = read_json_object(config_json)
    family = ESMCConfig if esmc.is_esmc(hf_config) else ESM2Config
    config = family.from_hf_config(hf_config, source=config_json)
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        text = read_text(index, CheckpointError, MAX_JSON_BYTES, regular=True)
        try:
            weight_map = json.loads(text)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({_one_line(e)})") from None
        for name in files:  # shards are plain file names inside the directory, nothing else
            if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
                raise CheckpointError(f"{index}: weight_map names {name!r}, not a file name in the directory")
        tensors = {}
        for name in files:
            shard = read_safetensors(os.path.join(path, name))
            tensors.update(shard)
        return hf_config, config, tensors
    if os.path.exists(single):
        return hf_config, config, read_safetensors(single)
    if os.path.exists(os.path.join(path, "pytorch_model.bin")):
        raise CheckpointError(
            f"{path}: has pytorch_model.bin but no model.safetensors; esm2lite reads safetensors "
            "only (re-save with transformers' save_pretrained)")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def torch_file(path: str):
    """A PyTorch file's contents, read with weights_only=True (tensors, containers and argparse.Namespace
    only): never runs pickled code."""
    _regular_file(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
        if not found:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (unpickling failed)") from None
        raise CheckpointError(
            f"{path}: refused to unpickle (it needs {found.group(1)}); only tensors and argparse.Namespace "
            "are allowed, and esm2lite never unpickles with weights_only=False") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except MemoryError:
        raise  # cli.run_main: one line saying so, not "unreadable"
    except Exception as e:  # truncated zip, not a pickle at all, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_one_line(e)})") from None
    return data


def read_fair_esm(path: str, data) -> tuple[ESM2Config, dict]:
    """fair-esm .pt contents (torch_file) -> (config, {fair-esm key without prefix: tensor})."""
    if not (isinstance(data, dict) and isinstance(data.get("model"), dict)
            and isinstance(data.get("cfg"), dict) and "model" in data["cfg"]):
        raise CheckpointError(f"{path}: not a fair-esm ESM-2 checkpoint (expected keys 'model' and 'cfg.model') "
                              "nor an EvolutionaryScale ESM C state dict")
    cfg = data["cfg"]["model"]
    cfg = vars(cfg) if isinstance(cfg, argparse.Namespace) else cfg
    fields = ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads")
    missing = [k for k in fields if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise CheckpointError(f"{path}: cfg.model lacks {', '.join(missing)}")
    try:
        config = ESM2Config(
            num_layers=cfg["encoder_layers"], d_model=cfg["encoder_embed_dim"],
            num_heads=cfg["encoder_attention_heads"], ffn_dim=4 * cfg["encoder_embed_dim"],
            token_dropout=bool(cfg.get("token_dropout", True)))
    except Exception as e:
        raise CheckpointError(f"{path}: cfg.model: {_one_line(e)}") from None
    for k, v in data["model"].items():  # a crafted file may hold anything the unpickler allows
        if not isinstance(k, str):
            raise CheckpointError(f"{path}: model key {k!r} is of type {type(k).__name__}, not a string")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: model entry {k!r} is of type {type(v).__name__}, not a tensor")
    tensors = {FAIR_PREFIX.sub("", k): v for k, v in data["model"].items()}
    return config, tensors


def download_from_hub(repo_id: str) -> str:
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            f"{repo_id}: not a local file or directory; to download it from the HuggingFace hub "
            "install the hub extra (pip install 'esm2lite[hub]')") from None
    try:
        return huggingface_hub.snapshot_download(
            repo_id=repo_id, allow_patterns=["config.json", "*.safetensors", "model.safetensors.index.json"])
    except Exception as e:
        raise CheckpointError(f"{repo_id}: download from the HuggingFace hub failed ({_one_line(e)})") from None


# ---------------------------------------------------------------- mapping and building


def check_keys(expected: dict, got: dict, unexpected: list, source: str) -> None:
    """One error listing every missing, unexpected and mis-shaped key (expected: name -> tensor)."""
    problems = key_mismatch({k: t.shape for k, t in expected.items()}, got, unexpected)
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the config ({problems})")


def architecture(config: ESM2Config | ESMCConfig):
    """The model class a config describes: ESM2 or ESMC."""
    return ESMC if isinstance(config, ESMCConfig) else ESM2


def build_model(config: ESM2Config | ESMCConfig, state: dict, unexpected: list, source: str, dtype,
                device) -> ESM2 | ESMC:
    with torch.device("meta"):
        model = architecture(config)(config, source=source)
    check_keys(model.state_dict(), state, unexpected, source)
    for k in list(state):  # convert one tensor at a time: never two full copies
        keep_fp32 = k.endswith("inv_freq")  # rotary stays fp32 whatever the model dtype
        state[k] = state[k].to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


class Loaded(NamedTuple):
    config: ESM2Config  # lm_head False when the file holds none
    state: dict  # {our key: tensor}
    unexpected: list  # the file's keys that no rule maps (an error)
    ignored: list  # the file's task-head keys (reported, not loaded)


def read_esmc_pth(path: str, data: dict) -> Loaded:
    """EvolutionaryScale's ESMC .pth state dict -> Loaded (sizes from the tensors: the file has no config)."""
    for k, v in data.items():  # a crafted file may hold anything the unpickler allows
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor under a name")
    state, unexpected, sizes = esmc.from_evolutionaryscale(data)
    try:
        config = ESMCConfig(**sizes, lm_head=has_lm_head(state))
    except Esm2liteError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return Loaded(config, state, unexpected, [])


def read_checkpoint(path: str) -> Loaded:
    """Any supported path -> its tensors under our names."""
    path = str(path)
    if os.path.isdir(path):
        hf_config, config, tensors = read_hf_dir(path)
        if isinstance(config, ESMCConfig):
            state, unexpected, ignored = esmc.to_esmc_keys(tensors)
            return Loaded(dataclasses.replace(config, lm_head=has_lm_head(state)), state, unexpected, ignored)
        tensors, ignored = split_task_heads(tensors, HF_TASK_HEADS)
        tensors, origin = normalize_hf(tensors, hf_config, config.num_heads, config.head_dim, path)
        state, unexpected = to_esm2lite_keys(tensors, HF_NAMES, HF_IGNORED, HF_TIED, config.num_layers, path)
        unexpected = [origin.get(k, k) for k in unexpected]
    elif os.path.isfile(path):
        if path.endswith(".safetensors"):
            raise CheckpointError(f"{path}: give the directory that holds config.json, not the safetensors file")
        data = torch_file(path)
        if esmc.is_evolutionaryscale(data):
            return read_esmc_pth(path, data)
        config, tensors = read_fair_esm(path, data)
        tensors, ignored = split_task_heads(tensors, FAIR_TASK_HEADS)
        state, unexpected = to_esm2lite_keys(tensors, FAIR_NAMES, FAIR_IGNORED, FAIR_TIED, config.num_layers, path)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith((".", "/")):
        return read_checkpoint(download_from_hub(path))
    else:
        raise CheckpointError(f"{path}: no such file or directory")
    return Loaded(dataclasses.replace(config, lm_head=has_lm_head(state)), state, unexpected, ignored)


def report_ignored(source: str, ignored: list) -> None:
    """One line on stdout, as the CLIs' other notices (stderr is for errors), rank 0 only under
    torchrun, written at once: the task-head weights that were not loaded, but for the contact head
    and pooler every hub file carries (EXPECTED_HEADS)."""
    ignored = [k for k in ignored if not EXPECTED_HEADS.match(k)]
    if ignored and os.environ.get("RANK", "0") == "0":
        shown = ", ".join(ignored[:8]) + (f", ... ({len(ignored) - 8} more)" if len(ignored) > 8 else "")
        sys.stdout.write(f"warning: {source}: ignored {len(ignored)} task-head weights that are not part of "
                         f"the encoder: {shown}\n")
        sys.stdout.flush()


def load_pretrained(path: str, dtype=None, device=None) -> ESM2:
    """An HF directory (any layout above), a fair-esm .pt or a hub id -> ESM2 in eval mode."""
    return load_base(path, dtype, device, hash_weights=False)[0]


# ---------------------------------------------------------------- writing HF directories


def hf_state_dict(model: ESM2 | ESMC) -> dict:
    """Our state dict under HF names, as transformers saves them: EsmForMaskedLM's (per-layer
    inv_freq, as the hub files), or EsmModel's (no "esm." prefix) for a model without an LM head;
    ESM C: EsmcForMaskedLM's, or EsmcModel's (no "esmc.")."""
    table, prefix = (esmc.NAMES, "esmc.") if isinstance(model, ESMC) else (HF_NAMES, "esm.")
    out = {}
    for k, v in model.state_dict().items():
        name = rename(k, table, reverse=True)
        if name is None:
            raise ValueError(f"no HF name for {k}")
        out[name if model.config.lm_head else name.removeprefix(prefix)] = v.detach().to("cpu").contiguous()
    return out


def save_hf_dir(model: ESM2 | ESMC, out_dir: str, overwrite: bool = False) -> None:
    """Write an HF-layout directory (config, safetensors, tokenizer files) atomically: an
    EsmForMaskedLM directory, or an EsmModel one for a model without an LM head (ESM C: EsmcForMaskedLM
    / EsmcModel, with ESM-2's vocabulary files: the same 33 tokens at the same ids)."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        config = model.config.to_hf_config()
        config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        save_file(hf_state_dict(model), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(TOKENS) + "\n")
        with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"tokenizer_class": "EsmTokenizer", "model_max_length": 1026}, f, indent=2)
        with open(os.path.join(tmp, "special_tokens_map.json"), "w", encoding="utf-8") as f:
            json.dump({"cls_token": "<cls>", "eos_token": "<eos>", "mask_token": "<mask>",
                       "pad_token": "<pad>", "unk_token": "<unk>"}, f, indent=2)


# ---------------------------------------------------------------- identity of a base model


class WeightsHash(NamedTuple):
    """A base model's identity. `encoder`: the sha256 of its encoder weights, the LM head left out
    (adapters and heads never touch it, and the EsmModel and EsmForMaskedLM copies of one encoder
    must agree); what checkpoints record. `with_lm_head`: the same hash continued over the LM head,
    which checkpoints recorded before; still accepted, so older runs load."""

    encoder: str
    with_lm_head: str

    def matches(self, recorded: str) -> bool:
        return recorded in (self.encoder, self.with_lm_head)


def _hash_tensors(h, state: dict, keys: list) -> None:
    for key in keys:
        t = state[key].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())


def weights_hash(state: dict) -> WeightsHash:
    """Hash of base weights in a canonical form (our names in sorted order, each as "name:shape;"
    then its fp32 bytes), independent of the file layout and of the dtype the model is later run
    in. Adapter tensors are skipped."""
    import hashlib

    keys = sorted(k for k in state if "lora_" not in k)
    encoder = [k for k in keys if not k.startswith("lm_head.")]
    if keys[:len(encoder)] != encoder:  # lm_head.* sorts after embed_tokens, final_norm, layers
        raise ValueError("weights_hash: an encoder weight sorts after the LM head")
    h = hashlib.sha256()
    _hash_tensors(h, state, encoder)
    encoder_sha = h.hexdigest()  # hexdigest does not end the hash: it continues over the LM head
    _hash_tensors(h, state, keys[len(encoder):])
    return WeightsHash(encoder_sha, h.hexdigest())


def load_base(path: str, dtype=None, device=None, hash_weights: bool = True) -> tuple[ESM2, WeightsHash]:
    """load_pretrained plus the weights' sha256 (taken from the file's values, before any cast;
    empty with hash_weights=False)."""
    dtype, device = resolve_dtype(dtype), torch.device(device or "cpu")
    loaded = read_checkpoint(path)
    with torch.device("meta"):
        check_keys(architecture(loaded.config)(loaded.config).state_dict(), loaded.state, loaded.unexpected, str(path))
    sha = weights_hash(loaded.state) if hash_weights else WeightsHash("", "")
    model = build_model(loaded.config, loaded.state, loaded.unexpected, str(path), dtype, device)
    report_ignored(str(path), loaded.ignored)
    return model, sha


def random_base(name: str, seed: int, dtype=None, device=None) -> tuple[ESM2 | ESMC, WeightsHash]:
    """A randomly initialised architecture (training from scratch), reproducible from (name, seed):
    an ESM-2 size (esm2_t6_8M_UR50D, ...) or an ESM C one (esmc_300m, esmc_600m, esmc_6b)."""
    config = ESMCConfig.from_name(name) if name.split("/")[-1].lower().startswith("esmc") else ESM2Config.from_name(name)
    model = architecture(config)(config).init_weights(seed)
    sha = weights_hash(model.state_dict())
    return model.to(device=device or "cpu", dtype=resolve_dtype(dtype)), sha
