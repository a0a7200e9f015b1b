"""Reading a checkpoint as a model: the task model it describes (load_model), what a command that
reads one must never write into (reader_inputs), and a fine-tuned checkpoint as the base of another
run (train.py --checkpoint RUN/best).

A run started from a fine-tuned model records that checkpoint as its base; loading the run's own
checkpoints then loads that one again (read_base), recursively: a run started from a run started from
a run is fine. The base is the fine-tuned encoder with its adapters merged in (lora), its own weights
(full), or its base unchanged (head).

Identity: a merged encoder is computed (W + s * B @ A) and its rounding may differ from one CPU to
another, so its hash is not taken. A fine-tuned base is known by what is stored: the checkpoint's
settings (all but where its own base lies) and the sha256 of each tensor file, which SHA256SUMS
records and every load verifies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

from esm2lite.checkpoints import checkpoint_dir as ckpt_dir
from esm2lite.checkpoints.modes import MODE
from esm2lite.checkpoints.run_dir import OWN, holds_a_run, is_run_config
from esm2lite.errors import CheckpointError, Esm2liteError
from esm2lite.files.paths import Input
from esm2lite.files.textfiles import read_json
from esm2lite.model.esm2 import ESM2
from esm2lite.model.task_model import TaskModel
from esm2lite.tasks import head_from_config
from esm2lite.weights.export import merged_encoder
from esm2lite.weights.pretrained import WeightsHash, load_base


def load_model(path: str, dtype=None, device=None, base_path: str | None = None, merge: bool = False) -> TaskModel:
    """Rebuild the task model a checkpoint holds (eval mode); base_path: where its base model is now.
    merge: ready for prediction (LoRA adapters merged into the weights; the numbers are the same)."""
    spec = ckpt_dir.read_spec(path)
    mode = MODE[spec.mode]
    tensors = ckpt_dir.read_tensors(path, mode.stored_shapes(spec))  # shapes from the verified config: bounded
    ckpt_dir.verify(path)
    if base_path:
        spec.base.path = base_path
    encoder = mode.load_encoder(spec, tensors[0], dtype, device, path, read_base)
    try:
        head = head_from_config(spec.head).to(device or "cpu")
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{os.path.join(path, ckpt_dir.CONFIG)}: bad head config ({e})") from None
    model = ckpt_dir.load_weights(TaskModel(encoder, head, spec.labels, mode.frozen_encoder), path, tensors=tensors)
    mode.for_inference(model.encoder, merge)
    return model.eval()


def finetuned_dir(path: str | None) -> str | None:
    """The esm2lite checkpoint directory `path` names (itself, or a run directory's best/), or None
    when it is a pretrained model (HF directory, fair-esm file, hub id)."""
    if not path or not os.path.isdir(path):
        return None
    if holds_a_run(path):
        best = os.path.join(path, "best")
        if not os.path.isdir(best):
            raise CheckpointError(f"{path}: this run has no best/ yet (it never evaluated or finished); "
                                  f"start from one of its step checkpoints, {os.path.join(path, 'checkpoints', 'step_N')}")
        return best
    config = os.path.join(path, ckpt_dir.CONFIG)
    try:
        fmt = read_json(config, CheckpointError, regular=True).get("format") if os.path.isfile(config) else None
    except (CheckpointError, AttributeError):
        return None  # not ours: read as a pretrained model, which names what is wrong with it
    return path if fmt == ckpt_dir.FORMAT else None


def read_base(path: str, dtype=None, device=None) -> tuple[ESM2, WeightsHash]:
    """BaseRef.load's reader: a pretrained model, or a fine-tuned esm2lite checkpoint's encoder."""
    finetuned = finetuned_dir(path)
    if finetuned is None:
        return load_base(path, dtype, device)
    model, identity = load_start(finetuned, dtype, device)
    return model.encoder, identity


def load_start(path: str, dtype=None, device=None) -> tuple[TaskModel, WeightsHash]:
    """The fine-tuned model in an esm2lite checkpoint, its encoder a plain ESM2 (adapters merged in),
    trainable as a pretrained base is; and its identity."""
    model = load_model(path, dtype, device)
    model.encoder = merged_encoder(model.encoder)  # plain linears: the new run adds its own adapters
    model.requires_grad_(True)  # the new run's mode freezes what it does not train
    identity = stored_identity(path)
    return model, WeightsHash(identity, identity)


def stored_identity(path: str) -> str:
    """sha256 of a checkpoint's settings (its base's location left out) and of its tensor files."""
    spec = ckpt_dir.read_spec(path).to_dict()
    spec["base"] = {k: v for k, v in spec["base"].items() if k != "path"}
    sums = ckpt_dir.read_sums(path)
    if sums is None:
        raise CheckpointError(f"{path}: written before checkpoints carried {ckpt_dir.SUMS}; it cannot be the start "
                              "of a new run (export it with esm2lite-export --merged and start from that)")
    tensors = {k: v for k, v in sums.items() if k == ckpt_dir.WEIGHTS or k.startswith(ckpt_dir.DIRNAME + "/")}
    return hashlib.sha256(json.dumps([spec, tensors], sort_keys=True).encode()).hexdigest()


def reader_inputs(run: str | None, checkpoint: str | None, base_path: str | None) -> list[Input]:
    """What a command that reads a run's best/ (--run) or a checkpoint must never write into: that
    checkpoint, the files of its run (--run, or the run that holds the checkpoint as best/ or
    checkpoints/step_N), and the base model (--base-path, else the one recorded)."""
    if not (run or checkpoint):
        return []
    ckpt, flag = (os.path.join(run, "best"), f"--run {run}") if run else (checkpoint, f"--checkpoint {checkpoint}")
    found = [Input(ckpt, f"the checkpoint this command reads ({flag})")]
    run = run or _run_holding(checkpoint)
    if run:
        found += [Input(os.path.join(run, name), f"a file of the run this command reads ({flag})") for name in OWN]
    if base_path:
        found.append(Input(base_path, f"the base model (--base-path {base_path})"))
    else:
        with contextlib.suppress(Esm2liteError):  # a damaged checkpoint is reported when it is loaded
            recorded = ckpt_dir.read_spec(ckpt).base.path
            found.append(Input(recorded, f"the base model of the checkpoint this command reads ({flag})"))
    return found


def _run_holding(checkpoint: str) -> str | None:
    """The run directory whose best/ or checkpoints/step_N `checkpoint` is, if it is one."""
    real = os.path.realpath(checkpoint)
    name, parent = os.path.basename(real), os.path.dirname(real)
    if name == "best":
        run = parent
    elif os.path.basename(parent) == "checkpoints":
        run = os.path.dirname(parent)
    else:
        return None
    with contextlib.suppress(Esm2liteError):
        if is_run_config(read_json(os.path.join(run, "config.json")), os.path.exists(os.path.join(run, "metrics.jsonl"))):
            return run
    return None
