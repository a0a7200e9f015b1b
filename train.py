"""Fine-tune ESM-2 on your labelled sequences.  `python train.py --help` for every option;
with no arguments it runs the built-in demo (see esm2lite/demo/README.md)."""

import argparse
import os
import shutil
import sys

from esm2lite.cli import OneLineParser, run_main
from esm2lite.lora import LoRAConfig

DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "esm2lite", "demo")
DEMO_ARGS = ["--csv", os.path.join(DEMO_DIR, "demo.csv"), "--model", "esm2_t6_8M_UR50D", "--mode", "lora",
             "--steps", "50", "--eval-every", "25", "--lr", "1e-3", "--out", "runs/demo", "--seed", "0"]


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python train.py",
        description="Fine-tune ESM-2 on a CSV of protein sequences and labels. Writes metrics.jsonl, "
                    "summary.json and checkpoints (best/ for prediction) to --out. "
                    "Run with no arguments for a one-minute demo.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--train-csv", help="CSV of training rows")
    d.add_argument("--valid-csv", help="CSV of validation rows (model selection)")
    d.add_argument("--test-csv", help="CSV of test rows (scored once, at the end, with the best checkpoint)")
    d.add_argument("--csv", help="one CSV holding all rows, with a split column (train/valid/test)")
    d.add_argument("--split-column", default="split", help="with --csv: the column naming each row's split")
    d.add_argument("--sequence-column", default="sequence", help="column holding the amino-acid sequence")
    d.add_argument("--target-column", default=["target"], nargs="+",
                   help="column(s) to predict; several for multi-target regression")
    d.add_argument("--mask-column", help="token-classification: per-residue 1/0 string, 0 = ignore residue")
    d.add_argument("--task", default="regression", choices=["regression", "classification", "token-classification"],
                   help="regression: a number per sequence; classification: a class per sequence; "
                        "token-classification: a label per residue (e.g. HHHEEECCC)")
    d.add_argument("--max-residues", type=int, default=1022, help="longest sequence allowed")
    d.add_argument("--truncate", action="store_true", help="cut longer sequences instead of stopping with an error")
    d.add_argument("--standardize-targets", action="store_true",
                   help="regression: train on z-scored targets (undone at prediction)")
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", help="pretrained ESM-2: HF directory, fair-esm .pt, or hub id "
                                        "(e.g. facebook/esm2_t33_650M_UR50D)")
    m.add_argument("--model", help="architecture name to train from RANDOM weights (e.g. esm2_t6_8M_UR50D)")
    m.add_argument("--mode", default="lora", choices=["lora", "full", "head"],
                   help="lora: adapters + head train; full: everything trains; head: only the head trains")
    m.add_argument("--lora-rank", type=int, default=LoRAConfig.rank)
    m.add_argument("--lora-alpha", type=float, default=LoRAConfig.alpha)
    m.add_argument("--lora-dropout", type=float, default=LoRAConfig.dropout)
    m.add_argument("--lora-targets", nargs="+", default=list(LoRAConfig.targets),
                   help="which linears get adapters: query key value out fc1 fc2")
    m.add_argument("--head-hidden", type=int, default=256, help="hidden width of the head's MLP")
    m.add_argument("--head-dropout", type=float, default=0.25)
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, help="optimizer steps (or give --epochs)")
    o.add_argument("--epochs", type=float, help="passes over the training data (or give --steps)")
    o.add_argument("--batch-tokens", type=int, default=8192, help="tokens per batch, padding included")
    o.add_argument("--lr", type=float, default=4e-4, help="peak learning rate")
    o.add_argument("--head-lr-mult", type=float, default=1.0, help="head LR = lr * this")
    o.add_argument("--weight-decay", type=float, default=0.01)
    o.add_argument("--warmup-steps", type=int, default=0)
    o.add_argument("--schedule", default="cosine", choices=["cosine", "constant"], help="LR after warmup")
    o.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    o.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    o.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in backward: less memory for long sequences / big models")
    o.add_argument("--skip-nonfinite", action="store_true",
                   help="skip batches with a NaN/inf loss (counted in metrics) instead of stopping")
    r = p.add_argument_group("evaluation and output")
    r.add_argument("--eval-every", type=int, help="validate every N steps (default: 5 times per run)")
    r.add_argument("--save-every", type=int, help="checkpoint every N steps (default: at each evaluation)")
    r.add_argument("--log-every", type=int, default=10, help="write a train line to metrics.jsonl every N steps")
    r.add_argument("--keep-last", type=int, default=2, help="step checkpoints to keep (best/ is kept apart)")
    r.add_argument("--best-metric", help="validation metric choosing best/ (default: spearman or accuracy)")
    r.add_argument("--out", default="runs/esm2lite", help="output directory")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


def config_from_args(a):
    from esm2lite.train import TrainConfig

    try:
        lora = LoRAConfig(rank=a.lora_rank, alpha=a.lora_alpha, dropout=a.lora_dropout, targets=tuple(a.lora_targets))
    except ValueError as e:  # "LoRAConfig.rank = 0: must be ..." -> "--lora-rank = 0: must be ..."
        parser().error(str(e).replace("LoRAConfig.", "--lora-"))
    return TrainConfig(
        task=a.task, train_csv=a.train_csv, valid_csv=a.valid_csv, test_csv=a.test_csv, csv=a.csv,
        split_column=a.split_column, sequence_column=a.sequence_column, target_columns=tuple(a.target_column),
        mask_column=a.mask_column, max_residues=a.max_residues, truncate=a.truncate,
        standardize=a.standardize_targets, checkpoint=a.checkpoint, model=a.model, mode=a.mode, lora=lora,
        head_hidden=a.head_hidden, head_dropout=a.head_dropout, steps=a.steps, epochs=a.epochs,
        batch_tokens=a.batch_tokens, lr=a.lr, head_lr_mult=a.head_lr_mult, weight_decay=a.weight_decay,
        warmup_steps=a.warmup_steps, schedule=a.schedule, grad_accum=a.grad_accum, clip=a.clip,
        precision=a.precision, seed=a.seed, skip_nonfinite=a.skip_nonfinite,
        activation_checkpointing=a.activation_checkpointing, eval_every=a.eval_every,
        save_every=a.save_every, log_every=a.log_every, keep_last=a.keep_last, best_metric=a.best_metric, out=a.out, device=a.device)


def main(argv):
    demo = not [a for a in argv if a != "--debug"]
    if demo:
        print("No arguments: running the demo (10 sequences, target = length/100, a small randomly "
              "initialised ESM-2 with LoRA, 50 steps). `python train.py --help` shows real usage.", flush=True)
        shutil.rmtree("runs/demo", ignore_errors=True)
        argv = DEMO_ARGS + argv
    args = parser().parse_args(argv)
    if not (args.train_csv or args.csv):
        parser().error("give --train-csv (with optional --valid-csv/--test-csv) or --csv with a split column")
    from esm2lite.train import train_model

    result = train_model(config_from_args(args), resume=args.resume)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports
    s = result["summary"]
    print(f"done: best step {s['best_step']} by {s['best_metric']}; checkpoint {result['checkpoint']}")
    for split in ("valid", "test"):
        if s[split]:
            print(f"  {split}: " + ", ".join(f"{k} {v:.4f}" for k, v in s[split].items()))
    print(f"metrics: {os.path.join(args.out, 'metrics.jsonl')}, summary: {os.path.join(args.out, 'summary.json')}")
    if demo:
        print("demo run written to runs/demo/ — now try `python infer.py`")


if __name__ == "__main__":
    sys.exit(run_main(main))
