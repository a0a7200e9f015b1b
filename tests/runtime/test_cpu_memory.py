"""runtime/cpu_memory.py: after keep_freed_memory(), glibc serves a 64 MB block from its heap and
keeps it there once freed, where by default it maps the block on its own and unmaps it at free.
The oracle is glibc's own accounting (mallinfo2: hblkhd = bytes in mmapped blocks, fordblks = free
bytes kept in the heap), read in a fresh interpreter: the setting is process-wide."""

import subprocess
import sys

import pytest
import torch

from esm2lite.runtime.cpu_memory import glibc

PROBE = r"""
import ctypes, json, torch
from esm2lite.runtime.cpu_memory import glibc, keep_freed_memory

class Info(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

glibc().mallinfo2.restype = Info
def info(): return glibc().mallinfo2()
MB = 1 << 20
def block():  # a 64 MB tensor alive, then freed: (mmapped bytes while alive, free heap bytes after)
    t = torch.empty(16 * MB, dtype=torch.float32)
    mapped = info().hblkhd
    del t
    return mapped, info().fordblks
before = block()
applied = keep_freed_memory()
after = block()
print(json.dumps({"applied": applied, "before": before, "after": after}))
"""


@pytest.mark.skipif(glibc() is None or not hasattr(glibc(), "mallinfo2"),
                    reason="glibc >= 2.33 only (mallinfo2; a no-op off glibc, tested below)")
def test_freed_blocks_stay_in_the_heap_after_keep_freed_memory():
    import json

    out = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                                    timeout=120).stdout)
    MB = 1 << 20
    assert out["applied"] is True
    assert out["before"][0] >= 64 * MB and out["before"][1] < 64 * MB  # default: mapped alone, unmapped at free
    assert out["after"][0] < 64 * MB and out["after"][1] >= 64 * MB  # kept: from the heap, and kept there


def test_without_glibc_it_does_nothing(monkeypatch):
    import esm2lite.runtime.cpu_memory as cpu_memory

    monkeypatch.setattr(cpu_memory, "glibc", lambda: None)
    assert cpu_memory.keep_freed_memory() is False


def test_infer_command_keeps_freed_memory_on_a_cpu_run_only(monkeypatch):
    import esm2lite.commands.infer as infer
    import esm2lite.inference.pipeline as pipeline

    calls = []
    monkeypatch.setattr(infer, "keep_freed_memory", lambda: calls.append("kept"))
    monkeypatch.setattr(pipeline, "run", lambda cfg, demo: calls.append(cfg.device))
    args = ["--base", "esm2_t6_8M_UR50D", "--input", "x.fasta", "--score", "pll", "--output", "o.csv"]
    infer.main(args + ["--device", "cpu"])
    assert calls == ["kept", "cpu"]
    monkeypatch.setattr(infer, "pick_device", lambda name: torch.device("cuda"))  # as on a GPU machine
    infer.main(args)
    assert calls == ["kept", "cpu", None]  # a GPU run leaves the process's malloc alone
