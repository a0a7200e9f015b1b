"""Where a run computes and in which precision: --device and --precision, checked before any work."""

import re

import torch

from esm2lite.errors import Esm2liteError

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")  # for inference; training takes all but fp16 and int8
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_device(name: str | None) -> None:
    """Esm2liteError unless `name` is None (choose), "cpu", "cuda" or "cuda:N" with such a GPU here."""
    if name is None:
        return
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", name)
    if not m or (m[1] == "cpu" and m[2] is not None):
        raise Esm2liteError(f"--device {name[:40]!r}: expected cpu, cuda or cuda:N")
    if m[1] == "cuda" and not torch.cuda.is_available():
        raise Esm2liteError(f"--device {name}: no CUDA device on this machine (use --device cpu)")
    if m[2] is not None and int(m[2]) >= torch.cuda.device_count():
        raise Esm2liteError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def pick_device(name: str | None) -> torch.device:
    """The device asked for (checked), or cuda when there is one, else cpu."""
    check_device(name)
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


LAYOUTS = ("auto", "padded", "packed")


def packs(layout: str, device: torch.device) -> bool:
    """Whether batches are packed (sequences end to end, no padding) rather than padded: the one rule.
    "auto": packed on a CPU, where it measured 1.49x padded (benchmarks/results/infer_cpu_packed.json);
    padded on a GPU until packed batches (varlen_attn, model/attention.py) are measured faster there:
    they have not run on a GPU yet (benchmarks/gpu_check.py measures both)."""
    return layout == "packed" or (layout == "auto" and device.type == "cpu")


def layout_line(layout: str, device_name: str | None) -> str:
    """What --debug prints: the batch layout the rule chose, and why."""
    device = pick_device(device_name)
    chosen = "packed" if packs(layout, device) else "padded"
    return f"batches: {chosen} (--batches {layout}" + (f" on {device.type})" if layout == "auto" else ")")


def amp_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. "auto": bf16 on GPU, fp32 on CPU. int8: None (the
    encoder's linears are int8 themselves: model/int8.py), and a CPU only."""
    check_precision(precision, device)
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return AMP_DTYPES.get(precision)


def check_precision(precision: str, device: torch.device) -> None:
    """Esm2liteError for --precision int8 anywhere but on a CPU (its kernels are oneDNN's x86 int8 GEMMs)."""
    if precision == "int8" and device.type != "cpu":
        raise Esm2liteError(f"--precision int8 runs on the CPU only (oneDNN int8 kernels), not on {device.type}: "
                            "add --device cpu, or choose fp32, bf16 or fp16")
