"""Predict with a fine-tuned ESM-2, or compute embeddings.  `python infer.py --help`;
with no arguments it predicts the demo sequences with runs/demo/best (training it first)."""

import argparse
import os
import subprocess
import sys

from esm2lite.cli import OneLineParser, run_main
from esm2lite.device import PRECISIONS

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_FASTA = os.path.join(HERE, "esm2lite", "demo", "predict.fasta")


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python infer.py",
        description="Score protein sequences with a model from train.py (a CSV of predictions, in input "
                    "order) and/or write embeddings. Run with no arguments for the demo.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group("model (give one)")
    src.add_argument("--run", help="a train.py output directory (uses RUN/best)")
    src.add_argument("--checkpoint", help="a checkpoint directory (e.g. RUN/best or RUN/checkpoints/step_500)")
    src.add_argument("--base", help="a plain pretrained ESM-2 (HF dir, fair-esm .pt, hub id): embeddings only")
    src.add_argument("--base-path", help="where the checkpoint's base model is now, if it moved")
    io_ = p.add_argument_group("input and output")
    io_.add_argument("--input", help="CSV or FASTA of sequences")
    io_.add_argument("--sequence-column", default="sequence", help="CSV column holding the sequences")
    io_.add_argument("--id-column", help="CSV column with sequence ids (default: row numbers)")
    io_.add_argument("--output", help="predictions CSV to write (id, sequence, prediction columns)")
    io_.add_argument("--embeddings", help="safetensors file for per-sequence mean embeddings, keyed mean/LAYER/ID")
    io_.add_argument("--per-residue", action="store_true", help="also store per-residue embeddings")
    io_.add_argument("--layers", type=int, nargs="+", help="layers to embed (0 = input embeddings; default: last)")
    io_.add_argument("--max-residues", type=int, default=1022, help="longest sequence allowed")
    io_.add_argument("--truncate", action="store_true", help="cut longer sequences instead of an error")
    run = p.add_argument_group("running")
    run.add_argument("--batch-tokens", type=int, default=8192, help="tokens per batch, padding included")
    run.add_argument("--precision", default="auto", choices=PRECISIONS,
                     help="auto: bf16 on GPU, fp32 on CPU")
    run.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    run.add_argument("--no-merge", action="store_true", help="keep LoRA adapters separate (slower; same numbers)")
    run.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


def demo_args() -> list[str]:
    if not os.path.exists(os.path.join("runs", "demo", "best", "config.json")):
        from esm2lite.errors import Esm2liteError

        print("runs/demo/best not found: training the demo first (python train.py)", flush=True)
        if subprocess.run([sys.executable, os.path.join(HERE, "train.py")]).returncode != 0:
            raise Esm2liteError("the demo training (python train.py) failed; see its output above")
    return ["--run", "runs/demo", "--input", DEMO_FASTA, "--output", os.path.join("runs", "demo", "predictions.csv")]


def main(argv):
    from esm2lite import distributed, infer

    demo = not [a for a in argv if a != "--debug"]
    args = parser().parse_args(demo_args() + argv if demo else argv)
    sources = [x for x in (args.run, args.checkpoint, args.base) if x]
    if len(sources) != 1:
        parser().error("give exactly one of --run, --checkpoint, --base")
    if not args.input:
        parser().error("--input is required")
    if not (args.output or args.embeddings):
        parser().error("give --output (predictions) and/or --embeddings")
    if args.base and args.output:
        parser().error("--base has no task head: use --embeddings only")
    if args.batch_tokens < 1 or args.max_residues < 1:
        parser().error("--batch-tokens and --max-residues must be positive")
    if args.layers and min(args.layers) < 0:
        parser().error("--layers are 0 (input embeddings) .. the number of layers")
    if args.output and args.embeddings and os.path.realpath(args.output) == os.path.realpath(args.embeddings):
        parser().error("--output and --embeddings need different files")
    for path in (args.output, args.embeddings):
        if path:
            infer.check_writable(path, inputs=[args.input])
    d, device = distributed.setup(args.device)  # under torchrun: data-parallel, rank 0 writes
    try:
        predict_and_write(args, d, device, demo)
    finally:
        distributed.teardown(d)


def predict_and_write(args, d, device, demo):
    from esm2lite import distributed, infer
    from esm2lite.checkpoint import load_pretrained
    from esm2lite.ckpt_dir import load_model
    from esm2lite.errors import Esm2liteError
    from esm2lite.evaluate import run_batches
    from esm2lite.reading import read_sequences
    from esm2lite.records import unlabelled_records

    with distributed.same_error(d):  # every rank reads and checks every record; errors agree
        pairs = read_sequences(args.input, args.sequence_column, args.id_column, args.max_residues, args.truncate)
        records = unlabelled_records(pairs, args.input, args.max_residues, args.truncate)
    ids = [sid for sid, _ in pairs]
    if args.base:
        encoder, model = load_pretrained(args.base, device=device), None
    else:
        ckpt = os.path.join(args.run, "best") if args.run else args.checkpoint
        if args.run and not os.path.isdir(ckpt):
            raise Esm2liteError(f"{args.run}: no best/ checkpoint in this run directory")
        model = load_model(ckpt, device=device, base_path=args.base_path, merge=not args.no_merge)
        encoder = model.encoder
    too_deep = [i for i in args.layers or () if i > encoder.config.num_layers]
    if args.embeddings and too_deep:
        raise Esm2liteError(f"--layers {too_deep}: this model has layers 0..{encoder.config.num_layers}")

    if args.output:
        outputs, _ = run_batches(model, records, args.batch_tokens, args.precision, desc="predict", d=d)
        rows = [{"id": sid, "sequence": r.sequence, **p}
                for sid, r, p in zip(ids, records, infer.decode_predictions(model, outputs))]
    if args.embeddings:
        tensors = infer.embed(encoder, records, ids, args.batch_tokens, args.precision, args.layers, args.per_residue, d)
    if not d.main:
        return
    # Write only after all work succeeded: no partial outputs.
    if args.output:
        infer.write_predictions_csv(args.output, rows)
        print(f"wrote {len(rows)} predictions to {args.output}")
    if args.embeddings:
        infer.write_embeddings(args.embeddings, tensors, ids)
        print(f"wrote embeddings of {len(ids)} sequences to {args.embeddings}")
    if demo:
        for row in rows:
            seq = row["sequence"] if len(row["sequence"]) <= 40 else row["sequence"][:37] + "..."
            print(f"  {row['id']:<10} {seq:<40} {row['prediction']:.4f}  (true length/100: {len(row['sequence']) / 100:.2f})")


if __name__ == "__main__":
    sys.exit(run_main(main))
