"""A fine-tuned model: an ESM-2 encoder plus a task head, and how it lives on disk.

A checkpoint directory (written atomically) holds
  model.safetensors  lora and head modes: the trained tensors, "head.*" and (lora) the adapters
                     "encoder.*.lora_a/lora_b"; small, so gathered and written by rank 0
  dcp/               full mode instead: "encoder.*" and "head.*" as a torch.distributed.checkpoint,
                     every rank writing its own shards (esm2lite.sharded)
  config.json        mode, task, labels, head and LoRA configs, and the base model: its path
                     (or architecture + seed when trained from scratch) and the sha256 of its
                     weights, checked when the adapters are loaded onto it again.
"""

import contextlib
import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from .atomic import atomic_dir
from .checkpoint import build_model, check_keys, load_base, random_base, resolve_dtype
from .config import ESM2Config
from .data import LabelSpace, collate, make_batches
from .errors import CheckpointError, Esm2liteError
from .heads import head_from_config
from .distributed import Dist, barrier, copy_into, gather
from .lora import LoRAConfig, apply_lora, lora_state_dict
from .model import ESM2
from .sharded import has_sharded, load_sharded, read_sharded, save_sharded

FORMAT = "esm2lite-finetuned"
MODES = ("lora", "full", "head")


@dataclass
class BaseRef:
    """Where the encoder's starting weights come from."""

    path: str | None = None  # pretrained checkpoint (HF dir, .pt, hub id)
    name: str | None = None  # or: architecture name, randomly initialised from seed
    seed: int = 0
    sha256: str = ""

    def load(self, dtype=None, device=None, verify: bool = True) -> ESM2:
        model, sha = load_base(self.path, dtype, device) if self.path else random_base(self.name, self.seed, dtype, device)
        if verify and self.sha256 and sha != self.sha256:
            where = self.path or f"random {self.name} seed {self.seed}"
            raise CheckpointError(
                f"{where}: base model weights differ from the ones the checkpoint was trained on "
                f"(sha256 {sha[:12]}... vs {self.sha256[:12]}...); adapters are made for another base model")
        self.sha256 = sha
        return model


