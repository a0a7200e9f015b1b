"""ESM-2 weights in the layouts users already have, mapped onto esm2lite's names.

- HuggingFace directory: config.json + model.safetensors (or shards + index.json)
- fair-esm .pt: a pickle read with weights_only=True, argparse.Namespace the one allowed class
- hub id ("facebook/esm2_t33_650M_UR50D"), downloaded with huggingface_hub

Loading is strict (missing, unexpected and mis-shaped keys are one error) and keeps one
copy of the weights: the model is built on the meta device, then the loaded tensors are
assigned to it.
"""

import argparse
import json
import os
import pickle
import re
import zipfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import atomic_dir
from .config import ESM2Config
from .errors import CheckpointError
from .model import ESM2
from .tokenizer import TOKENS

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
HF_IGNORED = re.compile(
    r"^esm\.(embeddings\.position_embeddings\.weight|embeddings\.position_ids|contact_head\..*)$")
# transformers 5.x saves one inv_freq for all layers, under either of these names, and
# LayerNorm parameters under their legacy gamma/beta names.
HF_SHARED_INV_FREQ = ("esm.rotary_embeddings.inv_freq", "esm.encoder.layer.*.attention.self.rotary_embeddings.inv_freq")
HF_LEGACY_LN = re.compile(r"(LayerNorm|layer_norm|emb_layer_norm_after)\.(gamma|beta)$")
HF_TIED = "lm_head.decoder.weight"

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
FAIR_IGNORED = re.compile(r"^contact_head\..*$")
FAIR_TIED = "lm_head.weight"
FAIR_PREFIX = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")

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


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(f"^{pattern}$")


def rename(key: str, table, reverse: bool = False) -> str | None:
    """Map one key through a (theirs, ours) table; None when no rule matches."""
    for theirs, ours in table:
        src, dst = (ours, theirs) if reverse else (theirs, ours)
        m = _compile(src).match(key)
        if m:
            return dst.format(**m.groupdict())
    return None


# ---------------------------------------------------------------- reading files


def _read_safetensors(path: str) -> dict:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as e:  # safetensors raises its own error types for bad headers / sizes
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({_one_line(e)})") from None


def read_hf_dir(path: str) -> tuple[ESM2Config, dict]:
    """HF directory -> (config, {HF key: tensor})."""
    config = ESM2Config.from_json_file(os.path.join(path, "config.json"))
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({_one_line(e)})") from None
        for name in files:  # shards are plain file names inside the directory, nothing else
            if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
                raise CheckpointError(f"{index}: weight_map names {name!r}, not a file name in the directory")
        tensors = {}
        for name in files:
            shard = _read_safetensors(os.path.join(path, name))
            tensors.update(shard)
        return config, tensors
    if os.path.exists(single):
        return config, _read_safetensors(single)
    if os.path.exists(os.path.join(path, "pytorch_model.bin")):
        raise CheckpointError(
            f"{path}: has pytorch_model.bin but no model.safetensors; esm2lite reads safetensors "
            "only (re-save with transformers' save_pretrained)")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def read_fair_esm(path: str) -> tuple[ESM2Config, dict]:
    """fair-esm .pt -> (config, {fair-esm key without prefix: tensor}). Never runs pickled code."""
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
    except Exception as e:  # truncated zip, not a pickle at all, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_one_line(e)})") from None
    if not (isinstance(data, dict) and isinstance(data.get("model"), dict)
            and isinstance(data.get("cfg"), dict) and "model" in data["cfg"]):
        raise CheckpointError(f"{path}: not a fair-esm ESM-2 checkpoint (expected keys 'model' and 'cfg.model')")
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


def to_esm2lite_keys(tensors: dict, table, ignored: re.Pattern, tied: str, num_layers: int,
                     source: str) -> tuple[dict, list]:
    """{their key: tensor} -> ({our key: tensor}, [unexpected keys])."""
    ours, unexpected = {}, []
    shared = [tensors.pop(k) for k in HF_SHARED_INV_FREQ if k in tensors]
    tied_weight = tensors.pop(tied, None)
    for key, value in tensors.items():
        key = HF_LEGACY_LN.sub(lambda m: f"{m.group(1)}.{'weight' if m.group(2) == 'gamma' else 'bias'}", key)
        name = rename(key, table)
        if name is not None:
            ours[name] = value
        elif not ignored.match(key):
            unexpected.append(key)
    if shared:
        for i in range(num_layers):
            ours.setdefault(f"layers.{i}.attn.inv_freq", shared[0].clone())  # one buffer per layer
    if tied_weight is not None and "embed_tokens.weight" in ours:
        if not torch.equal(tied_weight, ours["embed_tokens.weight"]):
            raise CheckpointError(f"{source}: {tied} differs from the token embedding; ESM-2's LM head is tied")
    return ours, unexpected


