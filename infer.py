"""Predict with a fine-tuned ESM-2, compute embeddings, or score variants zero-shot.  `python infer.py --help`;
with no arguments it predicts the demo sequences with runs/demo/best (training it first)."""

import argparse
import os
import subprocess
import sys

from esm2lite.commands.cli import OneLineParser, run_main
from esm2lite.runtime.device import PRECISIONS

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_FASTA = os.path.join(HERE, "esm2lite", "demo", "predict.fasta")
METHODS = ("masked-marginal", "wt-marginal", "pll")  # esm2lite.inference.scoring.METHODS (not imported: --help stays fast)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown once, and only when they say something (no "(default: None)")."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python infer.py",
        description="Predict with a model from train.py (a CSV of predictions in input order, with the input's "
                    "other columns, and the task's metrics when the input holds its labels), write embeddings "
                    "(proteins of any length), or score variants with a pretrained ESM-2 and no labels (--score). "
                    "Run with no arguments for the demo.",
        formatter_class=HelpFormatter)
    src = p.add_argument_group("model (give one)")
    src.add_argument("--run", metavar="DIR", help="a train.py output directory (uses RUN/best)")
    src.add_argument("--checkpoint", metavar="DIR", help="a checkpoint directory (e.g. RUN/best or RUN/checkpoints/step_500)")
    src.add_argument("--base", metavar="MODEL", help="a plain pretrained ESM-2 (HF dir, fair-esm .pt, hub id): embeddings, or "
                                    "--score (which needs the model's masked-LM head)")
    src.add_argument("--base-path", metavar="MODEL", help="where the checkpoint's base model is now, if it moved")
    io_ = p.add_argument_group("input and output")
    io_.add_argument("--input", metavar="FILE", help="CSV or FASTA of sequences (--score: also a ProteinGym-style DMS CSV)")
    io_.add_argument("--sequence-column", metavar="COLUMN", help="CSV column holding the sequences (default: sequence; "
                                               "DMS files: mutated_sequence)")
    io_.add_argument("--id-column", metavar="COLUMN", help="CSV column with sequence ids (default: a column named id, else row numbers)")
    io_.add_argument("--output", metavar="CSV", help="CSV to write: id, sequence, the input's other columns, the "
                                                     "predictions (--score: the input's columns and the score); "
                                                     "metrics go beside it (preds.csv -> preds.metrics.json)")
    io_.add_argument("--embeddings", metavar="FILE", help="safetensors file for per-sequence mean embeddings, keyed mean/LAYER/ID")
    io_.add_argument("--per-residue", action="store_true", help="also store per-residue embeddings")
    io_.add_argument("--layers", type=int, nargs="+", help="layers to embed (0 = input embeddings; default: last)")
    io_.add_argument("--residue-probs", metavar="CSV", help="per-residue tasks: also write one row per residue: id, "
                                                            "position, residue, prediction, prob_CLASS columns")
    io_.add_argument("--mask-column", metavar="COLUMN", help="per-residue tasks with labels in the input: the 1/0 column marking "
                                           "labelled residues, as in training")
    io_.add_argument("--max-residues", type=int, default=1022,
                     help="longest sequence a fine-tuned head reads (ESM-2 saw at most 1022); embeddings and "
                          "--score split longer proteins into overlapping windows instead (docs/scoring.md)")
    io_.add_argument("--truncate", action="store_true", help="cut longer sequences to --max-residues instead "
                                                             "(predictions and embeddings)")
    sc = p.add_argument_group("zero-shot variant scores (--score, with --base)")
    sc.add_argument("--score", choices=METHODS, help="masked-marginal / wt-marginal: score the mutants of a DMS CSV "
                                                     "against the wild type; pll: pseudo-log-likelihood of each "
                                                     "sequence (docs/scoring.md)")
    sc.add_argument("--wildtype", metavar="SEQ_OR_FASTA", help="the wild-type sequence, or a FASTA file holding it (default: derived from "
                                       "the first row's mutated_sequence)")
    sc.add_argument("--mutant-column", metavar="COLUMN", default="mutant", help="DMS column of mutants such as A24G or A24G:K46R")
    sc.add_argument("--dms-score-column", metavar="COLUMN", default="DMS_score",
                    help="measured scores; when present, the Spearman correlation is reported")
    sc.add_argument("--offset", type=int, help="number of the wild type's first residue in the mutant codes "
                                               "(default: 1)")
    run = p.add_argument_group("running")
    run.add_argument("--batch-tokens", type=int, default=8192, help="tokens per batch, padding included")
    run.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto: bf16 on GPU, fp32 on CPU")
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


