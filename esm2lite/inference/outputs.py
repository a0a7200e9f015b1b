"""What infer.py writes, and the checks before it starts: every output distinct, writable, and none
of them an input (the input file, the wild-type file, the base model, the checkpoint and with --run
every file of the run), whatever the path's spelling (files/paths.py)."""

import os

from esm2lite.demo import gravy
from esm2lite.checkpoints.loading import reader_inputs
from esm2lite.errors import DataError, plural
from esm2lite.files.atomic import csv_text, json_text, write_together
from esm2lite.files.paths import Input, check_output
from esm2lite.inference.config import InferConfig


def inputs_of(cfg: InferConfig) -> list[Input]:
    """What this command reads, which no output may be, lie inside or hold."""
    found = [Input(cfg.input, f"the input (--input {cfg.input})")]
    if cfg.wildtype and os.path.isfile(cfg.wildtype):
        found.append(Input(cfg.wildtype, f"the wild-type file (--wildtype {cfg.wildtype})"))
    if cfg.base:
        found.append(Input(cfg.base, f"the base model (--base {cfg.base})"))
    return found + reader_inputs(cfg.run, cfg.checkpoint, cfg.base_path)


def check_outputs(cfg: InferConfig) -> list[str]:
    """Every file this run may write: distinct, none an input nor inside one, none a dangling link,
    each writable. Checked before any work (before the model is loaded)."""
    flags = {cfg.output: "--output", cfg.embeddings: "--embeddings", cfg.residue_probs: "--residue-probs"}
    paths = [x for x in (cfg.output, cfg.embeddings, cfg.residue_probs) if x]
    if cfg.metrics:  # the metrics JSON beside the predictions
        paths.append(cfg.metrics)
        flags[cfg.metrics] = flags[cfg.output or cfg.residue_probs]
    inputs = inputs_of(cfg)
    for path in paths:
        check_output(path, flags[path], inputs)
    real = [os.path.realpath(x) for x in paths]
    clash = next((x for x, r in zip(paths, real) if real.count(r) > 1), None)
    if clash is not None:
        raise DataError(f"{clash}: two outputs would be written to this one file; give each its own name")
    for path in paths:
        check_writable(path)
    return paths


def check_writable(path: str) -> None:
    """Fail before any work if an output file cannot be written."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not an output file")
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK) or (os.path.exists(parent) and not os.path.isdir(parent)):
        raise DataError(f"{path}: cannot write here (directory {parent} is not writable)")


def write_predictions(cfg: InferConfig, out: dict, table) -> None:
    """The predictions CSV, the per-residue CSV and the metrics JSON, replaced as one set (the metrics
    last: atomic.write_together), so that no kill leaves new predictions beside an earlier run's
    metrics, or the reverse. Without labels, an earlier metrics JSON is removed."""
    if not out:
        return
    path = cfg.metrics
    metrics = None if out["metrics"] is None else metrics_json(cfg.input, out)
    stale = metrics is None and os.path.isfile(path)
    files = [(cfg.output, csv_text(out["rows"]))] if cfg.output else []
    if cfg.residue_probs:
        files.append((cfg.residue_probs, csv_text(out["residues"])))
    write_together(files + [(path, None if metrics is None else json_text(metrics))])
    if metrics is not None:
        say = lambda m: ", ".join(f"{k} {v:.4f}" for k, v in m.items())  # noqa: E731
        splits = metrics.get("splits", {})
        print(f"metrics vs the input's labels{', all rows' if splits else ''}: {say(out['metrics']['all'])} "
              f"(written to {path})")
        for name, m in splits.items():
            print(f"  {name} ({plural(m['rows'], 'row')}): {say({k: v for k, v in m.items() if k != 'rows'})}")
    elif stale:  # an earlier run's metrics must not pass for these predictions'
        print(f"removed {path}, an earlier run's metrics (this input has no label columns)")
    if cfg.output:
        print(f"wrote {plural(len(out['rows']), 'prediction')} to {cfg.output}")
    if cfg.residue_probs:
        print(f"wrote per-residue probabilities of {plural(len(out['rows']), 'sequence')} to {cfg.residue_probs}")
    if cfg.truncate:
        print(f"--truncate: {plural(out['cut'], 'sequence')} cut to {cfg.max_residues} residues (column residues_scored)")


def metrics_json(source: str, out: dict) -> dict:
    """The metrics JSON: the input, its row count and the metrics of all rows; with a split column,
    each split's ("splits": rows and metrics); and the task's report (classification: per class and
    the confusion matrix, keyed "all" and by split, as summary.json has them by split)."""
    every, rows = out["metrics"]["all"], len(out["rows"])
    splits = {name: {"rows": out["split_rows"][name], **m} for name, m in out["metrics"].items() if name != "all"}
    return {"input": source, "rows": rows, **every, **({"splits": splits} if splits else {}), **(out["report"] or {})}


def say_windows(cfg: InferConfig, info: dict) -> None:
    if info["windows"]:
        print(f"{plural(len(info['windows']), 'sequence')} over {cfg.max_residues} residues embedded in overlapping windows "
              f"of {cfg.max_residues + 2} tokens, each residue the mean over its windows (metadata 'windows')")
    if info["residues_scored"]:
        print(f"--truncate: {plural(len(info['residues_scored']), 'sequence')} cut to {cfg.max_residues} residues "
              "(metadata 'residues_scored')")


def print_demo_table(rows: list[dict]) -> None:
    """The demo's predictions beside the true GRAVY of each sequence, and whether they rank alike."""
    print(f"  {'id':<10} {'sequence':<40} {'predicted':>9} {'true GRAVY':>10}")
    for row in rows:
        seq = row["sequence"] if len(row["sequence"]) <= 40 else row["sequence"][:37] + "..."
        print(f"  {row['id']:<10} {seq:<40} {row['prediction']:>9.2f} {gravy(row['sequence']):>10.2f}")
    by = lambda key: sorted(range(len(rows)), key=key)  # noqa: E731
    alike = by(lambda i: rows[i]["prediction"]) == by(lambda i: gravy(rows[i]["sequence"]))
    print("  the predictions rank the sequences " + ("as their true GRAVY does" if alike else
          "otherwise than their true GRAVY (train longer: --steps)"))
