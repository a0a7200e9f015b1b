"""A fine-tuned model as the start of a new run (issue 21), through the real command:
`train.py --checkpoint RUN/best` (or RUN, or RUN/checkpoints/step_N) begins at that model, in every
mode; a new task gets a new head, said in one line; the new run's checkpoints load that model again
and refuse it once it changed. A hub-layout --checkpoint trains without a warning."""

import json
import shutil
from pathlib import Path

import pytest

import oracles

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TRAIN, INFER = str(ROOT / "train.py"), str(ROOT / "infer.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("start")
    seqs = oracles.random_sequences(36, 15, 40, seed=11, with_mask=False)
    with open(d / "d.csv", "w") as f:
        f.write("sequence,target,label,split\n")
        for i, s in enumerate(seqs):
            charge = (s.count("K") + s.count("R")) / len(s)
            f.write(f"{s},{charge},{'high' if charge > 0.1 else 'low'},{'train' if i < 26 else 'valid'}\n")
    return str(d / "d.csv")


def train(forkrun, data, *argv):
    base = ["--csv", data, "--batch-tokens", "300", "--eval-every", "2", "--lr", "3e-3", "--device", "cpu"]
    r = forkrun.run([TRAIN, *base, *map(str, argv)])
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def valid_log(out) -> dict[int, float]:
    lines = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["split"] == "valid"}


@pytest.mark.parametrize("mode", ["lora", "head", "full"])
def test_start_from_best_begins_at_its_validation_loss(mode, hf_tiny, data, tmp_path, forkrun):
    """Run one trains 4 steps; run two starts from its best/ in the same mode. Run two's step-0
    validation loss is run one's best: the same model. LoRA merges its adapters into the weights:
    W + s·B·A is rounded once in fp32, against x·W + s·(x·Aᵀ)·Bᵀ while training, so the two agree to
    fp32 rounding of the loss (~1e-7 relative here), well within 1e-5; head and full compute alike."""
    one, two = tmp_path / "one", tmp_path / "two"
    r = train(forkrun, data, "--checkpoint", hf_tiny, "--mode", mode, "--steps", 4, "--out", one)
    assert "warning" not in (r.stdout + r.stderr).lower()  # an EsmForMaskedLM directory: its contact head is expected
    best = json.loads((one / "summary.json").read_text())["best_step"]
    r = train(forkrun, data, "--checkpoint", one / "best", "--mode", mode, "--steps", 2, "--out", two)
    assert f"--checkpoint {one / 'best'}: starting from this fine-tuned {mode} model of step {best}, " \
           "with a fresh optimizer; its head is kept" in r.stdout
    assert valid_log(two)[0] == pytest.approx(valid_log(one)[best], rel=1e-5)
    assert valid_log(two)[2] != valid_log(two)[0]  # and it trains from there
    config = json.loads((two / "best" / "config.json").read_text())
    assert config["base"]["path"] == str(one / "best")  # the new run's base is the fine-tuned model
    r = forkrun.run([INFER, "--run", str(two), "--input", data, "--output", str(tmp_path / "p.csv")])
    assert r.returncode == 0, r.stderr[-2000:]


def test_start_from_a_run_with_another_task_gets_a_new_head(hf_tiny, data, tmp_path, forkrun):
    """A run directory names its best/; classification after regression: the encoder is kept, a new
    head is made and the reason printed. Once the start model changes (run one trained longer, so its
    best/ is another model), the new run's checkpoints refuse to load on it."""
    one, two = tmp_path / "one", tmp_path / "two"
    train(forkrun, data, "--checkpoint", hf_tiny, "--steps", 2, "--out", one, "--schedule", "constant")
    r = train(forkrun, data, "--checkpoint", one, "--task", "classification", "--target-column", "label",
              "--steps", 2, "--out", two)
    assert f"--checkpoint {one}: starting from its best/ lora model of step 2, with a fresh optimizer; " \
           "a new head, as it was trained for regression, this run is classification" in r.stdout
    train(forkrun, data, "--out", one, "--resume", "--steps", 4)  # one/best/ now holds step 4 (or is rebuilt)
    if json.loads((one / "best" / "config.json").read_text())["step"] == 2:
        shutil.rmtree(one / "best")  # step 2 stayed best: make best/ another model by hand
        shutil.copytree(one / "checkpoints" / "step_4", one / "best")
    r = forkrun.run([INFER, "--run", str(two), "--input", data, "--output", str(tmp_path / "p.csv")])
    assert r.returncode != 0 and "base model encoder weights differ" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "p.csv").exists()


def test_a_step_checkpoint_can_start_a_run(hf_tiny, data, tmp_path, forkrun):
    one, two = tmp_path / "one", tmp_path / "two"
    train(forkrun, data, "--checkpoint", hf_tiny, "--mode", "head", "--steps", 2, "--out", one)
    step = one / "checkpoints" / "step_2"
    r = train(forkrun, data, "--checkpoint", step, "--mode", "lora", "--steps", 2, "--out", two)
    assert f"--checkpoint {step}: starting from this fine-tuned head model of step 2" in r.stdout
    assert valid_log(two)[0] == pytest.approx(valid_log(one)[2], rel=1e-5)  # head model, fresh adapters (B = 0)