class FineTuned(nn.Module):
    def __init__(self, encoder: ESM2, head: nn.Module, labels: LabelSpace, mode: str, base: BaseRef,
                 lora: LoRAConfig | None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.encoder, self.head, self.labels = encoder, head, labels
        self.mode, self.base, self.lora = mode, base, lora

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: [B, T]
        with torch.no_grad() if self.mode == "head" else contextlib.nullcontext():  # frozen: no autograd
            hidden = self.encoder(tokens, logits=False)["last_hidden_state"]  # [B, T, d]
        return self.head(hidden, tokens)  # [B, n_outputs] or [B, T, n_classes]

    # ------------------------------------------------------------ state

    def trained_state(self) -> dict:
        """The tensors this mode trains (and so must save), under "encoder."/"head." prefixes."""
        state = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        if self.mode == "lora":
            state.update({f"encoder.{k}": v for k, v in lora_state_dict(self.encoder).items()})
        elif self.mode == "full":
            state.update({f"encoder.{k}": v for k, v in self.encoder.state_dict().items()})
        return state

    def config_dict(self) -> dict:
        return {
            "format": FORMAT, "version": 1, "mode": self.mode, "task": self.labels.task,
            "labels": self.labels.to_dict(), "head": self.head.config,
            "lora": self.lora.to_dict() if self.lora else None,
            "model_config": self.encoder.config.to_dict(),
            "base": {"path": self.base.path, "name": self.base.name, "seed": self.base.seed,
                     "sha256": self.base.sha256},
        }

    def save(self, out_dir: str, tensors: dict | None = None, extra=None, d: Dist | None = None,
             optimizer=None) -> None:
        """Write the checkpoint directory atomically. Collective under torchrun: in full mode every
        rank writes its shards (and the optimizer's, when given); otherwise rank 0 writes `tensors`,
        the trained state already gathered from the FSDP shards (own state_dict when None).
        extra(tmp_dir) may add files to it (rank 0)."""
        d = d or Dist()
        with atomic_dir(out_dir, overwrite=True) if d.main else contextlib.nullcontext() as tmp:
            tmp = gather(d, tmp)[0]  # rank 0's temporary directory, for everyone
            if self.mode == "full":
                save_sharded(tmp, self, optimizer)
            if d.main:
                if self.mode != "full":
                    tensors = self.trained_state() if tensors is None else {k: tensors[k] for k in self.trained_state()}
                    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
                    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": FORMAT})
                with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                    json.dump(self.config_dict(), f, indent=2)
                if extra is not None:
                    extra(tmp)
            barrier(d)  # every shard is on disk before rank 0 renames the directory into place

    def load_trained(self, ckpt_dir: str, tensors: tuple[dict, dict] | None = None, optimizer=None) -> "FineTuned":
        """Copy a checkpoint's trained tensors into this model, plain or FSDP-sharded, by name.
        A full-mode (dcp/) checkpoint is read shard by shard, with the optimizer's state too
        when one is given (resuming); otherwise `tensors` (read_tensors(ckpt_dir) unless given)."""
        if tensors is None and self.mode == "full" and has_sharded(ckpt_dir):
            load_sharded(ckpt_dir, self, optimizer)
            return self
        encoder_state, head_state = tensors or read_tensors(ckpt_dir)
        got = {**{f"encoder.{k}": v for k, v in encoder_state.items()}, **{f"head.{k}": v for k, v in head_state.items()}}
        targets = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        expected = set(self.trained_state())
        check_keys({k: targets[k] for k in expected}, got, sorted(set(got) - expected),
                   os.path.join(ckpt_dir, "model.safetensors"))
        for k in sorted(expected):  # the same order on every rank: sharded copies are collective
            if targets[k].data_ptr() != got[k].data_ptr():  # full-mode loads already hold these
                copy_into(targets[k], got[k])
        return self

    @classmethod
    def load(cls, ckpt_dir: str, dtype=None, device=None, base_path: str | None = None) -> "FineTuned":
        """Rebuild from a checkpoint directory; base_path overrides where the base model is found."""
        cfg = read_config(ckpt_dir)
        tensors = read_tensors(ckpt_dir, expected_full_state(cfg) if cfg["mode"] == "full" else None)
        encoder_state = tensors[0]
        b = cfg["base"]
        base = BaseRef(path=base_path or b["path"], name=b["name"], seed=b["seed"], sha256=b["sha256"])
        lora = LoRAConfig.from_dict(cfg["lora"]) if cfg["lora"] else None
        if cfg["mode"] == "full":
            config = ESM2Config(**cfg["model_config"])
            encoder = build_model(config, encoder_state, [], ckpt_dir, resolve_dtype(dtype), torch.device(device or "cpu"))
        else:
            encoder = base.load(dtype, device)
            if cfg["mode"] == "lora":
                apply_lora(encoder, lora)
        try:
            head = head_from_config(cfg["head"]).to(device or "cpu")
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{os.path.join(ckpt_dir, 'config.json')}: bad head config ({e})") from None
        model = cls(encoder, head, LabelSpace.from_dict(cfg["labels"]), cfg["mode"], base, lora)
        return model.load_trained(ckpt_dir, tensors).eval()


def expected_full_state(cfg: dict) -> dict:
    """{"encoder.*"/"head.*": meta tensor} that a full fine-tune with this (checked) config holds."""
    with torch.device("meta"):
        encoder, head = ESM2(ESM2Config(**cfg["model_config"])), head_from_config(cfg["head"])
    return {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
            **{f"head.{k}": v for k, v in head.state_dict().items()}}


def read_tensors(ckpt_dir: str, expected: dict | None = None) -> tuple[dict, dict]:
    """model.safetensors (or a full fine-tune's dcp/) -> ({encoder key: tensor}, {head key: tensor}).
    expected: the shapes a dcp/ checkpoint must hold, checked before anything is allocated."""
    path = os.path.join(ckpt_dir, "model.safetensors")
    try:
        tensors = read_sharded(ckpt_dir, expected) if has_sharded(ckpt_dir) else load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({' '.join(str(e).split())[:200]})") from None
    encoder = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
    head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    return encoder, head


def read_config(ckpt_dir: str) -> dict:
    """config.json of a checkpoint, every field checked before anything is built or allocated."""
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: checkpoint directory not found")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found (not an esm2lite checkpoint directory?)") from None
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an esm2lite fine-tuning checkpoint (format field missing)")
    missing = [k for k in ("mode", "labels", "head", "lora", "model_config", "base") if k not in cfg]
    if missing:
        raise CheckpointError(f"{path}: missing field(s) {', '.join(missing)}")
    try:
        check_config(cfg)
    except (Esm2liteError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path}: {' '.join(str(e).split())[:300]}") from None
    return cfg


