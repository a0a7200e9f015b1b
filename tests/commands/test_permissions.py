"""Outputs get the permissions a plain open() / mkdir() would give under the caller's umask, while
still written atomically (mkstemp / mkdtemp / safetensors create 0600 / 0700 temporaries, which a
colleague on a shared filesystem could not read). Checked through the real command-line tools."""

import stat
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def run(forkrun, cmd, mask, cwd):
    r = forkrun.run(cmd, cwd=cwd, umask=mask)
    assert r.returncode == 0, r.stderr[-2000:]


def modes(*roots):
    """{path: permission bits} of every file and directory under (and including) the roots."""
    out = {}
    for root in map(Path, roots):
        out[root] = stat.S_IMODE(root.stat().st_mode)
        for p in root.rglob("*") if root.is_dir() else ():
            out[p] = stat.S_IMODE(p.stat().st_mode)
    return out


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_outputs_follow_the_umask(hf_tiny, tmp_path, mask, forkrun):
    (tmp_path / "train.csv").write_text("sequence,target\nMKTAYIAKQR,0.5\nMKVLAAGIVG,1.5\nMSTNPKPQRK,2.0\n")
    (tmp_path / "in.fasta").write_text(">a\nMKTAYIAKQR\n>b\nMKV\n")
    run(forkrun, [str(ROOT / "train.py"), "--train-csv", "train.csv", "--checkpoint", hf_tiny, "--steps", "2", "--lora-rank",
         "2", "--batch-tokens", "600", "--save-every", "1", "--keep-last", "1", "--out", "run"], mask, tmp_path)
    run(forkrun, [str(ROOT / "infer.py"), "--run", "run", "--input", "in.fasta", "--output", "pred.csv", "--embeddings",
         "emb.safetensors"], mask, tmp_path)
    run(forkrun, ["-m", "esm2lite.commands.export", "--run", "run", "--merged", "merged", "--peft", "peft"], mask, tmp_path)
    found = modes(*(tmp_path / n for n in ("run", "pred.csv", "emb.safetensors", "merged", "peft")))
    want = {p: (0o777 if p.is_dir() else 0o666) & ~mask for p in found}
    assert found == want
    names = {p.name for p in found}
    assert {"model.safetensors", "trainer_state.safetensors", "SHA256SUMS", "summary.json", "adapter_model.safetensors",
            "step_2", "best", "pred.csv", "emb.safetensors"} <= names  # every kind of output was checked
