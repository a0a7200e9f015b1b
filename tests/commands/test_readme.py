"""The README's two walkthroughs (BioNeMo's regression tutorial, LoRA on secondary structure) run
as written: their commands are read from the README and run through the real command-line tools,
with only the pretrained model swapped for a tiny random one (no downloads here) and the training
shortened. A walkthrough whose command no longer works fails here, not for a reader."""

import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def walkthrough_commands(title: str) -> list[list[str]]:
    """The shell commands of the README section whose heading starts with `title`, one argv each
    (continuation lines joined, comments dropped)."""
    readme = (ROOT / "README.md").read_text()
    section = re.search(rf"^## {re.escape(title)}.*?\n(.*?)(?=^## )", readme, re.S | re.M).group(1)
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                commands.append(shlex.split(line, comments=True))
    return commands


def runnable(argv: list[str], tiny: str) -> list[str]:
    """The same command for this machine: ROOT's scripts, the tiny model for a hub id, two
    training steps instead of the walkthrough's length."""
    assert argv[0] == "python" and argv[1] in ("train.py", "infer.py"), argv
    out, args = [str(ROOT / argv[1])], iter(argv[2:])
    for a in args:
        if a == "--checkpoint" or a == "--base":
            model = next(args)
            assert model.startswith("facebook/esm2_"), model  # a hub id any reader can fetch
            out += [a, tiny]
        elif a in ("--epochs", "--steps"):
            next(args)
            out += ["--steps", "2", "--eval-every", "2"]
        elif a == "--eval-every":
            next(args)
        else:
            out.append(a)
    return out


@pytest.fixture
def workdir(tmp_path):
    """A directory where the README's relative paths (examples/, esm2lite/demo/) resolve."""
    (tmp_path / "esm2lite").mkdir()
    (tmp_path / "esm2lite" / "demo").symlink_to(ROOT / "esm2lite" / "demo")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    return tmp_path


def run_walkthrough(title, workdir, hf_tiny, forkrun):
    commands = walkthrough_commands(title)
    assert commands, title
    for argv in commands:
        if argv[0] == "cat":
            json.load(open(workdir / argv[1]))  # the file the reader is told to look at
            continue
        r = forkrun.run(runnable(argv, hf_tiny), cwd=workdir)
        assert r.returncode == 0, f"{shlex.join(argv)}:\n{r.stderr[-3000:]}"
    return commands


def test_bionemo_regression_tutorial(workdir, hf_tiny, forkrun):
    commands = run_walkthrough("Walkthrough 1", workdir, hf_tiny, forkrun)
    assert [c[1] for c in commands if c[0] == "python"] == ["train.py", "infer.py"]
    summary = json.load(open(workdir / "runs" / "tutorial" / "summary.json"))
    assert summary["task"] == "regression" and summary["best_metric"] == "loss" and summary["valid"]["mse"] >= 0
    rows = (workdir / "preds.csv").read_text().splitlines()
    assert rows[0].startswith("id,sequence,description,prediction") and len(rows) == 1 + 4  # the tutorial's four FASTA records


def test_lora_secondary_structure(workdir, hf_tiny, forkrun):
    (workdir / "my_chains.fasta").write_text(">chain_a\nMKTAYIAKQRQISFVKSHFSRQ\n>chain_b\nGSHMLEDPVAGG\n")
    run_walkthrough("Walkthrough 2", workdir, hf_tiny, forkrun)
    run = workdir / "runs" / "ss3"
    summary = json.load(open(run / "summary.json"))
    assert summary["task"] == "token-classification" and set(summary["confusion_matrix"]["classes"]) == set("CEH")
    assert {"accuracy", "macro_f1"} <= set(summary["test"])
    assert (run / "predictions_test.csv").exists() and (run / "plots" / "confusion_matrix.png").exists()
    residues = (workdir / "ss_residues.csv").read_text().splitlines()
    assert residues[0].startswith("id,position,residue,prediction,prob_") and len(residues) == 1 + 22 + 12
