"""A fine-tuning checkpoint directory (RUN/best, RUN/checkpoints/step_N): the one module that
writes and reads the files in it.

    config.json                 spec.CheckpointSpec: mode, labels, head and LoRA configs, the
                                encoder's architecture, the base model (path or architecture +
                                seed, and the sha256 of its weights); and the step it was taken at
    model.safetensors           lora / head: the trained tensors, "head.*" and (lora) the adapters
                                "encoder.*.lora_a|lora_b"; small, so gathered to rank 0, which writes
    dcp/                        full: "encoder.*" and "head.*" (step checkpoints: and AdamW's moments)
                                as torch.distributed.checkpoint shards, every rank writing its own;
                                sharded.py writes and reads them
    trainer_state.json          step checkpoints: step, data position, best so far, skipped steps
    trainer_state.safetensors   step checkpoints: every rank's RNG state; lora / head: AdamW's moments
                                by parameter name, unsharded (full: in dcp/)
    SHA256SUMS                  the sha256 of every other file (`sha256sum -c SHA256SUMS` checks them);
                                verified, with every weight finite, whenever the checkpoint is loaded

A directory is written under a temporary name and renamed into place once complete (atomic.py).
Under torchrun saving is collective; RUN must be on a filesystem every node sees.
"""

import contextlib
import hashlib
import json
import os

import torch
from safetensors.torch import load_file, save_file

from esm2lite.runtime import distributed
from esm2lite.files.atomic import atomic_dir
from esm2lite.weights.pretrained import check_keys
from esm2lite.runtime.distributed import Dist
from esm2lite.errors import CheckpointError, Esm2liteError
from esm2lite.checkpoints.modes import MODE
from esm2lite.checkpoints.sharded import DIRNAME, has_sharded, load_sharded, read_sharded, save_sharded
from esm2lite.checkpoints.spec import FORMAT, CheckpointSpec
from esm2lite.model.task_model import TaskModel
from esm2lite.files.textfiles import (MAX_JSON_BYTES, changed_while_read, decode_text, open_file, parse_json, read_bytes,
                        read_json)

CONFIG, WEIGHTS, STATE, SUMS = "config.json", "model.safetensors", "trainer_state", "SHA256SUMS"
MAX_SUMS_BYTES = 16 << 20  # SHA256SUMS: about 100 bytes a file
MAX_FILE_BYTES = 1 << 40  # any one file of a checkpoint (a 15B full fine-tune's one-rank shard with AdamW: ~180 GB)
STATE_FIELDS = {"step": int, "epoch": int, "index": int, "skipped": int, "world_size": int}


# ---------------------------------------------------------------- writing


def save(ckpt_dir: str, model: TaskModel, spec: CheckpointSpec, step: int, d: Dist, optimizer=None,
         state: dict | None = None) -> None:
    """Write the checkpoint directory atomically; collective under torchrun. With `state` (step,
    data position, best so far...) it is a step checkpoint and holds the optimizer and RNG too."""
    mode = MODE[spec.mode]
    tensors = None if mode.sharded else _gathered(model, mode, d)
    extra = None if state is None else _trainer_tensors(model, optimizer, d, moments=not mode.sharded)
    with atomic_dir(ckpt_dir, overwrite=True) if d.main else contextlib.nullcontext() as tmp:
        tmp = distributed.gather(d, tmp)[0]  # rank 0's temporary directory, for everyone
        if mode.sharded:
            save_sharded(tmp, model, optimizer if state is not None else None)
        if d.main:
            if tensors is not None:
                save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": FORMAT})
            _write_json(os.path.join(tmp, CONFIG), {**spec.to_dict(), "step": step})
            if state is not None:
                save_file(extra, os.path.join(tmp, STATE + ".safetensors"))
                _write_json(os.path.join(tmp, STATE + ".json"), state)
        distributed.barrier(d)  # every shard is on disk before the sums and the rename
        _write_sums(tmp, d)
        distributed.barrier(d)


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