def check_config(cfg: dict) -> None:
    """Raise on any field that is malformed or asks for absurd sizes."""
    if cfg["mode"] not in MODES:
        raise ValueError(f"field mode must be one of {', '.join(MODES)}")
    model = ESM2Config(**cfg["model_config"])  # checks sizes (parameter budget) itself
    head = cfg["head"]
    for key, limit in (("hidden", 65536), ("num_outputs", 100_000)):
        value = head.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise ValueError(f"field head.{key} must be an integer in 1..{limit}, got {value!r}")
    if head.get("d_model") != model.d_model:
        raise ValueError(f"field head.d_model {head.get('d_model')!r} does not match model_config.d_model {model.d_model}")
    if cfg["lora"] is not None:
        LoRAConfig.from_dict(cfg["lora"])
    labels = LabelSpace.from_dict(cfg["labels"])
    if labels.num_outputs != head["num_outputs"]:
        raise ValueError(f"field labels gives {labels.num_outputs} outputs but head.num_outputs is {head['num_outputs']}")
    base = cfg["base"]
    missing = [k for k in ("path", "name", "seed", "sha256") if k not in base]
    if missing:
        raise ValueError(f"field base lacks {', '.join(missing)}")
    if not (base["path"] or base["name"]):
        raise ValueError("field base names neither a path nor an architecture")


def amp_dtype_for(precision: str, device: torch.device):
    """"auto": bf16 autocast on GPU, fp32 on CPU; "bf16"/"fp16"/"fp32" as asked."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return None if precision == "fp32" else resolve_dtype(precision)


@torch.no_grad()
def run_batches(model: FineTuned, records, batch_tokens: int, precision: str = "auto", desc: str | None = None,
                with_loss: bool = False, d: Dist | None = None):
    """Forward every record once, in length-bucketed batches (split across ranks under torchrun).

    Returns (outputs, loss): outputs is a list of per-record fp32 CPU tensors in INPUT ORDER
    ([n_outputs], or [T_i, n_classes] for per-residue tasks, T_i = that record's tokens);
    loss is the record-weighted mean loss when with_loss (records need targets)."""
    d = d or Dist()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    amp = amp_dtype_for(precision, device)
    batches = make_batches([len(r.tokens) for r in records], batch_tokens, shuffle=False)
    mine = batches[d.rank::d.world]
    rounds = -(-len(batches) // d.world)  # every rank runs as many forwards: FSDP gathers are collective
    local = []
    for j in tqdm(range(rounds), desc=desc, disable=desc is None or not d.main, leave=False):
        idx = mine[j] if j < len(mine) else batches[0]  # a spare rank repeats a batch and drops it
        batch = collate([records[i] for i in idx], model.labels if with_loss else None)
        tokens = batch["tokens"].to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(tokens)
        out = out.float()
        if j >= len(mine):
            continue
        loss = float(model.head.loss(out, batch["target"].to(device))) * len(idx) if with_loss else 0.0
        rows = [(out[row, : len(records[i].tokens)] if out.dim() == 3 else out[row]).cpu() for row, i in enumerate(idx)]
        local.append((idx, rows, loss))
    outputs, loss_sum = [None] * len(records), 0.0
    for part in gather(d, local):
        for idx, rows, loss in part:
            loss_sum += loss
            for i, row in zip(idx, rows):
                outputs[i] = row
    model.train(was_training)
    return outputs, (loss_sum / len(records) if with_loss else None)
