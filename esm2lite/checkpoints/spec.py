"""What a fine-tuning checkpoint is: the fields of its config.json, checked before anything is
built or allocated, and the base model its weights apply to."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from esm2lite.weights.pretrained import WeightsHash, load_base, random_base
from esm2lite.model.config import ESM2Config
from esm2lite.model.esmc import ESMCConfig
from esm2lite.checkpoints.modes import MODE
from esm2lite.errors import CheckpointError, Esm2liteError, quoted
from esm2lite.tasks.labels import LabelSpace
from esm2lite.model.lora import LoRAConfig
from esm2lite.model.esm2 import ESM2

FORMAT = "esm2lite-finetuned"
FIELDS = ("mode", "labels", "head", "lora", "model_config", "base")
HEAD_LIMITS = {"hidden": 65536, "num_outputs": 100_000}  # larger is a corrupt file, not a model


@dataclass
class BaseRef:
    """Where the encoder's starting weights come from, and what they are: the identity adapters and
    heads are trained against, compared whenever the base is loaded again.

    - weights: the sha256 of the encoder's weights only, so the same encoder saved with or without
      its LM head (EsmForMaskedLM / EsmModel) is the same base. Checkpoints written before recorded a
      hash that covers the LM head; it is still accepted (checkpoint.WeightsHash).
    - config: the encoder's ESM2Config but lm_head, the checkpoint's model_config. The same weights
      with another token_dropout or layer_norm_eps in their config.json compute other numbers. Every
      checkpoint has recorded model_config, so checkpoints written before this check are checked too.
    """

    path: str | None = None  # pretrained checkpoint (HF dir, .pt, hub id)
    name: str | None = None  # or: architecture name, randomly initialised from seed
    seed: int = 0
    sha256: str = ""
    config: ESM2Config | None = None  # the encoder config trained with (stored as the spec's model_config)
    weights: WeightsHash | None = field(default=None, repr=False, compare=False)  # set by load()

    @property
    def where(self) -> str:
        return self.path or f"random {self.name} seed {self.seed}"

    def load(self, dtype=None, device=None, read=load_base) -> ESM2:
        """The base encoder; CheckpointError when its weights or config are not the recorded ones.
        read(path, dtype, device) -> (ESM2, WeightsHash): load_base reads a pretrained model;
        checkpoints/loading.read_base also a fine-tuned esm2lite checkpoint (the base of a run
        started from one)."""
        if self.sha256 and self.path and os.path.isabs(self.path) and not os.path.exists(self.path):
            raise CheckpointError(f"{self.path}: the base model this checkpoint was trained on is not there (moved or "
                                  "deleted?); give its new location with --base-path")
        model, sha = read(self.path, dtype, device) if self.path else random_base(self.name, self.seed, dtype, device)
        differs = self.weights_difference(sha)
        if differs:
            raise CheckpointError(f"{self.where}: {differs}; adapters are made for another base model")
        differs = self.config_difference(model.config)
        if differs:
            raise CheckpointError(f"{self.where}: {differs}; the trained weights would compute other numbers with it")
        self.sha256, self.config, self.weights = self.sha256 or sha.encoder, model.config, sha
        return model

    def weights_difference(self, sha: WeightsHash, recorded: str = "the checkpoint was trained on") -> str | None:
        """How a base's weights (their hashes) differ from the recorded ones, or None; `recorded`
        says where the record comes from."""
        if self.sha256 and not sha.matches(self.sha256):
            return (f"base model encoder weights differ from the ones {recorded} "
                    f"(sha256 {sha.encoder[:12]}... vs {self.sha256[:12]}...)")
        return None

    def config_difference(self, config: ESM2Config, recorded: str = "the checkpoint was trained on") -> str | None:
        """How a base's config differs from the recorded one, field by field, or None."""
        changed = config_changes(self.config, config) if self.config is not None else []
        if changed:
            shown = "; ".join(f"{k} is {now!r}, was {was!r}" for k, was, now in changed)
            return f"base model config differs from the one {recorded} ({shown})"
        return None

    def to_dict(self) -> dict:
        return {"path": self.path, "name": self.name, "seed": self.seed, "sha256": self.sha256}


def config_identity(config: ESM2Config) -> dict:
    """The fields of an encoder config that change what it computes: all but lm_head (an encoder
    saved with or without its LM head is the same base)."""
    return {k: v for k, v in config.to_dict().items() if k != "lm_head"}


def config_changes(was: ESM2Config, now: ESM2Config) -> list[tuple]:
    """(field, value in `was`, value in `now`) for every field of config_identity that differs."""
    a, b = config_identity(was), config_identity(now)
    return [(k, a[k], b.get(k)) for k in a if a[k] != b.get(k)]


@dataclass
class CheckpointSpec:
    """A checkpoint's config.json: mode, label space, head and LoRA configs, encoder architecture
    and base model."""

    mode: str
    labels: LabelSpace
    head: dict  # heads.head_from_config(head) rebuilds the head
    lora: LoRAConfig | None
    model_config: ESM2Config
    base: BaseRef

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "mode": self.mode, "task": self.labels.task.name,
                "labels": self.labels.to_dict(), "head": self.head,
                "lora": self.lora.to_dict() if self.lora else None,
                "model_config": self.model_config.to_dict(), "base": self.base.to_dict()}

    @classmethod
    def from_dict(cls, cfg, source: str) -> "CheckpointSpec":
        """Every field checked (sizes included) before anything is built; CheckpointError names `source`."""
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            raise CheckpointError(f"{source}: not an esm2lite fine-tuning checkpoint (format field missing)")
        missing = [k for k in FIELDS if k not in cfg]
        if missing:
            raise CheckpointError(f"{source}: missing field(s) {', '.join(missing)}")
        try:
            return cls._checked(cfg)
        except (Esm2liteError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{source}: {' '.join(str(e).split())[:300]}") from None

    @classmethod
    def _checked(cls, cfg: dict) -> "CheckpointSpec":
        if cfg["mode"] not in MODE:
            raise ValueError(f"field mode must be one of {', '.join(MODE)}")
        fields = dict(cfg["model_config"])
        family = {"esm2": ESM2Config, "esmc": ESMCConfig}.get(fields.pop("family", "esm2"))
        if family is None:
            raise ValueError("field model_config.family must be esm2 or esmc")
        model = family(**fields)  # checks sizes (parameter budget) itself
        head = cfg["head"]
        for key, limit in HEAD_LIMITS.items():
            value = head.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
                raise ValueError(f"field head.{key} must be an integer in 1..{limit}, got {quoted(value)}")
        if head.get("d_model") != model.d_model:
            raise ValueError(f"field head.d_model {quoted(head.get('d_model'))} does not match "
                             f"model_config.d_model {model.d_model}")
        labels = LabelSpace.from_dict(cfg["labels"])
        if labels.num_outputs != head["num_outputs"]:
            raise ValueError(f"field labels gives {labels.num_outputs} outputs but head.num_outputs is "
                             f"{head['num_outputs']}")
        base = cfg["base"]
        missing = [k for k in ("path", "name", "seed", "sha256") if k not in base]
        if missing:
            raise ValueError(f"field base lacks {', '.join(missing)}")
        if not (base["path"] or base["name"]):
            raise ValueError("field base names neither a path nor an architecture")
        lora = LoRAConfig.from_dict(cfg["lora"]) if cfg["lora"] is not None else None
        recorded = BaseRef(**{k: base[k] for k in ("path", "name", "seed", "sha256")}, config=model)
        return cls(cfg["mode"], labels, head, lora, model, recorded)
