"""Pieces the benchmarks share: a random-weight checkpoint, device sync, memory readings, a parser
whose errors are one line."""

import argparse
import csv
import multiprocessing as mp
from queue import Empty

import torch

from esm2lite.model.config import ESM2Config
from esm2lite.model.esmc import ESMCConfig


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (exit status 2), like the project's other commands."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def make_checkpoint(arch: str, out_dir: str, seed: int, device="cpu", dtype=None) -> None:
    """A random-weight transformers EsmForMaskedLM of the named architecture (ESM C's, esmc_*:
    EsmcForMaskedLM), save_pretrained: both implementations then load the same files. Built on
    `device` (a GPU initialises 3B parameters in a second, a CPU in minutes) and saved in `dtype`
    (None: fp32)."""
    import transformers

    esmc = arch.lower().startswith("esmc")
    config = (ESMCConfig if esmc else ESM2Config).from_name(arch).to_hf_config()
    for key in ("torch_dtype", "architectures", "model_type"):
        config.pop(key, None)
    family, cls = ("EsmcConfig", "EsmcForMaskedLM") if esmc else ("EsmConfig", "EsmForMaskedLM")
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(transformers, cls)(getattr(transformers, family)(**config))
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(out_dir)
    del model


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def saved_bytes(forward, params) -> int:
    """Bytes autograd saves for backward while forward() runs, the given parameters' own storage
    excluded: an activation-memory number that does not depend on the allocator."""
    weights = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t.detach()  # keeps the storage alive (no pointer reuse) without a graph -> tensor -> graph cycle

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def run_info(device, **versions) -> dict:
    """What every result JSON starts with: date, exact command, device, library versions."""
    import datetime
    import platform
    import shlex
    import sys

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "device_type": device.type,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, **versions},
    }


def in_child(what: str, target, *args):
    """target(*args, queue) in a fresh spawned process; what it puts on the queue, or RuntimeError
    as soon as the process is gone without a result (never a wait on a dead child)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    try:
        while True:
            try:
                return queue.get(timeout=1.0)
            except Empty:
                if not proc.is_alive() and queue.empty():
                    raise RuntimeError(f"{what}: the benchmark process died (exit code {proc.exitcode}) "
                                       f"without a result") from None
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()


def read_sequences(path: str, num_seqs: int, min_len: int, max_len: int) -> list[str]:
    """The first num_seqs sequences of a CSV's `sequence` column with min_len..max_len residues
    (fewer when the file has fewer)."""
    with open(path, newline="") as f:
        seqs = [row["sequence"] for row in csv.DictReader(f) if min_len <= len(row["sequence"]) <= max_len]
    return seqs[:num_seqs]