def check_keys(expected: dict, got: dict, unexpected: list, source: str) -> None:
    """One error listing every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(got))
    shapes = [f"{k} file {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(got)) if tuple(got[k].shape) != tuple(expected[k].shape)]
    problems = []
    for what, items in (("missing keys", missing), ("unexpected keys", sorted(unexpected)),
                        ("shape mismatches", shapes)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items) - 8} more)" if len(items) > 8 else "")
            problems.append(f"{len(items)} {what}: {shown}")
    if problems:
        raise CheckpointError(
            f"{source}: weights do not fit the config ({'; '.join(problems)})")


def build_model(config: ESM2Config, state: dict, unexpected: list, source: str, dtype, device) -> ESM2:
    with torch.device("meta"):
        model = ESM2(config)
    check_keys(model.state_dict(), state, unexpected, source)
    for k in list(state):  # convert one tensor at a time: never two full copies
        keep_fp32 = k.endswith("inv_freq")  # rotary stays fp32 whatever the model dtype
        state[k] = state[k].to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def read_checkpoint(path: str) -> tuple[ESM2Config, dict, list]:
    """Any supported path -> (config, {our key: tensor}, [unexpected keys])."""
    path = str(path)
    if os.path.isdir(path):
        config, tensors = read_hf_dir(path)
        return config, *to_esm2lite_keys(tensors, HF_NAMES, HF_IGNORED, HF_TIED, config.num_layers, path)
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            raise CheckpointError(f"{path}: give the directory that holds config.json, not the safetensors file")
        config, tensors = read_fair_esm(path)
        return config, *to_esm2lite_keys(tensors, FAIR_NAMES, FAIR_IGNORED, FAIR_TIED, config.num_layers, path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith((".", "/")):
        return read_checkpoint(download_from_hub(path))
    raise CheckpointError(f"{path}: no such file or directory")


def load_pretrained(path: str, dtype=None, device=None) -> ESM2:
    dtype, device = resolve_dtype(dtype), torch.device(device or "cpu")
    config, state, unexpected = read_checkpoint(path)
    return build_model(config, state, unexpected, str(path), dtype, device)


# ---------------------------------------------------------------- writing HF directories


def hf_state_dict(model: ESM2) -> dict:
    """Our state dict under HF EsmForMaskedLM names (per-layer inv_freq, as the hub files)."""
    out = {}
    for k, v in model.state_dict().items():
        name = rename(k, HF_NAMES, reverse=True)
        if name is None:
            raise ValueError(f"no HF name for {k}")
        out[name] = v.detach().to("cpu").contiguous()
    return out


def save_hf_dir(model: ESM2, out_dir: str, overwrite: bool = False) -> None:
    """Write an HF-layout directory (config, safetensors, tokenizer files) atomically."""
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


def weights_sha256(state: dict) -> str:
    """Hash of base weights in a canonical form (our names, fp32 bytes), independent of the
    file layout and of the dtype the model is later run in. Adapter tensors are skipped."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(state):
        if "lora_" in key:
            continue
        t = state[key].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def load_base(path: str, dtype=None, device=None) -> tuple[ESM2, str]:
    """load_pretrained plus the weights' sha256 (taken from the file's values, before any cast)."""
    dtype, device = resolve_dtype(dtype), torch.device(device or "cpu")
    config, state, unexpected = read_checkpoint(path)
    with torch.device("meta"):
        check_keys(ESM2(config).state_dict(), state, unexpected, str(path))
    sha = weights_sha256(state)
    return build_model(config, state, unexpected, str(path), dtype, device), sha


def random_base(name: str, seed: int, dtype=None, device=None) -> tuple[ESM2, str]:
    """A randomly initialised architecture (training from scratch), reproducible from (name, seed)."""
    model = ESM2(ESM2Config.from_name(name)).init_weights(seed)
    sha = weights_sha256(model.state_dict())
    return model.to(device=device or "cpu", dtype=resolve_dtype(dtype)), sha