def _gathered(model: TaskModel, mode, d: Dist) -> dict:
    """The trained tensors on CPU (rank 0; collective under FSDP, which gathers only those)."""
    state = mode.trained_state(model)
    if d.enabled:
        full = distributed.trained_full_state(model)
        state = {k: full[k] for k in state} if d.main else {}
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _trainer_tensors(model, optimizer, d: Dist, moments: bool) -> dict:
    """Every rank's RNG state and (with moments) the optimizer moments keyed by parameter name,
    unsharded, so resumable on any number of ranks. Collective; complete on rank 0 only."""
    tensors = {}
    for name, st in distributed.full_optimizer_state(model, optimizer).items() if moments else ():
        for k, v in st.items():
            tensors[f"{name}.{k}"] = v.detach().to("cpu").contiguous()
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    for rank, (cpu, gpu) in enumerate(distributed.gather(d, (torch.get_rng_state(), cuda))):
        tensors[f"rng.cpu.{rank}"] = cpu
        if gpu is not None:
            tensors[f"rng.cuda.{rank}"] = gpu
    return tensors


# ---------------------------------------------------------------- hashes


def _sha256(path: str) -> str:
    """The sha256 of a regular file (a device, FIFO or socket is refused before a byte is read),
    in chunks; a file that grows or changes while it is hashed is an error, so the read is bounded."""
    h = hashlib.sha256()
    f, st = open_file(path, CheckpointError, regular=True, limit=MAX_FILE_BYTES)
    with f:
        size = 0
        while chunk := f.read(1 << 22):
            size += len(chunk)
            if size > st.st_size:
                break
            h.update(chunk)
        if size != st.st_size or changed_while_read(st, f):
            raise CheckpointError(f"{path}: changed while it was being hashed (is it still being written?)")
    return h.hexdigest()


def _member(ckpt_dir: str, name: str) -> str:
    """The path of a file a checkpoint lists: a relative name whose real path (symlinks resolved)
    is inside the checkpoint directory, or CheckpointError."""
    path = os.path.join(ckpt_dir, name)
    top = os.path.realpath(ckpt_dir)
    if os.path.isabs(name) or ".." in name.split("/") or os.path.commonpath([top, os.path.realpath(path)]) != top:
        raise CheckpointError(f"{path}: outside the checkpoint directory {ckpt_dir} (a link out of it?); refused")
    return path


def _listed(ckpt_dir: str) -> list[str]:
    """Every file under ckpt_dir but SHA256SUMS, as relative names (symlinked directories are not entered)."""
    out = []
    for root, _, files in os.walk(ckpt_dir):
        out += [os.path.relpath(os.path.join(root, f), ckpt_dir) for f in files]
    return sorted(n for n in out if n != SUMS)


def _write_sums(tmp: str, d: Dist) -> None:
    """SHA256SUMS for every file in tmp; each rank hashes its share (the shards are big)."""
    names = distributed.gather(d, _listed(tmp) if d.main else None)[0]
    mine = {n: _sha256(os.path.join(tmp, n)) for n in names[d.rank::d.world]}
    sums = {k: v for part in distributed.gather(d, mine) for k, v in part.items()}
    if d.main:
        with open(os.path.join(tmp, SUMS), "w", encoding="utf-8") as f:
            f.writelines(f"{sums[n]}  {n}\n" for n in names)


def read_sums(ckpt_dir: str) -> dict[str, str] | None:
    """{file: sha256} from SHA256SUMS; None for a checkpoint written before it existed."""
    path = os.path.join(ckpt_dir, SUMS)
    if not os.path.lexists(path):
        return None
    sums = {}
    text = read_bytes(path, CheckpointError, MAX_SUMS_BYTES, regular=True).decode("utf-8", errors="replace")
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or os.path.isabs(name) or ".." in name.split("/"):
            raise CheckpointError(f"{path}: damaged (a line is not '<sha256>  <file name>')")
        sums[name] = digest
    return sums


def _corrupt(path: str) -> CheckpointError:
    return CheckpointError(f"{path}: corrupt: its sha256 differs from the one recorded in {SUMS} "
                           "when the checkpoint was written (the file was changed or damaged)")


