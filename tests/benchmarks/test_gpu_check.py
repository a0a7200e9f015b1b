"""benchmarks/gpu_check.py, the one command for a lent GPU, as far as a machine without CUDA can run it:
its arguments, its orchestration (hard limits that kill whole process groups, results kept as they
come, the summary) with steps made to misbehave, and every real step at toy sizes (--smoke)."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args, timeout=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU it would run the whole check")
def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    out = tmp_path / "gpu"
    r = run(out, "--budget-s", 60)
    assert r.returncode == 0, r.stderr
    assert "no CUDA device" in r.stdout and "--smoke" in r.stdout
    assert not out.exists()  # nothing written, nothing installed


@pytest.mark.parametrize("args,message", [
    ((), "the following arguments are required: out"),
    (("{file}",), "exists and is not an empty folder"),
    (("{full}",), "exists and is not an empty folder"),
    (("{new}", "--budget-s", "0"), "--budget-s must be above"),
    (("{new}", "--budget-s", "soon"), "invalid float value"),
    (("{new}", "--install", "conda"), "invalid choice"),
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


def test_the_device_plan_fits_its_budget_and_its_scripts_take_its_arguments(tmp_path, monkeypatch):
    """Each step's command line is parsed by its own script's parser here, so a mistyped option
    cannot cost the device run a step."""
    import importlib

    gc = load_gpu_check()
    monkeypatch.syspath_prepend(str(ROOT))
    for smoke in (False, True):
        plan = gc.gpu_plan(str(tmp_path), smoke)
        assert abs(gc.INSTALL_SHARE + sum(s.share for s in plan) - 1) < 1e-9
        for step in plan:
            for argv, env in step.commands:
                if argv[1:3] == ["-m", "pytest"]:
                    assert "-m" in argv[3:] and argv[argv.index("-m", 3) + 1] == "gpu" and env["ESM2LITE_TEST_REPORT"]
                    continue
                script = Path(argv[1])
                assert script.parent == ROOT / "benchmarks" and script.exists(), argv
                module = importlib.import_module(f"benchmarks.{script.stem}")
                args = module.parse_args(argv[2:])
                assert Path(args.out).parent == tmp_path  # every result lands in OUT


# Steps that misbehave. Each is `python -c CODE PIDFILE`; a spawned grandchild writes its pid there.
SPAWN = ("import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
         "'import os, sys, time; open(sys.argv[1], \"w\").write(str(os.getpid())); time.sleep(600)', sys.argv[1]]); "
         "import time; time.sleep(1)")
HANG = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " + SPAWN + "; time.sleep(600)"  # needs SIGKILL
ORPHAN = SPAWN  # exits 0 at once, leaving its grandchild behind in its process group
RESULT = "import json, sys; json.dump({'headline': 'measured 42'}, open(sys.argv[1], 'w'))"
FAIL = "import sys; print('something went wrong'); sys.exit(3)"


def test_a_hung_step_is_killed_with_its_children_and_the_others_keep_their_results(tmp_path):
    gc = load_gpu_check()
    gc.GRACE_S = 1.0  # SIGTERM -> SIGKILL (3 s on the device; shorter here to keep the test short)
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    out.mkdir()
    scratch.mkdir()
    py = sys.executable
    step = lambda name, code, arg, **kw: gc.Step(name, 0.25, [([py, "-c", code, str(arg)], {})], **kw)
    plan = [
        step("hang", HANG, tmp_path / "hang.pid"),
        step("orphan", ORPHAN, tmp_path / "orphan.pid"),
        step("result", RESULT, out / "result.json",
             headline=lambda o: json.loads((Path(o) / "result.json").read_text())["headline"]),
        step("fails", FAIL, "-"),
    ]
    budget = 16.0
    report = gc.new_report(str(out), budget, "test", None)
    said = []
    start = time.monotonic()
    gc.run_plan(plan, str(out), start + budget, budget, dict(os.environ), report, str(scratch), say=said.append)
    elapsed = time.monotonic() - start

    # the hung step got what the later steps' shares left (16 - 3 x 4 = 4 s), TERM and KILL included
    assert elapsed < budget, elapsed
    steps = {s["step"]: s for s in report["steps"]}
    assert [s["step"] for s in report["steps"]] == ["hang", "orphan", "result", "fails"]
    assert steps["hang"]["status"] == "killed" and steps["hang"]["processes_killed"] == 2  # leader + grandchild
    assert 3 <= steps["hang"]["seconds"] <= 4.5
    assert steps["orphan"]["status"] == "ok" and steps["orphan"]["processes_killed"] == 1
    assert steps["result"]["status"] == "ok" and steps["result"]["headline"] == "measured 42"
    assert steps["fails"]["status"] == "failed" and steps["fails"]["rc"] == 3
    for name in ("hang", "orphan"):
        pid = int((tmp_path / f"{name}.pid").read_text())
        assert not alive(pid), f"the {name} step's grandchild {pid} outlived its step"
    # every result as it came: the JSON on disk holds all four steps, the log every step's output
    assert json.loads((out / "gpu_check.json").read_text())["steps"] == report["steps"]
    log = (out / "gpu_check.log").read_text()
    assert all(f"===== {name} " in log for name in steps) and "something went wrong" in log
    assert said[0].startswith("gpu_check: hang: KILLED at its limit")
    table = gc.summary(report)
    assert "FAILED: hang, fails" in table and "result.json" in table


@pytest.mark.slow
def test_smoke_runs_every_step_of_the_device_command(tmp_path):
    """The real steps at toy sizes on this CPU, with esm2lite taken from the links fallback (no pip):
    the plumbing the device run depends on, end to end."""
    out = tmp_path / "smoke"
    r = run(out, "--smoke", "--install", "links", "--budget-s", 400, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["install", "gpu_tests", "lora_linear", "train", "infer"]
    assert all(s["status"] == "ok" for s in report["steps"]), report["steps"]
    assert "links to the checkout" in report["steps"][0]["headline"]
    log = (out / "gpu_check.log").read_text()
    assert f"esm2lite imports from {tempfile_root()}" in log  # the linked package, not the checkout's folder
    tests = [json.loads(line) for line in (out / "gpu_tests.jsonl").read_text().splitlines()]
    assert tests and all(t["outcome"] == "skipped" for t in tests)  # no CUDA here
    assert sorted(t["test"] for t in tests) == gpu_test_ids()  # the shards split the tests: each ran once
    for name in ("lora_linear", "train", "infer"):
        doc = json.loads((out / f"{name}.json").read_text())
        assert doc["headline"] and "error" not in json.dumps(doc["results" if "results" in doc else "rows"])
    assert "every step passed" in r.stdout and len(r.stdout.splitlines()[-1]) < 300
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_tests.jsonl",
                                                     "infer.json", "lora_linear.json", "train.json"]


def gpu_test_ids() -> list[str]:
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                        "tests"], capture_output=True, text=True, cwd=ROOT)  # every gpu test of the suite
    ids = sorted(line for line in r.stdout.splitlines() if "::" in line)
    assert ids, r.stdout
    return ids


def tempfile_root() -> str:
    import tempfile
    return tempfile.gettempdir()
