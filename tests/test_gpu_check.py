"""benchmarks/gpu_check.py, the one command for a lent GPU, as far as a machine without CUDA can run it."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU it would run the whole check")
def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    out = tmp_path / "gpu"
    r = run(out, "--budget-s", 60)
    assert r.returncode == 0, r.stderr
    assert "no CUDA device here" in r.stdout
    assert not out.exists()  # nothing written, nothing installed


@pytest.mark.parametrize("args,message", [
    ((), "the following arguments are required: out"),
    (("{file}",), "exists and is not an empty folder"),
    (("{full}",), "exists and is not an empty folder"),
    (("{new}", "--budget-s", "0"), "--budget-s must be positive"),
    (("{new}", "--budget-s", "soon"), "invalid float value"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, args, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.json").write_text("{}")
    places = {"file": tmp_path / "file", "full": tmp_path / "full", "new": tmp_path / "new"}
    r = run(*(a.format(**places) for a in args))
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "new").exists()
