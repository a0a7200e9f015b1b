"""A run users can continue (issue 21), through the real command: --resume with only --out takes the
run's own settings; a larger --steps trains a finished run longer (with --schedule constant, exactly
as one longer run; with cosine, the LR from the resume point is that of a run of the new length)."""

import json
import math
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

import oracles

pytestmark = pytest.mark.slow
TRAIN = str(Path(__file__).resolve().parents[2] / "train.py")
LR = 3e-3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("continue")
    seqs = oracles.random_sequences(40, 15, 40, seed=8, with_mask=False)
    with open(d / "d.csv", "w") as f:
        f.write("sequence,target,split\n")
        for i, s in enumerate(seqs):
            f.write(f"{s},{(s.count('K') + s.count('R')) / len(s)},{'train' if i < 30 else 'valid'}\n")
    return str(d / "d.csv")


def args(hf_tiny, data, out, steps, schedule):
    return ["--csv", data, "--checkpoint", hf_tiny, "--steps", str(steps), "--schedule", schedule, "--lr", str(LR),
            "--batch-tokens", "300", "--eval-every", "3", "--log-every", "1", "--lora-dropout", "0.1", "--seed", "3",
            "--warmup-steps", "2", "--keep-last", "100", "--device", "cpu", "--out", str(out)]


def train(forkrun, argv):
    r = forkrun.run([TRAIN, *map(str, argv)])
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def log(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out, step):
    return load_file(out / "checkpoints" / f"step_{step}" / "model.safetensors")


def test_constant_schedule_extended_equals_one_longer_run(hf_tiny, data, tmp_path, forkrun):
    """Six steps, then `--out RUN --resume --steps 10`: every weight of step 10 equals that of one
    ten-step run (bit for bit: on CPU a run is deterministic); config.json and metrics.jsonl record the
    change of length, and the old end's summary is replaced by the new one's."""
    one, two = tmp_path / "one", tmp_path / "two"
    train(forkrun, args(hf_tiny, data, one, 10, "constant"))
    train(forkrun, args(hf_tiny, data, two, 6, "constant"))
    assert json.loads((two / "summary.json").read_text())["steps"] == 6
    r = train(forkrun, ["--out", two, "--resume", "--steps", "10"])  # only --out and the new length
    assert f"--resume: {two} is trained longer from step 6: --steps 6 -> 10" in r.stdout
    a, b = weights(one, 10), weights(two, 10)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    config = json.loads((two / "config.json").read_text())
    assert config["steps"] == 10 and config["lengthened"] == [{"at_step": 6, "steps": {"from": 6, "to": 10}}]
    assert {"step": 6, "split": "lengthened", "steps": 10} in log(two)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["valid"] == json.loads((one / "summary.json").read_text())["valid"]
    keep = lambda records: [r for r in records if r["split"] != "lengthened" and "tokens_per_s" not in r]  # noqa: E731
    assert keep(log(two)) == keep(log(one))  # evaluations, and the test line once, at the new end
    r = forkrun.run([TRAIN, "--out", two, "--resume", "--steps", "8"])
    assert r.returncode == 2 and "this run is 10 steps long; --resume can train a run longer" in r.stderr


def test_cosine_extension_follows_the_longer_runs_schedule(hf_tiny, data, tmp_path, forkrun):
    """With cosine the schedule is recomputed for the new end: the LR of every step after the resume
    point is the one a run of the new length has at that step (warmup 2, then half a cosine period to 0:
    written out here), so a finished run, at LR 0, climbs back to that curve."""
    out = tmp_path / "run"
    train(forkrun, args(hf_tiny, data, out, 6, "cosine"))
    train(forkrun, ["--out", out, "--resume", "--steps", "12"])
    expected = lambda i, n: LR * (i + 1) / 2 if i < 2 else LR * 0.5 * (1 + math.cos(math.pi * (i - 2) / (n - 2)))  # noqa: E731
    lrs = {r["step"]: r["lr"] for r in log(out) if r["split"] == "train"}  # line of step s: the LR of step s
    assert sorted(lrs) == list(range(1, 13))
    for s, lr in lrs.items():
        assert lr == pytest.approx(expected(s - 1, 6 if s <= 6 else 12), rel=1e-12, abs=1e-18), s  # float64 sums


def test_resume_needs_only_out_and_refuses_a_changed_option(hf_tiny, data, tmp_path, forkrun):
    """A run with no end yet reached: --resume with --out alone continues it to exactly the weights of
    the run that was never stopped; an option given with a different value is refused in one line."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    train(forkrun, args(hf_tiny, data, ref, 6, "cosine"))
    train(forkrun, args(hf_tiny, data, out, 6, "cosine"))
    for name in ("step_6", "step_5", "step_4"):  # as a kill after step 3's checkpoint leaves it
        shutil.rmtree(out / "checkpoints" / name, ignore_errors=True)
    r = forkrun.run([TRAIN, "--out", out, "--resume", "--lr", "0.5"])
    assert r.returncode == 2 and r.stderr.strip().endswith("--resume needs the same settings; changed: lr"), r.stderr
    assert_continues_in_its_layout(out / "checkpoints" / "step_3")
    r = train(forkrun, ["--out", out, "--resume"])
    assert f"resumed from {out / 'checkpoints' / 'step_3'} at step 3" in r.stdout
    a, b = weights(ref, 6), weights(out, 6)
    assert all((a[k] == b[k]).all() for k in a)


def assert_continues_in_its_layout(step_dir):
    """A run trained on packed batches (the rule on a CPU) continues packed wherever it resumes (on a
    GPU the rule would pad: another stream), and refuses an explicit --batches padded in one line."""
    import torch

    from esm2lite.errors import Esm2liteError
    from esm2lite.training.inputs import stream_layout

    assert json.loads((step_dir / "trainer_state.json").read_text())["packed"] is True
    assert stream_layout("auto", torch.device("cuda"), str(step_dir)) is True
    assert stream_layout("auto", torch.device("cuda"), None) is False  # a new run: the rule
    with pytest.raises(Esm2liteError, match="^--batches padded: this run was trained on packed batches"):
        stream_layout("padded", torch.device("cpu"), str(step_dir))


def test_the_continue_command_names_the_launcher(monkeypatch):
    """The interruption line's command, as the run was started: one process, or torchrun with as many
    processes per node (a run of esm2lite-train under torchrun is started with -m)."""
    from esm2lite.commands.train import continue_command

    assert continue_command("esm2lite-train", "runs/my run") == "esm2lite-train --out 'runs/my run' --resume"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert continue_command("python train.py", "r") == "torchrun --nproc-per-node 4 train.py --out r --resume"
    assert continue_command("esm2lite-train", "r") == \
        "torchrun --nproc-per-node 4 -m esm2lite.commands.train --out r --resume"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert continue_command("python train.py", "r").startswith("torchrun --nnodes 2 (and your rendezvous options)")