def metrics_path(output: str) -> str:
    """preds.csv -> preds.metrics.json: the metrics (or the scoring summary) beside the output."""
    return os.path.splitext(output)[0] + ".metrics.json"


def _unused(args, names) -> list[str]:
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n) not in (None, False)]


def _run_or_checkpoint_mixup(args) -> str | None:
    """--run given a checkpoint directory (RUN/best, a step), or --checkpoint given a run directory:
    the line that names the fix."""
    if args.run and not os.path.isdir(os.path.join(args.run, "best")) and any(
            os.path.exists(os.path.join(args.run, name)) for name in ("SHA256SUMS", "model.safetensors", "dcp")):
        return f"--run {args.run} is a checkpoint directory, not a train.py run: write --checkpoint {args.run}"
    if args.checkpoint and os.path.isdir(os.path.join(args.checkpoint, "best")):
        return (f"--checkpoint {args.checkpoint} is a train.py run directory, not a checkpoint: write --run "
                f"{args.checkpoint} (or --checkpoint {os.path.join(args.checkpoint, 'best')})")
    return None


def check_options(p, args) -> None:
    """Usage errors (one line, exit 2) before any work: a missing option, or one that would be ignored."""
    if len([x for x in (args.run, args.checkpoint, args.base) if x]) != 1:
        p.error("give exactly one of --run, --checkpoint, --base")
    mixup = _run_or_checkpoint_mixup(args)
    if mixup:
        p.error(mixup)
    if not args.input:
        p.error("--input is required")
    if args.batch_tokens < 1 or args.max_residues < 1:
        p.error("--batch-tokens and --max-residues must be positive")
    if args.score:
        if not args.base:
            p.error("--score uses a pretrained model's masked-LM head: give --base MODEL (a fine-tuned "
                    "checkpoint's encoder no longer matches that head)")
        if not args.output:
            p.error("--score needs --output (a CSV)")
        unused = _unused(args, ("embeddings", "per_residue", "layers", "residue_probs", "mask_column", "truncate",
                                "id_column", "no_merge", "base_path"))
        if unused:
            p.error(f"{unused[0]} is not used with --score (longer proteins are scored in windows, every input "
                    "column is kept)")
        return
    unused = _unused(args, ("wildtype", "offset")) + [
        "--" + n.replace("_", "-") for n in ("mutant_column", "dms_score_column") if getattr(args, n) != p.get_default(n)]
    if unused:
        p.error(f"{unused[0]} is only used with --score")
    if not (args.output or args.embeddings or args.residue_probs):
        p.error("give --output (predictions) and/or --embeddings (or --score for zero-shot scores)")
    if args.base and (args.no_merge or args.base_path):
        p.error(f"{_unused(args, ('no_merge', 'base_path'))[0]} is for fine-tuned checkpoints, not --base")
    if args.base and (args.output or args.residue_probs):
        p.error("--base has no task head: use --embeddings, or --score for zero-shot variant scores")
    if (args.per_residue or args.layers) and not args.embeddings:
        p.error(f"{_unused(args, ('per_residue', 'layers'))[0]} is for --embeddings")
    if args.layers and min(args.layers) < 0:
        p.error("--layers are 0 (input embeddings) .. the number of layers")


def inputs_of(args) -> list:
    """What this command reads, which no output may be, lie inside or hold (esm2lite.files.paths): the input
    file, the wild-type file, the base model, and the checkpoint (with --run: every file of the run)."""
    from esm2lite.checkpoints.run_dir import reader_inputs
    from esm2lite.files.paths import Input

    found = [Input(args.input, f"the input (--input {args.input})")]
    if args.wildtype and os.path.isfile(args.wildtype):
        found.append(Input(args.wildtype, f"the wild-type file (--wildtype {args.wildtype})"))
    if args.base:
        found.append(Input(args.base, f"the base model (--base {args.base})"))
    return found + reader_inputs(args.run, args.checkpoint, args.base_path)


def check_outputs(args) -> list[str]:
    """Every file this run may write: distinct, none an input (whatever the spelling) nor inside one,
    none a dangling link, each writable. Checked before any work (before the model is loaded)."""
    from esm2lite.errors import DataError
    from esm2lite.inference.predict import check_writable
    from esm2lite.files.paths import check_output

    flags = {args.output: "--output", args.embeddings: "--embeddings", args.residue_probs: "--residue-probs"}
    paths = [x for x in (args.output, args.embeddings, args.residue_probs) if x]
    if args.output or args.residue_probs:  # the metrics JSON beside the predictions
        paths.append(metrics_path(args.output or args.residue_probs))
        flags[paths[-1]] = flags[args.output or args.residue_probs]
    inputs = inputs_of(args)
    for path in paths:
        check_output(path, flags[path], inputs)
    real = [os.path.realpath(x) for x in paths]
    clash = next((x for x, r in zip(paths, real) if real.count(r) > 1), None)
    if clash is not None:
        raise DataError(f"{clash}: two outputs would be written to this one file; give each its own name")
    for path in paths:
        check_writable(path)
    return paths


