"""Interrupted training: SIGKILL at random moments, SIGTERM/SIGINT; resume gives exactly the
weights of an uninterrupted run, and no reader sees a half-written checkpoint."""

import concurrent.futures
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import oracles
from esm2lite import load_pretrained

pytestmark = pytest.mark.slow
TRAIN = str(Path(__file__).resolve().parents[2] / "train.py")
STEPS = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory, hf_tiny, forkrun):
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
    assert r.returncode == 0, r.stderr[-2000:]  # a fresh process: its duration is what the kills below sample
    return args, ref, time.time() - t0


def final_weights(out, steps=STEPS):
    return load_file(out / "checkpoints" / f"step_{steps}" / "model.safetensors")


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
def test_sigkill_at_a_random_moment_then_resume(setup, tmp_path, seed, forkrun):
    args, ref, duration = setup
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, TRAIN, *args(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(seed).uniform(0.3, 1.0) * duration)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert_readable(out)
    r = forkrun.run([TRAIN, *args(out), "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert_equal_weights(final_weights(out), final_weights(ref))
    assert json.load(open(out / "summary.json"))["valid"] == json.load(open(ref / "summary.json"))["valid"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_a_checkpoint_and_exit_cleanly(setup, tmp_path, sig, forkrun):
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
    assert f"{sig.name}: stopped after step" in line, line
    step = int(line.split("after step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"step_{step}" / "trainer_state.json").exists()
    command = line.split("; continue with: ")[1]  # the exact command, which needs only --out
    assert shlex.split(command) == ["python", "train.py", "--out", str(out), "--resume"], command
    r = forkrun.run([TRAIN, *shlex.split(command)[2:]])
    assert r.returncode == 0, r.stderr[-2000:]
    assert_equal_weights(final_weights(out), final_weights(ref))


# ---------------------------------------------------------------- a kill before and after every rename

KILL = """
import os, runpy, signal, sys
k, phase, log, root = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
real, count = os.replace, [0]

def replace(src, dst, *args, **kwargs):
    count[0] += 1
    if count[0] == k and phase == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst, *args, **kwargs)
    if count[0] == k and phase == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    if phase == "count":
        with open(log, "a") as f:
            f.write(f"{os.path.relpath(src, root)} -> {os.path.relpath(dst, root)}\\n")

os.replace = replace
sys.argv = sys.argv[5:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, hf_tiny, forkrun):
    """A 4-step LoRA run whose files see every kind of rename: config and log, two step checkpoints,
    a new best/, best/ replaced (the loss improves), a pruned step, the summary. Returns the
    arguments, the uninterrupted run and its renames, in order."""
    d = tmp_path_factory.mktemp("kill")
    seqs = oracles.random_sequences(40, 15, 50, seed=4, with_mask=False)
    with open(d / "d.csv", "w") as f:
        f.write("sequence,target,split\n")
        for i, s in enumerate(seqs):
            split = "train" if i < 30 else "valid" if i < 35 else "test"
            f.write(f"{s},{(s.count('K') + s.count('R')) / len(s)},{split}\n")
    args = lambda out: ["--csv", str(d / "d.csv"), "--checkpoint", hf_tiny, "--steps", "4", "--batch-tokens", "300",  # noqa: E731
                        "--lr", "3e-3", "--eval-every", "2", "--save-every", "2", "--log-every", "1",
                        "--lora-dropout", "0.1", "--seed", "5", "--keep-last", "1", "--best-metric", "loss",
                        "--device", "cpu", "--out", str(out)]
    ref, log = d / "reference", d / "renames.txt"
    r = forkrun.run(["-c", KILL, "0", "count", log, ref, TRAIN, *args(ref)], cwd=d)
    assert r.returncode == 0, r.stderr[-2000:]
    return args, ref, log.read_text().splitlines()


def run_files(out):
    """What a finished run holds, for comparison: tensors of the last step checkpoint and of best/,
    best/'s step, the summary (but its wall time), the log (but throughput) and the predictions."""
    summary = json.load(open(out / "summary.json"))
    log = [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in open(out / "metrics.jsonl")]
    return {"steps": sorted(os.listdir(out / "checkpoints")), "final": final_weights(out, 4),
            "best": load_file(out / "best" / "model.safetensors"),
            "best_step": json.load(open(out / "best" / "config.json"))["step"],
            "summary": {k: v for k, v in summary.items() if k != "wall_time_s"}, "log": log,
            "predictions": [(out / f"predictions_{s}.csv").read_text() for s in ("valid", "test")]}


def kill_then_resume(forkrun, args, out, k, phase) -> str | None:
    """None when the resumed run ends exactly as the uninterrupted one; else what differs. Each
    run is its own process (tests/forkrun.py: forked from one that imported torch once)."""
    killed = forkrun.run(["-c", KILL, k, phase, "-", out, TRAIN, *args(out)], cwd=out.parent)
    if killed.returncode != -signal.SIGKILL:
        return f"not killed (exit {killed.returncode}): {killed.stderr[-500:]}"
    r = forkrun.run([TRAIN, *args(out), "--resume"], cwd=out.parent)
    if r.returncode != 0:
        return f"--resume failed: {r.stderr.strip().splitlines()[-1:]}"
    hidden = [p.name for p in [*out.iterdir(), *(out / "checkpoints").iterdir()] if p.name.startswith(".")]
    return None if hidden == [".lock"] else f"left behind: {hidden}"


def differences(a: dict, b: dict) -> list[str]:
    out = [k for k in ("steps", "best_step", "summary", "log", "predictions") if a[k] != b[k]]
    for k in ("final", "best"):
        if a[k].keys() != b[k].keys() or any(not (a[k][t] == b[k][t]).all() for t in a[k]):
            out.append(k)
    return out


def test_sigkill_before_and_after_every_rename_then_resume(short_run, tmp_path, forkrun):
    """SIGKILL just before and just after each rename of a run (os.replace patched in the child), then
    --resume: the same final weights, best/ (weights and step), step checkpoints, summary and log
    (no duplicate steps) as the uninterrupted run, and no temporary files left."""
    args, ref, renames = short_run
    assert len(renames) == 12 and renames[-1].endswith("-> summary.json"), renames
    assert [r.split(" -> ")[1] for r in renames[8:11]] == ["predictions_valid.csv", "predictions_test.csv",
                                                           "plots"], renames
    assert any(r.startswith("best -> ") for r in renames) and any(".old/x" in r for r in renames[7:8]), renames
    want = run_files(ref)
    points = [(k, phase) for k in range(1, len(renames) + 1) for phase in ("before", "after")]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outs = {p: tmp_path / f"{p[1]}_{p[0]}" for p in points}
        results = dict(zip(points, pool.map(lambda p: kill_then_resume(forkrun, args, outs[p], *p), points)))
    failures = {f"{phase} {renames[k - 1]}": why for (k, phase), why in results.items() if why}
    failures.update({f"{phase} {renames[k - 1]}": differences(run_files(outs[k, phase]), want)
                     for (k, phase), why in results.items() if not why and differences(run_files(outs[k, phase]), want)})
    assert not failures, failures


# ---------------------------------------------------------------- two runs, one directory


def test_a_second_run_on_the_same_out_is_refused_naming_the_holder(setup, tmp_path, forkrun):
    """While a run works in --out, a second train.py there (fresh or --resume) exits 2 with one line
    naming the first one's pid, and changes nothing; the first finishes as if alone."""
    args, ref, _ = setup
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, TRAIN, *args(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    while not (out / "metrics.jsonl").exists():  # the first run holds the directory
        time.sleep(0.01)
        assert first.poll() is None, first.stderr.read()[-2000:]
    first.send_signal(signal.SIGSTOP)  # paused, still holding it, while the others try
    try:
        for extra in ([], ["--resume"]):
            r = forkrun.run([TRAIN, *args(out), *extra])
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
            assert lines[0].startswith(f"error: {out}: in use by train.py (pid {first.pid} on "), lines[0]
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert_equal_weights(final_weights(out), final_weights(ref))
    steps = [(r["step"], r["split"]) for r in map(json.loads, open(out / "metrics.jsonl"))]
    assert steps == [(r["step"], r["split"]) for r in map(json.loads, open(ref / "metrics.jsonl"))]


def test_a_start_that_never_reached_a_checkpoint_leaves_out_reusable(setup, tmp_path, forkrun):
    """A run that fails before its first checkpoint (here every target is 1e38: the loss overflows
    at step 1) leaves --out usable: a fresh start there works, and so does --resume with other
    settings, which starts from the beginning, exactly as a run in an empty directory."""
    args, ref, _ = setup
    data = Path(args(ref)[1])
    lines = data.read_text().splitlines()
    overflow = tmp_path / "overflow.csv"
    overflow.write_text("\n".join([lines[0]] + [",".join([s, "1e38", split]) for s, _, split in
                                                 (line.split(",") for line in lines[1:])]) + "\n")
    for extra in ([], ["--resume"]):
        out = tmp_path / f"run{len(extra)}"
        bad = args(out)
        bad[1] = str(overflow)
        r = forkrun.run([TRAIN, *bad])
        assert r.returncode == 2 and "non-finite training loss at step 1" in r.stderr, r.stderr[-2000:]
        assert (out / "config.json").exists() and not (out / "checkpoints").exists()
        r = forkrun.run([TRAIN, *args(out), *extra])
        assert r.returncode == 0, r.stderr[-2000:]
        assert_equal_weights(final_weights(out), final_weights(ref))


# ---------------------------------------------------------------- inputs that change under a run (issue 25 B)


def own_inputs(short_run, tmp_path, hf_tiny):
    """short_run's arguments on the test's own copies of the data file and the base model (so that
    they can be changed), and those copies."""
    args, _, _ = short_run
    data, base = tmp_path / "d.csv", tmp_path / "base"
    shutil.copy(args(tmp_path)[1], data)
    shutil.copytree(hf_tiny, base)
    ours = {args(tmp_path)[1]: str(data), hf_tiny: str(base)}
    return (lambda out: [ours.get(a, a) for a in args(out)]), data, base


def snapshot(out):
    """Every file of a run directory and its bytes (what a refused --resume must leave as it was)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_inputs_changed_between_a_kill_and_resume_are_refused(short_run, tmp_path, forkrun, hf_tiny):
    """SIGKILL after the first step checkpoint; then the training CSV edited, rows deleted, the base
    model's weights replaced, its config.json changed: each --resume exits 2 with one line naming the
    file or the base and what changed, and leaves the run directory as it was. With the inputs
    restored, --resume ends exactly as the uninterrupted run, every checkpoint naming one base."""
    args, data, base = own_inputs(short_run, tmp_path, hf_tiny)
    _, ref, renames = short_run
    k = next(i for i, r in enumerate(renames, 1) if r.endswith("-> checkpoints/step_2"))
    out = tmp_path / "run"
    killed = forkrun.run(["-c", KILL, k, "after", "-", out, TRAIN, *args(out)], cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    before, csv, weights = snapshot(out), data.read_bytes(), (base / "model.safetensors").read_bytes()
    lines = csv.splitlines(keepends=True)
    config = json.loads((base / "config.json").read_text())
    other = tmp_path / "other"
    oracles.make_hf_checkpoint(other, **oracles.TINY, seed=3)
    changes = [  # (what is done to the inputs, what the error line must say)
        (lambda: data.write_bytes(csv.replace(b",train\n", b"1,train\n", 1)),
         f"{data}: changed since this run started (was sha256 "),
        (lambda: data.write_bytes(b"".join(lines[:1] + lines[3:])), ", train 28 rows, valid 5 rows, test 5 rows)"),
        (lambda: shutil.copy(other / "model.safetensors", base / "model.safetensors"),
         f"{base}: base model encoder weights differ from the ones this run started with (sha256 "),
        (lambda: (base / "config.json").write_text(json.dumps({**config, "token_dropout": False})),
         f"{base}: base model config differs from the one this run started with (token_dropout is False, was True)"),
    ]
    for change, expected in changes:
        data.write_bytes(csv)
        (base / "model.safetensors").write_bytes(weights)
        (base / "config.json").write_text(json.dumps(config))
        change()
        r = forkrun.run([TRAIN, *args(out), "--resume"], cwd=tmp_path)
        errors = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(errors) == 1 and expected in errors[0], r.stderr[-2000:]
        assert errors[0].startswith("error: ") and "restore it, or start a new run in another --out" in errors[0]
        assert snapshot(out) == before
    data.write_bytes(csv)
    (base / "model.safetensors").write_bytes(weights)
    (base / "config.json").write_text(json.dumps(config))
    r = forkrun.run([TRAIN, *args(out), "--resume"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not differences(run_files(out), run_files(ref))
    shas = {json.loads((ckpt / "config.json").read_text())["base"]["sha256"]
            for ckpt in [out / "best", *(out / "checkpoints").iterdir()]}
    assert len(shas) == 1, shas


EDIT = """
import os, runpy, sys
k, path = int(sys.argv[1]), sys.argv[2]
real, count = os.replace, [0]

def replace(src, dst, *args, **kwargs):
    real(src, dst, *args, **kwargs)
    count[0] += 1
    if count[0] == k:  # the data file edited while the run works: a row appended
        with open(path, "rb") as f:
            last = f.read().splitlines(keepends=True)[-1]
        with open(path, "ab") as f:
            f.write(last)

os.replace = replace
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_data_file_edited_during_the_run_stops_it(short_run, tmp_path, forkrun, hf_tiny):
    """The training CSV edited while the run trains (just after its first step checkpoint is in place):
    the run stops at that checkpoint with exit 2 and one line naming the file; with the file restored,
    --resume ends exactly as the uninterrupted run."""
    args, data, _ = own_inputs(short_run, tmp_path, hf_tiny)
    _, ref, renames = short_run
    k = next(i for i, r in enumerate(renames, 1) if r.endswith("-> checkpoints/step_2"))
    out, csv = tmp_path / "run", data.read_bytes()
    r = forkrun.run(["-c", EDIT, k, data, TRAIN, *args(out)], cwd=tmp_path)
    errors = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
    assert errors[0].startswith(f"error: {data}: changed while this run was using it (sha256 "), errors[0]
    assert (out / "checkpoints" / "step_2").is_dir() and not (out / "summary.json").exists()
    data.write_bytes(csv)
    r = forkrun.run([TRAIN, *args(out), "--resume"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not differences(run_files(out), run_files(ref))


def rewritten(ckpt, name, edit):
    """One JSON file of a checkpoint edited as an older esm2lite would have written it, its SHA256SUMS
    line updated to vouch for it."""
    path = ckpt / name
    path.write_text(json.dumps(edit(json.loads(path.read_text())), indent=2))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    sums = (ckpt / "SHA256SUMS").read_text().splitlines()
    (ckpt / "SHA256SUMS").write_text("".join(f"{digest}  {name}\n" if line.endswith(f"  {name}") else line + "\n"
                                             for line in sums))


def test_a_run_of_an_older_version_still_resumes(short_run, tmp_path, forkrun, hf_tiny):
    """A last step checkpoint without the data record and with the older base hash (LM head included), as
    esm2lite wrote them before: --resume continues, says in one line that the data files are not compared,
    and the run's checkpoints keep naming the base as they did."""
    from test_base_hash import sha256_v1


    args, ref, renames = short_run
    k = next(i for i, r in enumerate(renames, 1) if r.endswith("-> checkpoints/step_2"))
    out = tmp_path / "run"
    killed = forkrun.run(["-c", KILL, k, "after", "-", out, TRAIN, *args(out)], cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    last = out / "checkpoints" / "step_2"
    old_sha = sha256_v1(load_pretrained(hf_tiny).state_dict())
    rewritten(last, "trainer_state.json", lambda state: {k: v for k, v in state.items() if k != "data"})
    rewritten(last, "config.json", lambda cfg: {**cfg, "base": {**cfg["base"], "sha256": old_sha}})
    r = forkrun.run([TRAIN, *args(out), "--resume"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"note: {last} was written before esm2lite recorded the data files a run reads" in r.stdout
    for ckpt in (out / "checkpoints" / "step_4", out / "best"):  # written by the resumed run
        assert json.loads((ckpt / "config.json").read_text())["base"]["sha256"] == old_sha
    assert not differences(run_files(out), run_files(ref))
