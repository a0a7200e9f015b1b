"""Full fine-tunes on disk: torch.distributed.checkpoint (DCP), written and read shard by shard.

A full fine-tune of a 3B/15B model under FSDP is too big to gather onto one rank, so its
checkpoint is a DCP directory: every rank writes the shards it holds, and a reader on any
number of ranks (or one process, or none: plain Python) gets the pieces it needs. Keys are
"model.<parameter name>" and, in step checkpoints, "optim.<...>" for AdamW's moments.

Under torchrun on several nodes the run directory must be on a filesystem every node sees.
"""

import contextlib
import os
import warnings

import torch

from .checkpoint import check_keys
from .errors import CheckpointError

DIRNAME = "dcp"  # inside a checkpoint directory


def has_sharded(ckpt_dir: str) -> bool:
    return os.path.isdir(os.path.join(ckpt_dir, DIRNAME))


@contextlib.contextmanager
def _quiet():
    """DCP warns that it runs 'in a single process' when no process group exists: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


def _states(model, optimizer) -> dict:
    """This rank's view: DTensor shards under FSDP2, plain tensors otherwise."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_sharded(ckpt_dir: str, model, optimizer=None) -> None:
    """Collective under torchrun: every rank writes its shards into ckpt_dir/dcp."""
    import torch.distributed.checkpoint as dcp

    with _quiet():
        dcp.save(_states(model, optimizer), checkpoint_id=os.path.join(ckpt_dir, DIRNAME))


def stored_tensors(ckpt_dir: str) -> dict:
    """{"<parameter name>": meta tensor of the stored shape and dtype} for the model part."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = os.path.join(ckpt_dir, DIRNAME)
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable torch.distributed.checkpoint directory "
                              f"({' '.join(str(e).split())[:200]})") from None
    return {k[len("model."):]: torch.empty(md.size, dtype=md.properties.dtype, device="meta")
            for k, md in metadata.state_dict_metadata.items()
            if k.startswith("model.") and isinstance(md, TensorStorageMetadata)}


def _load(state: dict, ckpt_dir: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    path = os.path.join(ckpt_dir, DIRNAME)
    try:
        with _quiet():
            dcp.load(state, checkpoint_id=path)
    except (Exception, CheckpointException) as e:
        if isinstance(e, CheckpointException):  # per-rank (exception, traceback): keep the first cause only
            e = next(iter(e.failures.values()))[0]
        reason = f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]
        raise CheckpointError(f"{path}: cannot read the checkpoint shards ({reason})") from None


def load_sharded(ckpt_dir: str, model, optimizer=None) -> None:
    """Collective under torchrun: read ckpt_dir/dcp into the model (and optimizer) in place,
    resharding to however many ranks hold it now. Keys and shapes must match exactly."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _states(model, optimizer)
    stored = stored_tensors(ckpt_dir)
    check_keys(state["model"], stored, sorted(set(stored) - set(state["model"])), os.path.join(ckpt_dir, DIRNAME))
    _load(state, ckpt_dir)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])


def read_sharded(ckpt_dir: str) -> dict:
    """Every model tensor in full, on CPU: for inference and export (collective under torchrun)."""
    state = {f"model.{k}": torch.empty(t.shape, dtype=t.dtype) for k, t in stored_tensors(ckpt_dir).items()}
    _load(state, ckpt_dir)
    return {k[len("model."):]: v for k, v in state.items()}
