"""esm2lite-train (python train.py in a checkout): fine-tune ESM-2 on labelled sequences. Every
option is a TrainConfig field (training/config.py); with no arguments it runs the built-in demo."""

import os
import shlex

from esm2lite.checkpoints.run_dir import holds_a_run
from esm2lite.runtime.device import layout_line
from esm2lite.cli import (OneLineParser, UsageError, add_options, exit_process, options_to_config, run_main,
                          saved_options)
from esm2lite.errors import TrainingInterrupted
from esm2lite.files.atomic import remove_dir
from esm2lite.files.textfiles import read_json
from esm2lite.training.config import TrainConfig

PROG = "esm2lite-train"
DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo")
DEMO_OUT = os.path.join("runs", "demo")
DEMO_ARGS = ["--csv", os.path.join(DEMO_DIR, "demo.csv"), "--model", "esm2_t6_8M_UR50D", "--mode", "lora",
             "--steps", "60", "--eval-every", "20", "--lr", "3e-3", "--batch-tokens", "1024", "--out", DEMO_OUT,
             "--seed", "0"]
DEMO_SAYS = ("No arguments: running the demo. A small ESM-2 (the 8M architecture, randomly initialised: no "
             "download) with LoRA learns each sequence's GRAVY (mean Kyte-Doolittle hydropathy) from 96 made-up "
             "sequences in 60 steps, and is scored every 20 steps on 24 held-out ones: watch the validation "
             "loss fall and r2 rise. Under a minute on 2 CPU cores.")


def parser(prog: str = PROG) -> OneLineParser:
    """Every TrainConfig field is an option (help text beside the field, in training/config.py)."""
    p = OneLineParser(
        prog=prog,
        description="Fine-tune ESM-2 on a CSV of protein sequences and labels. Writes metrics.jsonl, "
                    "summary.json and checkpoints (best/ for prediction) to --out. "
                    "Run with no arguments for a one-minute demo.")
    add_options(p, TrainConfig)
    run = p.add_argument_group("running")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, "
                     "with the settings it was started with (only --out is needed; other options given must "
                     "match them, but a larger --steps or --epochs trains a run longer). A run that has no "
                     "checkpoint yet is started at step 0, and says so")
    run.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


def main(argv, prog: str = PROG) -> None:
    demo = not [a for a in argv if a != "--debug"]
    if demo:
        print(f"{DEMO_SAYS} `{prog} --help` shows real usage.", flush=True)
        if holds_a_run(DEMO_OUT):  # the previous demo run: ours to replace (anything else there is refused)
            remove_dir(DEMO_OUT)
        argv = DEMO_ARGS + argv
    p = parser(prog)
    args = p.parse_args(argv)
    if args.resume:
        args = continued(p, argv, args)
    if not (args.train_csv or args.csv):
        p.error("give --train-csv (with optional --valid-csv/--test-csv) or --csv with a split column"
                + (f" (--resume: {args.out} holds no run to take them from)" if args.resume else ""))
    try:
        cfg = options_to_config(TrainConfig, args)
    except UsageError as e:
        p.error(str(e))
    from esm2lite.training.loop import train_model  # after the options: --help and usage errors stay fast

    if args.debug and os.environ.get("RANK", "0") == "0":
        print(layout_line(cfg.batches, cfg.device), flush=True)

    try:
        result = train_model(cfg, resume=args.resume)
    except TrainingInterrupted as e:
        raise TrainingInterrupted(f"{e}; continue with: {continue_command(prog, args.out)}", e.signum) from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        report(result, args.out, demo, "python infer.py" if prog.startswith("python") else "esm2lite-infer")


def continued(p: OneLineParser, argv: list[str], args):
    """--resume on a run directory: the options the run was started with (its config.json), but for
    those given here. A given value that differs from the run's is refused when the run is checked
    (run_dir.Checkpointer), except a longer --steps or --epochs: the run continues to the new end."""
    if not holds_a_run(args.out):
        return args
    config = read_json(os.path.join(args.out, "config.json"))
    saved = saved_options(TrainConfig, config)
    if args.steps is not None or args.epochs is not None:  # the length given replaces the run's
        for name in ("steps", "epochs"):
            vars(saved).pop(name, None)
    ranks, was = int(os.environ.get("WORLD_SIZE", "1")), config.get("world_size")
    if isinstance(was, int) and was != ranks and isinstance(config.get("grad_accum"), int) \
            and config["grad_accum"] * was % ranks == 0:  # the same global batch on another number of ranks
        saved.grad_accum = config["grad_accum"] * was // ranks
        if "--grad-accum" not in argv and os.environ.get("RANK", "0") == "0":
            print(f"--resume: {args.out} ran on {was} rank(s), this on {ranks}: --grad-accum {saved.grad_accum} "
                  "keeps its batch per step", flush=True)
    return p.parse_args(argv, namespace=saved)


def continue_command(prog: str, out: str) -> str:
    """The command that continues the run in `out`, as this one was started (under torchrun: as many
    processes per node, on as many nodes)."""
    ranks, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    options = f"--out {shlex.quote(out)} --resume"
    if ranks == 1:
        return f"{prog} {options}"
    script = "train.py" if prog == "python train.py" else "-m esm2lite.commands.train"
    nodes = f"--nnodes {ranks // local} (and your rendezvous options) " if ranks > local else ""
    return f"torchrun {nodes}--nproc-per-node {local} {script} {options}"


def report(result: dict, out: str, demo: bool, infer: str) -> None:
    s = result["summary"]
    chosen = f"by validation {s['best_metric']}" if s["best_metric"] else "the last step: no validation split"
    print(f"done: best step {s['best_step']} ({chosen}); checkpoint {result['checkpoint']}")
    for split in ("valid", "test"):
        if s[split]:
            print(f"  {split}: " + ", ".join(f"{k} {v:.4f}" for k, v in s[split].items()))
    written = [os.path.join(out, name) for name in ("metrics.jsonl", "summary.json", "predictions_valid.csv",
                                                     "predictions_test.csv", "plots")]
    print("wrote " + ", ".join(path for path in written if os.path.exists(path)))
    if demo:
        print(f"demo run written to runs/demo/ — now try `{infer}`: it predicts five new sequences with it")


def console() -> None:
    """The esm2lite-train command."""
    exit_process(run_main(main))


if __name__ == "__main__":
    exit_process(run_main(lambda argv: main(argv, "python -m esm2lite.commands.train")))
