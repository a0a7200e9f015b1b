"""One command for a lent GPU: install esm2lite, run the GPU tests and the benchmarks, and write
every result into one folder.

    python benchmarks/gpu_check.py OUT_DIR                  # from the project root
    python benchmarks/gpu_check.py OUT_DIR --budget-s 480   # the whole run's time limit (default 8 min)

Made for a machine with a CUDA device, no internet, and its own torch (>= 2.4), triton (>= 3.6),
transformers 5.x and peft (fair-esm may be missing: the GPU tests do not need it). In order:
  1. pip install --no-deps --no-build-isolation -e .     (nothing is downloaded)
  2. the `gpu` tests of the kernels against float64        -> gpu_tests.xml, gpu_tests.log
  3. the fused LoRA linear on ESM-2 layer shapes            -> lora_linear.json
  4. a LoRA fine-tuning step at the 650M architecture, bf16, r=16 on all six linears,
     esm2lite vs transformers + peft                        -> train.json
  5. inference, esm2lite vs transformers                    -> infer.json
Each step has its own share of the budget and its log (<step>.log); gpu_check.json lists what ran,
its exit status and time, the device, the library versions, the date and this exact command.
Copy the JSON files into benchmarks/results/ to keep them.

Without CUDA it checks its own arguments, says that there is no GPU here, and exits 0.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def steps(out: str) -> list[tuple[str, float, list[str]]]:
    """(name, share of the budget, command) in order; time a step leaves unused goes to the next."""
    py = sys.executable
    bench = lambda name: os.path.join(ROOT, "benchmarks", name)
    return [
        ("install", 0.10, [py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", ROOT]),
        ("gpu_tests", 0.25, [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                             os.path.join(ROOT, "tests", "test_kernels.py"),
                             "--junitxml", os.path.join(out, "gpu_tests.xml")]),
        ("lora_linear", 0.25, [py, bench("bench_lora_linear.py"), "--dims", "320", "1280", "5120",
                               "--ranks", "16", "64", "--tokens", "16384", "--out", os.path.join(out, "lora_linear.json")]),
        ("train", 0.25, [py, bench("bench_train.py"), "--arch", "esm2_t33_650M_UR50D", "--precision", "bf16",
                         "--rank", "16", "--out", os.path.join(out, "train.json")]),
        ("infer", 0.15, [py, bench("bench_infer.py"), "--out", os.path.join(out, "infer.json")]),
    ]


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder for every result and log (created; must be empty if it exists)")
    p.add_argument("--budget-s", type=float, default=480.0, help="time limit of the whole run in seconds (default 480)")
    args = p.parse_args(argv)
    if not args.budget_s > 0:
        p.error(f"--budget-s must be positive, got {args.budget_s}")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        p.error(f"{args.out}: exists and is not an empty folder")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.access(parent, os.W_OK):
        p.error(f"{args.out}: cannot create it ({parent} is not writable)")
    return args


def run_step(name: str, command: list[str], timeout: float, out: str) -> dict:
    """Run one step with its log in out/<name>.log; never raises."""
    t0 = time.time()
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        try:
            rc = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return {"step": name, "command": shlex.join(command), "rc": rc, "seconds": round(time.time() - t0, 1),
            "timeout_s": round(timeout)}


def versions() -> dict:
    import importlib.metadata as md
    found = {}
    for name in ("torch", "triton", "transformers", "peft", "fair-esm", "numpy", "safetensors"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return {"python": platform.python_version(), **found}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}): nothing to run; "
              f"run it on a machine with a GPU", flush=True)
        return 0
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": shlex.join([sys.executable, *sys.argv]), "device": torch.cuda.get_device_name(0),
              "capability": list(torch.cuda.get_device_capability(0)), "versions": versions(), "steps": []}
    plan = steps(os.path.abspath(args.out))
    for i, (name, _, command) in enumerate(plan):
        reserved = sum(share for _, share, _ in plan[i + 1:]) * args.budget_s  # the later steps' shares
        left = args.budget_s - (time.time() - start) - reserved
        result = run_step(name, command, max(1.0, left), args.out)
        report["steps"].append(result)
        print(f"gpu_check: {name}: rc {result['rc']} in {result['seconds']} s", flush=True)
    report["seconds"] = round(time.time() - start, 1)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    failed = [s["step"] for s in report["steps"] if s["rc"] != 0]
    print(f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'all steps passed'}; "
          f"{report['seconds']} s; results in {args.out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
