"""Interrupted training: SIGKILL at random moments, SIGTERM/SIGINT; resume gives exactly the
weights of an uninterrupted run, and no reader sees a half-written checkpoint."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import oracles

pytestmark = pytest.mark.slow
TRAIN = str(Path(__file__).resolve().parent.parent / "train.py")
STEPS = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory, hf_tiny):
    d = tmp_path_factory.mktemp("interrupt")
    seqs = oracles.random_sequences(60, 15, 50, seed=4, with_mask=False)
    with open(d / "d.csv", "w") as f:
        f.write("sequence,target,split\n")
        for i, s in enumerate(seqs):
            f.write(f"{s},{(s.count('K') + s.count('R')) / len(s)},{'train' if i < 45 else 'valid'}\n")
    args = lambda out: ["--csv", str(d / "d.csv"), "--checkpoint", hf_tiny, "--steps", str(STEPS),  # noqa: E731
                        "--batch-tokens", "300", "--lr", "3e-3", "--eval-every", "4", "--save-every", "2",
                        "--log-every", "1", "--lora-dropout", "0.1", "--seed", "5", "--keep-last", "100",
                        "--device", "cpu", "--out", str(out)]
    ref = d / "reference"
    t0 = time.time()
    r = subprocess.run([sys.executable, TRAIN, *args(ref)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return args, ref, time.time() - t0


def final_weights(out):
    return load_file(out / "checkpoints" / f"step_{STEPS}" / "model.safetensors")


def assert_equal_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k


def assert_readable(out):
    """Whatever a kill left behind: every visible checkpoint is complete, and every log line
    parses except perhaps a last one the kill cut short (appends are not atomic; --resume drops it)."""
    ckpts = out / "checkpoints"
    for name in os.listdir(ckpts) if ckpts.exists() else []:
        if name.startswith("."):
            continue  # an unfinished atomic write: hidden, never read
        files = set(os.listdir(ckpts / name))
        assert {"config.json", "model.safetensors", "trainer_state.safetensors", "trainer_state.json"} <= files
        load_file(ckpts / name / "model.safetensors")
        json.load(open(ckpts / name / "config.json"))
    if (out / "best").exists():
        load_file(out / "best" / "model.safetensors")
    if (out / "metrics.jsonl").exists():
        lines = (out / "metrics.jsonl").read_text().split("\n")
        for line in lines[:-1]:  # the complete lines (each ends in a newline)
            json.loads(line)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_moment_then_resume(setup, tmp_path, seed):
    args, ref, duration = setup
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, TRAIN, *args(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(seed).uniform(0.3, 1.0) * duration)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert_readable(out)
    r = subprocess.run([sys.executable, TRAIN, *args(out), "--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_equal_weights(final_weights(out), final_weights(ref))
    assert json.load(open(out / "summary.json"))["valid"] == json.load(open(ref / "summary.json"))["valid"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_a_checkpoint_and_exit_cleanly(setup, tmp_path, sig):
    args, ref, duration = setup
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, TRAIN, *args(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        time.sleep(0.05)  # training has started
        assert proc.poll() is None
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    line = err.strip().splitlines()[-1]
    assert f"{sig.name}: stopped after step" in line and "continue with --resume" in line
    step = int(line.split("after step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"step_{step}" / "trainer_state.json").exists()
    r = subprocess.run([sys.executable, TRAIN, *args(out), "--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_equal_weights(final_weights(out), final_weights(ref))
