"""Fine-tune ESM-2 on your labelled sequences (esm2lite-train, from a checkout). `python train.py
--help` for every option; with no arguments it runs the built-in demo (esm2lite/demo/README.md)."""

from esm2lite.cli import exit_process, run_main
from esm2lite.commands.train import main

if __name__ == "__main__":
    exit_process(run_main(lambda argv: main(argv, "python train.py")))
