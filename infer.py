"""Predict with a fine-tuned ESM-2, compute embeddings, or score variants zero-shot (esm2lite-infer,
from a checkout). `python infer.py --help` for every option; with no arguments it predicts the demo
sequences with runs/demo/best (training it first)."""

from esm2lite.cli import exit_process, run_main
from esm2lite.commands.infer import main

if __name__ == "__main__":
    exit_process(run_main(lambda argv: main(argv, "python infer.py")))