def main(argv):
    from esm2lite.runtime import distributed
    from esm2lite.errors import Esm2liteError

    demo = not [a for a in argv if a != "--debug"]
    p = parser()
    args = p.parse_args(demo_args() + argv if demo else argv)
    check_options(p, args)
    check_outputs(args)
    d, device = distributed.setup(args.device)  # under torchrun: data-parallel, rank 0 writes
    try:
        if args.score and d.world > 1:
            raise Esm2liteError("--score runs in one process: start it with python, not torchrun")
        with distributed.lost_ranks_reported(distributed.DIST_TIMEOUT):  # a lost rank: one line, not a traceback
            if args.score:
                score_and_write(args, device)
            else:
                predict_and_write(args, d, device, demo)
    finally:
        distributed.teardown(d)


# ---------------------------------------------------------------- --score


def score_and_write(args, device):
    from esm2lite.files.atomic import csv_text, json_text, write_together
    from esm2lite.weights.pretrained import load_pretrained
    from esm2lite.errors import CheckpointError
    from esm2lite.inference.score_file import read_wildtype, score_file

    wildtype = read_wildtype(args.wildtype) if args.wildtype else None
    model = load_pretrained(args.base, device=device)
    if not model.config.lm_head:
        raise CheckpointError(f"{args.base}: has no masked-LM head (saved as EsmModel or a task model), and --score "
                              "needs one: give an EsmForMaskedLM directory, a fair-esm .pt file or a hub id")
    scored = score_file(model, args.input, args.score, wildtype, mutant_column=args.mutant_column,
                        score_column=args.dms_score_column, sequence_column=args.sequence_column, offset=args.offset,
                        max_residues=args.max_residues, batch_tokens=args.batch_tokens, precision=args.precision)
    s = scored.summary
    write_together([(args.output, csv_text(scored.rows)), (metrics_path(args.output), json_text(s))])
    window = ("none: every protein fit in --max-residues" if s["window"] == "none" else
              f"optimal: proteins over {args.max_residues} residues scored in windows of {s['window_tokens']} tokens")
    print(f"scored {s['variants']} rows by {s['method']}: {s['forwards']} forwards in {s['batches']} batches; "
          f"window {window}")
    if s["spearman"] is not None:
        print(f"Spearman vs {s['dms_score_column']}: {s['spearman']:.4f}")
    print(f"wrote {args.output} and {metrics_path(args.output)}")


# ---------------------------------------------------------------- predictions and embeddings


def load(args, device):
    """-> (task model or None, encoder)."""
    from esm2lite.weights.pretrained import load_pretrained
    from esm2lite.checkpoints.checkpoint_dir import load_model
    from esm2lite.errors import Esm2liteError

    if args.base:
        return None, load_pretrained(args.base, device=device)
    ckpt = os.path.join(args.run, "best") if args.run else args.checkpoint
    if args.run and not os.path.isdir(ckpt):
        raise Esm2liteError(f"{args.run}: no best/ checkpoint in this run directory")
    model = load_model(ckpt, device=device, base_path=args.base_path, merge=not args.no_merge)
    return model, model.encoder


def prepare(args, table, model) -> tuple:
    """-> (records, labelled) for predictions, every option checked against the model and the input."""
    from esm2lite.inference import table as it
    from esm2lite.errors import Esm2liteError

    labels = model.labels
    if args.residue_probs and not labels.task.per_residue:
        raise Esm2liteError(f"--residue-probs: the model's task is {labels.task.name}; only per-residue "
                            "(token-classification) models give per-residue probabilities")
    it.check_no_clash(table, it.prediction_columns(labels, args.truncate))
    labelled = it.label_columns(table, labels, args.mask_column)
    hint = it.unlabelled_mask_hint(table, labels, args.mask_column) if labelled else None
    if hint and int(os.environ.get("RANK", "0")) == 0:
        print(hint, flush=True)
    records = it.prediction_records(table, labels, args.max_residues, args.truncate, labelled, args.mask_column)
    return records, labelled


