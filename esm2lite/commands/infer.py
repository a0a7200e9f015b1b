"""esm2lite-infer (python infer.py in a checkout): predict with a fine-tuned ESM-2, write embeddings,
or score variants zero-shot. Every option is an InferConfig field (inference/config.py); with no
arguments it predicts the demo sequences with runs/demo/best (training it first)."""

import os
import subprocess
import sys

from esm2lite.runtime.cpu_memory import keep_freed_memory
from esm2lite.runtime.device import layout_line, pick_device
from esm2lite.cli import OneLineParser, exit_process, UsageError, add_options, options_to_config, run_main
from esm2lite.errors import Esm2liteError
from esm2lite.inference.config import InferConfig

PROG = "esm2lite-infer"
DEMO_FASTA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", "predict.fasta")


def parser(prog: str = PROG) -> OneLineParser:
    p = OneLineParser(
        prog=prog,
        description="Predict with a model from train.py (a CSV of predictions in input order, with the input's "
                    "other columns, and the task's metrics when the input holds its labels), write embeddings "
                    "(proteins of any length), or score variants with a pretrained ESM-2 and no labels (--score). "
                    "Run with no arguments for the demo.")
    add_options(p, InferConfig)
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


def demo_args() -> list[str]:
    """The demo: predict the demo FASTA with runs/demo/best, training the demo first when it is missing."""
    if not os.path.exists(os.path.join("runs", "demo", "best", "config.json")):
        print("runs/demo/best not found: training the demo first (esm2lite-train)", flush=True)
        if subprocess.run([sys.executable, "-m", "esm2lite.commands.train"]).returncode != 0:
            raise Esm2liteError("the demo training failed; see its output above")
    return ["--run", os.path.join("runs", "demo"), "--input", DEMO_FASTA,
            "--output", os.path.join("runs", "demo", "predictions.csv")]


def main(argv, prog: str = PROG) -> None:
    demo = not [a for a in argv if a != "--debug"]
    p = parser(prog)
    args = p.parse_args(demo_args() + argv if demo else argv)
    try:
        cfg = options_to_config(InferConfig, args)
        cfg.check()
    except UsageError as e:
        p.error(str(e))
    from esm2lite.inference.pipeline import run  # after the options: --help and usage errors stay fast

    if args.debug and os.environ.get("RANK", "0") == "0" and not cfg.score:
        print(layout_line(cfg.batches, cfg.device), flush=True)
    if pick_device(cfg.device).type == "cpu":
        keep_freed_memory()  # freed activations reused, not unmapped and faulted in again at every op
    run(cfg, demo)


def console() -> None:
    """The esm2lite-infer command."""
    exit_process(run_main(main))


if __name__ == "__main__":
    exit_process(run_main(lambda argv: main(argv, "python -m esm2lite.commands.infer")))
