"""One command for a lent GPU: install esm2lite, run the GPU tests and the benchmarks, and write
every result into one folder as it is measured.

    python benchmarks/gpu_check.py OUT                  # from the project root; OUT is created
    python benchmarks/gpu_check.py OUT --budget-s 480   # the whole run's hard time limit (default 8 min)
    python benchmarks/gpu_check.py OUT --smoke          # the same steps at toy sizes (runs on a CPU)

Made for a machine with a CUDA device, no network (pip is run with --no-index, the hubs offline),
and its own torch, triton, transformers and peft (fair-esm may be missing). The steps, in order:
  install      pip install --no-deps --no-build-isolation -e . ; if that fails or the package
               does not import, a folder of links to the checkout on PYTHONPATH instead
  gpu_tests    the `gpu` tests (the kernels against float64 at real sizes in bf16, fp16 and fp32;
               packed batches through varlen_attn against padded SDPA)
               in parallel shards sharing one Triton cache       -> gpu_tests.jsonl (a line per test)
  lora_linear  the fused LoRA linear at d = 1280/2560/5120, r = 16/8/64, 16384 tokens, against the
               base linear and the unfused path (d = 320: a launch-overhead row) -> lora_linear.json
  train        a LoRA fine-tuning step at 650M and 3B against transformers + peft -> train.json
  infer        inference at 650M and 3B, padded and packed, against transformers sdpa -> infer.json
Each step runs in its own process group under a hard limit (its share of the budget plus what
earlier steps left unused); at the limit the whole group is killed, spawned workers included, and
the next step starts. Benchmarks compile their kernels in parallel worker processes first and
rewrite their JSON after every row; gpu_check.json is rewritten after every step (status, time,
limit, headline, the device, versions, date and this command); every step's output is appended to
gpu_check.log. The last screen is a summary. Exit status 0 when every step passed.

Without CUDA (and without --smoke) it checks its arguments, says there is no GPU, and exits 0.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_TESTS = ("tests/kernels/test_kernels.py", "tests/model/test_attention.py")  # the files holding `gpu` tests
GRACE_S = 3.0      # between SIGTERM and SIGKILL of a step's process group
FINAL_S = 5.0      # kept back from the budget for the summary


@dataclass
class Step:
    """commands run at once, each in its own process group: (argv, extra environment) pairs;
    headline(out) reads the step's results into one line (or raises: 'no headline')."""
    name: str
    share: float
    commands: list
    headline: object = None
    ok_codes: tuple = (0,)


@dataclass
class Outcome:
    status: str             # ok, failed, killed, skipped
    rc: object = None
    seconds: float = 0.0
    limit_s: float = 0.0
    killed: int = 0         # processes its groups still held when it ended or hit its limit (all killed)
    headline: str = ""
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- process groups

def group_members(pgid: int) -> list[int]:
    """Live processes in process group pgid (Linux /proc; [] elsewhere)."""
    members = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            members.append(int(entry))
    return members


def kill_group(pgid: int) -> int:
    """SIGTERM the group, SIGKILL what is left after GRACE_S; returns how many were alive."""
    alive = len(group_members(pgid))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return alive
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline and group_members(pgid):
            time.sleep(0.1)
        if not group_members(pgid):
            return alive
    return alive