def predict(args, d, table, model) -> dict:
    """-> {"rows", "residues", "metrics"} (what rank 0 writes)."""
    from esm2lite.runtime import distributed
    from esm2lite.inference import predict as infer
    from esm2lite.inference import table as it
    from esm2lite.inference.evaluate import run_batches, score

    with distributed.same_error(d):
        records, labelled = prepare(args, table, model)
    if labelled:  # training's evaluation of these rows: its loss and metrics, and the outputs
        metrics, outputs = score(model, records, args.batch_tokens, args.precision, "input", d)
    else:
        metrics, (outputs, _) = None, run_batches(model, records, args.batch_tokens, args.precision, "predict", d=d)
    rows = it.output_rows(table, records, infer.decode_predictions(model, outputs), model.labels, args.truncate)
    residues = it.residue_rows(table, records, outputs, model.labels) if args.residue_probs else None
    cut = sum(1 for r in records if len(r.tokens) - 2 < len(it.residues(r.sequence, ""))) if args.truncate else 0
    return {"rows": rows, "residues": residues, "metrics": metrics, "cut": cut}


def predict_and_write(args, d, device, demo):
    from esm2lite.runtime import distributed
    from esm2lite.inference import predict as infer
    from esm2lite.errors import Esm2liteError
    from esm2lite.inference.table import read_table

    with distributed.same_error(d):  # every rank reads and checks every row; errors agree
        table = read_table(args.input, args.sequence_column, args.id_column)
    model, encoder = load(args, device)
    too_deep = [i for i in args.layers or () if i > encoder.config.num_layers]
    if args.embeddings and too_deep:
        raise Esm2liteError(f"--layers {too_deep}: this model has layers 0..{encoder.config.num_layers}")
    out = predict(args, d, table, model) if (args.output or args.residue_probs) else {}
    if args.embeddings:
        tensors, info = infer.embed_any(encoder, table.ids, table.sequences, args.max_residues, args.truncate,
                                        args.batch_tokens, args.precision, args.layers, args.per_residue, d)
    if d.main:  # written only after all work succeeded: no partial outputs
        write_predictions(args, out, table)
        if args.embeddings:
            infer.write_embeddings(args.embeddings, tensors, table.ids, info)
            print(f"wrote embeddings of {len(table.ids)} sequences to {args.embeddings}")
            say_windows(args, info)
        if demo:
            print_demo_table(out["rows"])


def write_predictions(args, out, table):
    """The predictions CSV, the per-residue CSV and the metrics JSON, replaced as one set (the metrics
    last: atomic.write_together), so that no kill leaves new predictions beside an earlier run's
    metrics, or the reverse. Without labels, an earlier metrics JSON is removed."""
    from esm2lite.files.atomic import csv_text, json_text, write_together

    if not out:
        return
    path = metrics_path(args.output or args.residue_probs)
    metrics = None if out["metrics"] is None else {"input": args.input, "rows": len(table.ids), **out["metrics"]}
    stale = metrics is None and os.path.isfile(path)
    files = [(args.output, csv_text(out["rows"]))] if args.output else []
    if args.residue_probs:
        files.append((args.residue_probs, csv_text(out["residues"])))
    write_together(files + [(path, None if metrics is None else json_text(metrics))])
    if metrics is not None:
        print("metrics vs the input's labels: " + ", ".join(f"{k} {v:.4f}" for k, v in out["metrics"].items())
              + f" (written to {path})")
    elif stale:  # an earlier run's metrics must not pass for these predictions'
        print(f"removed {path}, an earlier run's metrics (this input has no label columns)")
    if args.output:
        print(f"wrote {len(out['rows'])} predictions to {args.output}")
    if args.residue_probs:
        print(f"wrote per-residue probabilities of {len(out['rows'])} sequences to {args.residue_probs}")
    if args.truncate:
        print(f"--truncate: {out['cut']} sequence(s) cut to {args.max_residues} residues (column residues_scored)")


def say_windows(args, info):
    if info["windows"]:
        print(f"{len(info['windows'])} sequence(s) over {args.max_residues} residues embedded in overlapping windows "
              f"of {args.max_residues + 2} tokens, each residue the mean over its windows (metadata 'windows')")
    if info["residues_scored"]:
        print(f"--truncate: {len(info['residues_scored'])} sequence(s) cut to {args.max_residues} residues "
              "(metadata 'residues_scored')")


def print_demo_table(rows):
    for row in rows:
        seq = row["sequence"] if len(row["sequence"]) <= 40 else row["sequence"][:37] + "..."
        print(f"  {row['id']:<10} {seq:<40} {row['prediction']:.4f}  (true length/100: {len(row['sequence']) / 100:.2f})")


if __name__ == "__main__":
    sys.exit(run_main(main))