def verify(ckpt_dir: str, d: Dist | None = None) -> None:
    """CheckpointError naming the first file whose sha256 is not the one recorded when it was
    written, or that is not a regular file inside the checkpoint directory. Under torchrun each
    rank checks its share and every rank raises the same error."""
    d = d or Dist()
    sums = read_sums(ckpt_dir) or {}
    with distributed.same_error(d):
        for name in sorted(sums)[d.rank::d.world]:
            path = _member(ckpt_dir, name)
            if not os.path.lexists(path):
                raise CheckpointError(f"{path}: file not found (listed in {SUMS})")
            if _sha256(path) != sums[name]:
                raise _corrupt(path)


# ---------------------------------------------------------------- reading


def read_spec(ckpt_dir: str) -> CheckpointSpec:
    """config.json: every field checked (sizes against the parameter and layer budget: nothing is
    built or allocated), then its sha256 against the one SHA256SUMS records (when the checkpoint has
    one), so that no caller builds anything from a config that was changed after it was written."""
    path = os.path.join(ckpt_dir, CONFIG)
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: checkpoint directory not found")
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: file not found (not an esm2lite checkpoint directory?)")
    return _listed_json(ckpt_dir, CONFIG, lambda obj: CheckpointSpec.from_dict(obj, path))


def _listed_json(ckpt_dir: str, name: str, check):
    """check(the JSON value of the checkpoint's file `name`), returned only once the file's sha256
    is the one SHA256SUMS records (when the checkpoint has one): parse errors are named first, and
    nothing is ever built from a file changed after it was written."""
    path = os.path.join(ckpt_dir, name)
    raw = read_bytes(_member(ckpt_dir, name), CheckpointError, MAX_JSON_BYTES, regular=True)
    checked = check(parse_json(decode_text(raw, path, CheckpointError), path, CheckpointError))
    sums = read_sums(ckpt_dir)
    if sums is not None and sums.get(name) != hashlib.sha256(raw).hexdigest():
        raise _corrupt(path) if name in sums else CheckpointError(f"{ckpt_dir}/{SUMS}: does not list {name} (damaged)")
    return checked


def saved_step(ckpt_dir: str) -> int | None:
    """The optimizer step a checkpoint was taken at (None: unknown, unreadable or absent)."""
    with contextlib.suppress(Esm2liteError):
        step = read_json(os.path.join(ckpt_dir, CONFIG), CheckpointError, regular=True).get("step")
        return step if isinstance(step, int) else None
    return None


def _check_finite(tensors: dict, source: str) -> None:
    for k, v in tensors.items():
        v = v.to_local() if hasattr(v, "to_local") else v
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{source}: tensor {k} holds NaN or infinite values")


def read_tensors(ckpt_dir: str, expected: dict | None = None) -> tuple[dict, dict]:
    """model.safetensors (or a full fine-tune's dcp/) -> ({encoder key: tensor}, {head key: tensor}).
    expected: the shapes a dcp/ checkpoint must hold, checked before anything is allocated."""
    path = os.path.join(ckpt_dir, DIRNAME if has_sharded(ckpt_dir) else WEIGHTS)
    try:
        if not has_sharded(ckpt_dir) and os.path.lexists(path):  # a regular file inside the checkpoint, or refused
            open_file(_member(ckpt_dir, WEIGHTS), CheckpointError, regular=True, limit=MAX_FILE_BYTES)[0].close()
        tensors = read_sharded(ckpt_dir, expected) if has_sharded(ckpt_dir) else load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (CheckpointError, MemoryError):  # running out of memory is not a damaged file
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({' '.join(str(e).split())[:200]})") from None
    _check_finite(tensors, path)
    encoder = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
    head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    return encoder, head