def run_commands(commands, limit_s: float, logs: list[str], env: dict) -> Outcome:
    """Start every command in its own session (so in its own process group), wait for all of them,
    then kill whatever is left in their groups: at the latest GRACE_S + 1 seconds before limit_s,
    so that the step, killing included, ends within its limit."""
    start = time.monotonic()
    run_s = max(0.0, limit_s - GRACE_S - 1)
    procs = []
    for (argv, extra), log in zip(commands, logs):
        with open(log, "ab") as f:
            f.write(f"$ {shlex.join(argv)}\n".encode())
            f.flush()
            procs.append(subprocess.Popen(argv, cwd=ROOT, env={**env, **extra}, stdin=subprocess.DEVNULL,
                                          stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
    killed = False
    for p in procs:
        try:
            p.wait(timeout=max(0.0, run_s - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            killed = True
            break
    left = sum(kill_group(p.pid) for p in procs)  # at the limit: everything; else what outlived its leader
    for p in procs:
        p.wait()
    return Outcome("killed" if killed else "ok", rc=[p.returncode for p in procs],
                   seconds=round(time.monotonic() - start, 1), limit_s=round(limit_s), killed=left)


# ----------------------------------------------------------------------------- the plan

def run_plan(plan: list[Step], out: str, deadline: float, budget_s: float, env: dict, report: dict, scratch: str,
             say=print) -> dict:
    """Run the steps in order until `deadline` (time.monotonic()), each step keeping its share of
    budget_s for itself and the later steps' shares for them; report["steps"] gets one entry per
    step and out/gpu_check.json is rewritten after each."""
    for i, step in enumerate(plan):
        reserved = sum(s.share for s in plan[i + 1:]) * budget_s   # the later steps' shares
        limit = deadline - time.monotonic() - reserved
        if limit < 1:
            outcome = Outcome("skipped", headline="no time left in the budget")
        else:
            logs = ([os.path.join(out, "gpu_check.log")] if len(step.commands) == 1 else
                    [os.path.join(scratch, f"{step.name}.{k}.log") for k in range(len(step.commands))])
            append(os.path.join(out, "gpu_check.log"), f"\n===== {step.name} (limit {limit:.0f} s) =====\n")
            outcome = run_commands(step.commands, limit, logs, env)
            if len(logs) > 1:  # shards wrote apart; their logs follow one another
                for log in logs:
                    with open(log, encoding="utf-8", errors="replace") as f:
                        append(os.path.join(out, "gpu_check.log"), f"--- {os.path.basename(log)}\n" + f.read())
            bad = [c for c in outcome.rc if c not in step.ok_codes]
            outcome.rc = bad[0] if bad else 0
            if outcome.status == "ok" and bad:
                outcome.status = "failed"
            outcome.headline = headline_of(step, out)
        record(report, step.name, outcome, out)
        say(f"gpu_check: {step.name}: {describe(outcome)}")
    return report


def headline_of(step: Step, out: str) -> str:
    if step.headline is None:
        return ""
    try:
        return step.headline(out)
    except Exception as e:  # a missing or partial results file
        return f"no results ({type(e).__name__}: {e})"


def describe(o: Outcome) -> str:
    what = {"ok": "ok", "failed": f"FAILED (exit {o.rc})", "killed": "KILLED at its limit",
            "skipped": "skipped"}[o.status]
    killed = f", {o.killed} process(es) killed" if o.killed else ""
    return f"{what} in {o.seconds:.0f} s of {o.limit_s:.0f}{killed}" + (f": {o.headline}" if o.headline else "")


def record(report: dict, name: str, o: Outcome, out: str) -> None:
    report["steps"] = [s for s in report["steps"] if s["step"] != name] + [
        {"step": name, "status": o.status, "rc": o.rc, "seconds": o.seconds, "limit_s": o.limit_s,
         "processes_killed": o.killed, "headline": o.headline, **o.extra}]
    report["seconds"] = round(time.time() - report["started"], 1)
    tmp = os.path.join(out, ".gpu_check.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, os.path.join(out, "gpu_check.json"))


def append(path: str, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def summary(report: dict) -> str:
    lines = [f"\ngpu_check summary: {report['device']}; python {report['versions']['python']}, torch "
             f"{report['versions'].get('torch')}, triton {report['versions'].get('triton')}; "
             f"{report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget",
             f"{'step':<12} {'status':<8} {'seconds':>8} {'limit':>6}  headline"]
    for s in report["steps"]:
        lines.append(f"{s['step']:<12} {s['status']:<8} {s['seconds']:>8.0f} {s['limit_s']:>6.0f}  {s['headline']}")
    failed = [s["step"] for s in report["steps"] if s["status"] != "ok"]
    lines.append(("FAILED: " + ", ".join(failed) if failed else "every step passed")
                 + f"; results in {report['out']}: " + " ".join(sorted(os.listdir(report["out"]))))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- install

def install(out: str, scratch: str, env: dict, limit_s: float, mode: str) -> Outcome:
    """pip's editable install (mode "pip"), checked by importing the package in a fresh process;
    on failure (or mode "links") a folder of links to the checkout goes first on PYTHONPATH."""
    log = os.path.join(out, "gpu_check.log")
    start = time.monotonic()
    append(log, f"\n===== install (limit {limit_s:.0f} s) =====\n")
    how = []
    if mode == "pip":
        pip = run_commands([([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                               "--no-index", "-e", ROOT], {})], limit_s / 2, [log], env)
        done = pip.status == "ok" and pip.rc == [0]
        how.append("pip editable install: " + ("ok" if done else f"{pip.status}, exit {pip.rc[0]}"))
        if done and imports(env, log, limit_s - (time.monotonic() - start)):
            return Outcome("ok", 0, round(time.monotonic() - start, 1), round(limit_s), headline="; ".join(how))
    site = link_package(scratch)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
    how.append(f"esm2lite from links to the checkout on PYTHONPATH ({site})")
    ok = imports(env, log, limit_s - (time.monotonic() - start))
    return Outcome("ok" if ok else "failed", 0 if ok else 1, round(time.monotonic() - start, 1), round(limit_s),
                   headline="; ".join(how) + ("" if ok else "; esm2lite does not import (see gpu_check.log)"))


def link_package(scratch: str) -> str:
    """scratch/site/esm2lite: a link to every file of the checkout's esm2lite/, and kernels/ linked
    in as esm2lite/kernels (what setup.py's package_dir does when installed)."""
    pkg = os.path.join(scratch, "site", "esm2lite")
    os.makedirs(pkg)
    for name in os.listdir(os.path.join(ROOT, "esm2lite")):
        if name != "__pycache__":
            os.symlink(os.path.join(ROOT, "esm2lite", name), os.path.join(pkg, name))
    os.symlink(os.path.join(ROOT, "kernels"), os.path.join(pkg, "kernels"))
    return os.path.dirname(pkg)


def imports(env: dict, log: str, limit_s: float) -> bool:
    code = ("import esm2lite, esm2lite.kernels.lora_fwd, esm2lite.kernels.lora_bwd; "
            "print('esm2lite imports from', esm2lite.__file__)")
    check = run_commands([([sys.executable, "-c", code], {})], max(limit_s, GRACE_S + 10), [log], env)
    return check.status == "ok" and check.rc == [0]


# ----------------------------------------------------------------------------- the GPU plan

def gpu_plan(out: str, smoke: bool) -> list[Step]:
    py = sys.executable
    bench = lambda name, *args: ([py, os.path.join(ROOT, "benchmarks", name), *map(str, args)], {})
    shards = 2 if smoke else max(1, min(12, (os.cpu_count() or 2) - 2))
    report = os.path.join(out, "gpu_tests.jsonl")
    tests = [([py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TESTS],
              {"ESM2LITE_TEST_SHARD": f"{k}/{shards}", "ESM2LITE_TEST_REPORT": report}) for k in range(shards)]
    if smoke:  # toy sizes: every step's plumbing, on any machine
        lora = bench("bench_lora_linear.py", "--dims", 64, "--ranks", 4, "--tokens", 64, "--out",
                     os.path.join(out, "lora_linear.json"))
        train = bench("bench_train.py", "--arch", "esm2_t6_8M_UR50D", "--warmup", 1, "--steps", 1,
                      "--batch-tokens", 256, "--min-len", 20, "--max-len", 60, "--out", os.path.join(out, "train.json"))
        infer = bench("bench_infer.py", "--arch", "esm2_t6_8M_UR50D", "--num-seqs", 2, "--min-len", 20, "--max-len", 40,
                      "--repeats", 1, "--impls", "esm2lite", "--out", os.path.join(out, "infer.json"))
    else:
        lora = bench("bench_lora_linear.py", "--out", os.path.join(out, "lora_linear.json"))
        train = bench("bench_train.py", "--arch", "esm2_t33_650M_UR50D", "esm2_t36_3B_UR50D", "--warmup", 3,
                      "--steps", 10, "--out", os.path.join(out, "train.json"))
        infer = bench("bench_infer.py", "--arch", "esm2_t33_650M_UR50D", "esm2_t36_3B_UR50D",
                      "--out", os.path.join(out, "infer.json"))
    json_headline = lambda name: lambda o: read_json(os.path.join(o, name))["headline"]
    return [  # shares of the budget (install: INSTALL_SHARE); each estimated for an H200 with 16 CPUs
        Step("gpu_tests", 0.16, tests, tests_headline(smoke), ok_codes=(0, 5)),  # 5: a shard with no tests
        Step("lora_linear", 0.20, [lora], json_headline("lora_linear.json")),
        Step("train", 0.38, [train], json_headline("train.json")),
        Step("infer", 0.18, [infer], json_headline("infer.json")),
    ]


INSTALL_SHARE = 0.08



def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def tests_headline(smoke: bool):
    def headline(out):
        results = []
        with open(os.path.join(out, "gpu_tests.jsonl"), encoding="utf-8") as f:
            results = [json.loads(line) for line in f if line.strip()]
        count = {}
        for r in results:
            count[r["outcome"]] = count.get(r["outcome"], 0) + 1
        failed = [r["test"].split("::")[-1] for r in results if r["outcome"] == "failed"]
        text = ", ".join(f"{n} {what}" for what, n in sorted(count.items())) or "no tests ran"
        if failed:
            text += ": " + ", ".join(failed[:3]) + (" ..." if len(failed) > 3 else "")
        if count.get("skipped") and not smoke:
            text += " (skipped on a GPU machine: the device is not visible)"
        return text
    return headline


# ----------------------------------------------------------------------------- command line

class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder for every result and log (created; must be empty if it exists)")
    p.add_argument("--budget-s", type=float, default=480.0, help="hard time limit of the whole run in seconds (default 480)")
    p.add_argument("--smoke", action="store_true", help="every step at toy sizes, on a GPU or a CPU (checks the plumbing)")
    p.add_argument("--install", choices=["pip", "links"], default="pip",
                   help="pip: editable install, links to the checkout if that fails (default); links: no pip")
    args = p.parse_args(argv)
    if not args.budget_s > FINAL_S + 1:
        p.error(f"--budget-s must be above {FINAL_S + 1:g} seconds, got {args.budget_s:g}")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        p.error(f"{args.out}: exists and is not an empty folder")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.access(parent, os.W_OK):
        p.error(f"{args.out}: cannot create it ({parent} is not writable)")
    return args


def versions() -> dict:
    import importlib.metadata as md
    found = {}
    for name in ("torch", "triton", "transformers", "peft", "fair-esm", "numpy", "safetensors", "setuptools"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return {"python": platform.python_version(), **found}


def device_name() -> tuple[str, list | None]:
    import torch
    if not torch.cuda.is_available():
        return f"no CUDA device ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)", None
    return torch.cuda.get_device_name(0), list(torch.cuda.get_device_capability(0))


def new_report(out: str, budget_s: float, device: str, capability, **settings) -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable, *sys.argv]), "device": device, "capability": capability,
            "versions": versions(), "budget_s": budget_s, **settings, "out": out, "started": time.time(),
            "seconds": 0.0, "steps": []}


def step_env(scratch: str) -> dict:
    """No network, one Triton cache for every step, unbuffered output, and (Python >= 3.11) no
    checkout folder put first on sys.path implicitly, so the linked package wins when it is used."""
    return {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1",
            "TRITON_CACHE_DIR": os.path.join(scratch, "triton")}


def main(argv=None) -> int:
    args = parse_args(argv)
    device, capability = device_name()
    if capability is None and not args.smoke:
        print(f"gpu_check: {device} here: nothing to run; run it on a machine with a GPU (or use --smoke)", flush=True)
        return 0
    os.makedirs(args.out, exist_ok=True)
    out = os.path.abspath(args.out)
    scratch = tempfile.mkdtemp(prefix="esm2lite-gpu-check-")
    report = new_report(out, args.budget_s, device, capability, smoke=args.smoke)
    try:
        env = step_env(scratch)
        plan = gpu_plan(out, args.smoke)
        deadline = time.monotonic() + args.budget_s - FINAL_S
        outcome = install(out, scratch, env, args.budget_s * INSTALL_SHARE, args.install)
        record(report, "install", outcome, out)
        print(f"gpu_check: install: {describe(outcome)}", flush=True)
        run_plan(plan, out, deadline, args.budget_s, env, report, scratch, say=lambda m: print(m, flush=True))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(summary(report), flush=True)
    return 0 if all(s["status"] == "ok" for s in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
