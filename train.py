"""Fine-tune ESM-2 on your labelled sequences.  `python train.py --help` for every option;
with no arguments it runs the built-in demo (see esm2lite/demo/README.md)."""

import argparse
import os
import shutil
import sys

from esm2lite.commands.cli import OneLineParser, UsageError, add_options, options_to_config, run_main
from esm2lite.training.config import TrainConfig

DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "esm2lite", "demo")
DEMO_ARGS = ["--csv", os.path.join(DEMO_DIR, "demo.csv"), "--model", "esm2_t6_8M_UR50D", "--mode", "lora",
             "--steps", "50", "--eval-every", "25", "--lr", "1e-3", "--out", "runs/demo", "--seed", "0"]


def parser() -> argparse.ArgumentParser:
    """Every TrainConfig field is an option (help text beside the field, in train_config.py)."""
    p = OneLineParser(
        prog="python train.py",
        description="Fine-tune ESM-2 on a CSV of protein sequences and labels. Writes metrics.jsonl, "
                    "summary.json and checkpoints (best/ for prediction) to --out. "
                    "Run with no arguments for a one-minute demo.")
    add_options(p, TrainConfig)
    run = p.add_argument_group("running")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                     "(one that has none is started at step 0, and says so)")
    run.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


def main(argv):
    demo = not [a for a in argv if a != "--debug"]
    if demo:
        print("No arguments: running the demo (10 sequences, target = length/100, a small randomly "
              "initialised ESM-2 with LoRA, 50 steps). `python train.py --help` shows real usage.", flush=True)
        shutil.rmtree("runs/demo", ignore_errors=True)
        argv = DEMO_ARGS + argv
    p = parser()
    args = p.parse_args(argv)
    if not (args.train_csv or args.csv):
        p.error("give --train-csv (with optional --valid-csv/--test-csv) or --csv with a split column")
    try:
        cfg = options_to_config(TrainConfig, args)
    except UsageError as e:
        p.error(str(e))
    from esm2lite.training.loop import train_model

    result = train_model(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports
    s = result["summary"]
    chosen = f"by validation {s['best_metric']}" if s["best_metric"] else "the last step: no validation split"
    print(f"done: best step {s['best_step']} ({chosen}); checkpoint {result['checkpoint']}")
    for split in ("valid", "test"):
        if s[split]:
            print(f"  {split}: " + ", ".join(f"{k} {v:.4f}" for k, v in s[split].items()))
    written = [os.path.join(args.out, name) for name in ("metrics.jsonl", "summary.json", "predictions_valid.csv",
                                                          "predictions_test.csv", "plots")]
    print("wrote " + ", ".join(path for path in written if os.path.exists(path)))
    if demo:
        print("demo run written to runs/demo/ — now try `python infer.py`")


if __name__ == "__main__":
    sys.exit(run_main(main))
