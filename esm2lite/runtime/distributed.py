"""Many processes with torchrun: FSDP2 sharding, data sharding, and agreeing on errors.

    torchrun --nproc_per_node N train.py ...      (NCCL on GPUs, gloo on CPU)

Every transformer block and the root are wrapped with `fully_shard`; on GPU parameters
compute in bf16 and gradients are reduced in fp32. Each optimizer step consumes N
micro-batches (one per rank) of one global batch stream, so N ranks with --grad-accum G
follow the same trajectory as one process with --grad-accum N*G.

A rank that dies or stops answering must not leave the others waiting: every collective gives up
after --dist-timeout seconds, and a collective that fails because another rank is gone or silent
ends this rank with one line (lost_rank), not a traceback. Before step 1 the ranks compare what
they read (train.py, inputs.py): one all_gather of every rank's identity of its inputs.
"""

import contextlib
import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from esm2lite.runtime.device import check_device, pick_device
from esm2lite.errors import Esm2liteError

DIST_TIMEOUT = 900  # seconds a collective waits for the other ranks (train.py --dist-timeout)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    main: bool = field(init=False)  # rank 0: the one that writes files
    enabled: bool = field(init=False)  # several processes

    def __post_init__(self):
        self.main, self.enabled = self.rank == 0, self.world > 1


def setup(device: str | None, timeout_s: int = DIST_TIMEOUT) -> tuple[Dist, torch.device]:
    """Join the process group when started by torchrun (collectives give up after timeout_s);
    pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), pick_device(device)
    check_device(device)
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    d = Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)
    return d, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


@contextlib.contextmanager
def lost_ranks_reported(timeout_s: int):
    """Under torchrun, a collective that fails because another rank died or went silent for
    timeout_s seconds becomes one Esm2liteError line (lost_rank); other errors pass unchanged."""
    try:
        yield
    except RuntimeError as e:  # gloo reports a lost peer as RuntimeError; NCCL and the store as DistError
        lost = lost_rank(e, timeout_s)
        if lost is None:
            raise
        raise lost from None


def lost_rank(e: BaseException, timeout_s: int) -> Esm2liteError | None:
    """The one-line error for a collective that failed because another rank is gone (its connection
    closed) or silent (nothing within timeout_s); None for any other error, or outside torchrun."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    text = str(e)
    ours = isinstance(e, dist.DistError) or "gloo/transport" in text
    if world == 1 or not isinstance(e, RuntimeError) or not ours:
        return None
    other = f"rank {1 - rank}" if world == 2 else "another rank"
    if "timed out" in text.lower() or "timeout" in text.lower():
        return Esm2liteError(f"rank {rank}: {other} stopped responding (no message from it within --dist-timeout "
                             f"{timeout_s} s: paused, hung or overloaded?); every rank stops")
    return Esm2liteError(f"rank {rank}: {other} ended (its connection closed); its own message, or torchrun's "
                         "report, says why; every rank stops")


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def same_error(d: Dist):
    """Every rank leaves the block alike: if it raises an esm2lite error on any rank, every rank
    raises the lowest failing rank's error (one clear message everywhere, no rank left waiting in
    a collective)."""
    error = None
    try:
        yield
    except Esm2liteError as e:
        error = e
    if not d.enabled:
        if error is not None:
            raise error
        return
    errors = gather(d, str(error) if error else None)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise type(error)(first) if error else Esm2liteError(first)


def mean(d: Dist, value: float) -> float:
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / d.world


def any_true(d: Dist, flag: bool) -> bool:
    if not d.enabled:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t)
    return bool(t)


def gather(d: Dist, obj) -> list:
    """Every rank's obj, in rank order (on every rank)."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shard(model, d: Dist, amp_dtype) -> None:
    """FSDP2: one unit per transformer block, then the root (embeddings, final LN, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if amp_dtype else MixedPrecisionPolicy()
    for block in model.encoder.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a full tensor into a plain or FSDP2-sharded (DTensor) one."""
    from torch.distributed.tensor import DTensor, distribute_tensor  # imported here: slow to import

    with torch.no_grad():
        if isinstance(dst, DTensor):
            dst.to_local().copy_(distribute_tensor(src.to(dst.device, dst.dtype), dst.device_mesh, dst.placements).to_local())
        else:
            dst.copy_(src.to(dst.device, dst.dtype))


def like(param: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out like `param` (sharded when param is a DTensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(src.to(param.device), param.device_mesh, param.placements)
    return src.to(param.device)


def trained_full_state(model) -> dict:
    """The trainable parameters (and buffers), unsharded on CPU, on rank 0 only: for LoRA/head
    checkpoints. Frozen base weights are never gathered."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))


def full_optimizer_state(model, optimizer) -> dict:
    """{"param.fqn": {"step", "exp_avg", "exp_avg_sq"}} unsharded on CPU (rank 0 only when distributed)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)).get("state", {})