def load_weights(model: TaskModel, ckpt_dir: str, optimizer=None, tensors: tuple[dict, dict] | None = None) -> TaskModel:
    """Copy a checkpoint's trained tensors into a model, plain or FSDP-sharded, by name. A full
    fine-tune's dcp/ is read shard by shard (with the optimizer's state when one is given: resuming);
    otherwise `tensors` (read_tensors(ckpt_dir) unless given). Collective under torchrun."""
    mode = MODE[read_spec(ckpt_dir).mode]
    if tensors is None and mode.sharded and has_sharded(ckpt_dir):
        load_sharded(ckpt_dir, model, optimizer)
        _check_finite(mode.trained_state(model), os.path.join(ckpt_dir, DIRNAME))
        return model
    encoder_state, head_state = tensors or read_tensors(ckpt_dir)
    got = {**{f"encoder.{k}": v for k, v in encoder_state.items()}, **{f"head.{k}": v for k, v in head_state.items()}}
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    expected = set(mode.trained_state(model))
    check_keys({k: targets[k] for k in expected}, got, sorted(set(got) - expected), os.path.join(ckpt_dir, WEIGHTS))
    for k in sorted(expected):  # the same order on every rank: sharded copies are collective
        if targets[k].data_ptr() != got[k].data_ptr():  # full-mode loads already hold these
            distributed.copy_into(targets[k], got[k])
    return model


def read_trainer_state(ckpt_dir: str) -> dict:
    """trainer_state.json: step, data position (epoch, index), best so far, skipped steps, ranks."""
    path = os.path.join(ckpt_dir, STATE + ".json")
    return _listed_json(ckpt_dir, STATE + ".json", lambda obj: _checked_state(obj, path))


def load_trainer_state(ckpt_dir: str, model, optimizer, d: Dist) -> dict:
    """read_trainer_state; and the optimizer moments (lora / head) and this rank's RNG state
    restored from trainer_state.safetensors."""
    path = os.path.join(ckpt_dir, STATE)
    state = read_trainer_state(ckpt_dir)
    open_file(path + ".safetensors", CheckpointError, regular=True)[0].close()  # a FIFO there would block
    try:
        tensors = load_file(path + ".safetensors")
    except MemoryError:
        raise  # cli.run_main: one line saying so
    except Exception as e:
        raise CheckpointError(f"{path}.safetensors: corrupt, truncated or missing ({' '.join(str(e).split())[:200]})") from None
    _check_finite(tensors, path + ".safetensors")
    try:
        _restore(tensors, model, optimizer, d, state["step"])
    except (KeyError, RuntimeError, TypeError, ValueError) as e:  # a file that parses but is not ours
        raise CheckpointError(f"{path}.safetensors: not a trainer state ({type(e).__name__}: {e})"[:300]) from None
    return state


def _restore(tensors: dict, model, optimizer, d: Dist, step: int) -> None:
    """AdamW's moments by parameter name (lora / head), then this rank's RNG state."""
    for name, p in model.named_parameters():
        if p.requires_grad and f"{name}.exp_avg" in tensors:
            optimizer.state[p] = {"step": tensors[f"{name}.step"].clone(),
                                  "exp_avg": distributed.like(p, tensors[f"{name}.exp_avg"]),
                                  "exp_avg_sq": distributed.like(p, tensors[f"{name}.exp_avg_sq"])}
    if f"rng.cpu.{d.rank}" in tensors and f"rng.cpu.{d.world}" not in tensors:  # same number of ranks
        torch.set_rng_state(tensors[f"rng.cpu.{d.rank}"])
        if f"rng.cuda.{d.rank}" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{d.rank}"])
    else:  # another number of ranks: a fresh, still deterministic stream per rank
        torch.manual_seed(step * 1000 + d.rank)


def _checked_state(state, source: str) -> dict:
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: expected a JSON object")
    for key, kind in STATE_FIELDS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool) or state[key] < 0:
            raise CheckpointError(f"{source}: field {key} must be a non-negative integer")
    if state.get("best_step") is not None and not isinstance(state["best_step"], int):
        raise CheckpointError(f"{source}: field best_step must be an integer or null")
    if not isinstance(state.get("packed", False), bool):
        raise CheckpointError(f"{source}: field packed must be true or false")
    if state.get("best_value") is not None and not isinstance(state["best_value"], (int, float)):
        raise CheckpointError(f"{source}: field best_value must be a number or null")
    return state
