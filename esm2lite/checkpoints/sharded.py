"""Full fine-tunes on disk: torch.distributed.checkpoint (DCP), written and read shard by shard.

A full fine-tune of a 3B/15B model under FSDP is too big to gather onto one rank, so its
checkpoint is a DCP directory: every rank writes the shards it holds, and a reader on any
number of ranks (or one process, or none: plain Python) gets the pieces it needs. Keys are
"model.<parameter name>" and, in step checkpoints, "optim.state.<parameter name>.<exp_avg|...>".

DCP's default format keeps its index in a pickle (`.metadata`, read with pickle.load): a
checkpoint directory from elsewhere could run code. So the shards go through DCP's safetensors
storage instead: one safetensors file per rank, each shard's offsets in the file's JSON header,
nothing pickled. AdamW's hyperparameters are not stored (the run's config rebuilds them); only
its tensors are.

Under torchrun on several nodes the run directory must be on a filesystem every node sees.
"""

import contextlib
import os
import warnings

import torch

from esm2lite.weights.pretrained import check_keys
from esm2lite.errors import CheckpointError

DIRNAME = "dcp"  # inside a checkpoint directory


def has_sharded(ckpt_dir: str) -> bool:
    return os.path.isdir(os.path.join(ckpt_dir, DIRNAME))


@contextlib.contextmanager
def _quiet():
    """DCP warns that it runs 'in a single process' when no process group exists: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


def _states(model, optimizer) -> tuple[dict, list | None]:
    """This rank's view of the tensors to store (DTensor shards under FSDP2, plain tensors
    otherwise), and the optimizer's param_groups by parameter name (not stored)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state, groups = {"model": get_model_state_dict(model)}, None
    if optimizer is not None:
        optim = get_optimizer_state_dict(model, optimizer)
        state["optim"], groups = {"state": optim["state"]}, optim["param_groups"]
    return state, groups


def save_sharded(ckpt_dir: str, model, optimizer=None) -> None:
    """Collective under torchrun: every rank writes its shards into ckpt_dir/dcp."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    path = os.path.join(ckpt_dir, DIRNAME)
    writer = HuggingFaceStorageWriter(path, save_distributed=dist.is_initialized())
    try:
        with _quiet():
            dcp.save(_states(model, optimizer)[0], storage_writer=writer)
    except (Exception, CheckpointException) as e:  # disk full, no permission, ...
        raise CheckpointError(f"{path}: cannot write the checkpoint shards ({_first_cause(e)})") from None


def _reader(ckpt_dir: str):
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    return HuggingFaceStorageReader(os.path.join(ckpt_dir, DIRNAME))


def stored_tensors(ckpt_dir: str) -> dict:
    """{"<parameter name>": meta tensor of the stored shape and dtype} for the model part, after
    checking from the safetensors headers alone that the shards cover every tensor."""
    import math

    path = os.path.join(ckpt_dir, DIRNAME)
    try:
        metadata = _reader(ckpt_dir).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable sharded checkpoint ({' '.join(str(e).split())[:200]})") from None
    if not metadata.state_dict_metadata:
        raise CheckpointError(f"{path}: no checkpoint shards (*.safetensors) found")
    for key, md in metadata.state_dict_metadata.items():  # a lost shard file leaves a hole
        if sum(math.prod(c.sizes) for c in md.chunks) != math.prod(md.size):
            raise CheckpointError(f"{path}: the shards of {key} do not cover it (a shard file is missing)")
    return {k[len("model."):]: torch.empty(md.size, dtype=md.properties.dtype, device="meta")
            for k, md in metadata.state_dict_metadata.items() if k.startswith("model.")}


def _first_cause(e: BaseException) -> str:
    if hasattr(e, "failures"):  # DCP's CheckpointException: per-rank (exception, traceback); the first cause
        e = next(iter(e.failures.values()))[0]
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]


def _load(state: dict, ckpt_dir: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    path = os.path.join(ckpt_dir, DIRNAME)
    try:
        with _quiet():
            dcp.load(state, storage_reader=_reader(ckpt_dir))
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint shards ({_first_cause(e)})") from None


def load_sharded(ckpt_dir: str, model, optimizer=None) -> None:
    """Collective under torchrun: read ckpt_dir/dcp into the model (and optimizer) in place,
    resharding to however many ranks hold it now. Keys and shapes must match exactly."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state, groups = _states(model, optimizer)
    stored = stored_tensors(ckpt_dir)
    check_keys(state["model"], stored, sorted(set(stored) - set(state["model"])), os.path.join(ckpt_dir, DIRNAME))
    _load(state, ckpt_dir)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, {"state": state["optim"]["state"], "param_groups": groups})


def read_sharded(ckpt_dir: str, expected: dict | None = None) -> dict:
    """Every model tensor in full, on CPU: for inference and export (collective under torchrun).
    expected ({name: tensor of the right shape}, e.g. on the meta device) is checked first,
    before anything is allocated."""
    stored = stored_tensors(ckpt_dir)
    if expected is not None:
        check_keys(expected, stored, sorted(set(stored) - set(expected)), os.path.join(ckpt_dir, DIRNAME))
    state = {f"model.{k}": torch.empty(t.shape, dtype=t.dtype) for k, t in stored.items()}
    _load(state, ckpt_dir)
    return {k[len("model."):]: v for k, v in state.items()}
