"""What a run trains: the base encoder (a pretrained or random ESM-2 / ESM C, or a fine-tuned run's
encoder), prepared by the mode (checkpoints/modes.py: which parameters train), with the task's head
(kept from a fine-tuned start when it fits: start.py); and the spec its checkpoints will carry."""

import os
from dataclasses import replace

import torch

from esm2lite.checkpoints.loading import finetuned_dir, load_start
from esm2lite.checkpoints.modes import MODE
from esm2lite.checkpoints.spec import BaseRef, CheckpointSpec
from esm2lite.errors import Esm2liteError
from esm2lite.model.lora import TARGETS, default_targets
from esm2lite.model.task_model import TaskModel
from esm2lite.tasks.labels import LabelSpace
from esm2lite.training import start
from esm2lite.training.config import TrainConfig
from esm2lite.weights.pretrained import load_base


def build_model(cfg: TrainConfig, labels: LabelSpace, device) -> tuple[TaskModel, CheckpointSpec]:
    """The base encoder with the mode's trainable parameters and a fresh head, seeded by cfg.seed;
    and the spec its checkpoints will carry."""
    torch.manual_seed(cfg.seed)
    path = finetuned_dir(cfg.checkpoint)  # a fine-tuned model (a run directory: its best/), or None
    base = BaseRef(path=path or cfg.checkpoint) if cfg.checkpoint else BaseRef(name=cfg.model, seed=cfg.seed)
    if cfg.model:
        print(f"WARNING: --model {cfg.model}: the encoder is RANDOMLY INITIALISED, not pretrained. "
              "Pass --checkpoint for pretrained ESM-2 weights.", flush=True)
    begun = load_start(path, device=device) if path else None  # (that TaskModel, its identity)
    encoder = base.load(device=device, read=(lambda *_: (begun[0].encoder, begun[1])) if begun else load_base)
    if cfg.checkpoint and os.path.exists(base.path):  # loaded as typed: messages name the path the user gave
        base.path = os.path.abspath(base.path)  # recorded absolute: found again from any directory
    mode = MODE[cfg.mode]
    lora = cfg.lora if cfg.lora.targets != TARGETS else replace(cfg.lora, targets=default_targets(encoder))  # ESM C: its own
    try:
        mode.prepare(encoder, lora)
    except ValueError as e:  # --lora-layers beyond the model's depth, --lora-targets of the other family
        layers = "LoRAConfig.layers" in str(e)
        raise Esm2liteError(str(e).replace("LoRAConfig.layers", "--lora-layers").replace("LoRAConfig.targets",
                                                                                         "--lora-targets")
                            + (" (layers count from 0 here; BioNeMo's layer_selection counts from 1)" if layers
                               else "")) from None
    encoder.activation_checkpointing = cfg.activation_checkpointing
    head = labels.task.head(encoder.config.d_model, labels.num_outputs, cfg.head_hidden, cfg.head_dropout)
    if begun:
        start.announce(cfg.checkpoint, path, start.take_head(begun[0], head, labels))
    spec = CheckpointSpec(cfg.mode, labels, head.config, lora if mode.uses_lora else None, encoder.config, base)
    return TaskModel(encoder, head.to(device), labels, frozen_encoder=mode.frozen_encoder), spec
