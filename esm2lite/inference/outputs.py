"""What infer.py writes, and the checks before it starts: every output distinct, writable, and none
of them an input (the input file, the wild-type file, the base model, the checkpoint and with --run
every file of the run), whatever the path's spelling (files/paths.py)."""

import os

from esm2lite.checkpoints.run_dir import reader_inputs
from esm2lite.errors import DataError
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
    metrics = None if out["metrics"] is None else {"input": cfg.input, "rows": len(table.ids), **out["metrics"]}
    stale = metrics is None and os.path.isfile(path)
    files = [(cfg.output, csv_text(out["rows"]))] if cfg.output else []
    if cfg.residue_probs:
        files.append((cfg.residue_probs, csv_text(out["residues"])))
    write_together(files + [(path, None if metrics is None else json_text(metrics))])
    if metrics is not None:
        print("metrics vs the input's labels: " + ", ".join(f"{k} {v:.4f}" for k, v in out["metrics"].items())
              + f" (written to {path})")
    elif stale:  # an earlier run's metrics must not pass for these predictions'
        print(f"removed {path}, an earlier run's metrics (this input has no label columns)")
    if cfg.output:
        print(f"wrote {len(out['rows'])} predictions to {cfg.output}")
    if cfg.residue_probs:
        print(f"wrote per-residue probabilities of {len(out['rows'])} sequences to {cfg.residue_probs}")
    if cfg.truncate:
        print(f"--truncate: {out['cut']} sequence(s) cut to {cfg.max_residues} residues (column residues_scored)")


def say_windows(cfg: InferConfig, info: dict) -> None:
    if info["windows"]:
        print(f"{len(info['windows'])} sequence(s) over {cfg.max_residues} residues embedded in overlapping windows "
              f"of {cfg.max_residues + 2} tokens, each residue the mean over its windows (metadata 'windows')")
    if info["residues_scored"]:
        print(f"--truncate: {len(info['residues_scored'])} sequence(s) cut to {cfg.max_residues} residues "
              "(metadata 'residues_scored')")


def print_demo_table(rows: list[dict]) -> None:
    for row in rows:
        seq = row["sequence"] if len(row["sequence"]) <= 40 else row["sequence"][:37] + "..."
        print(f"  {row['id']:<10} {seq:<40} {row['prediction']:.4f}  (true length/100: {len(row['sequence']) / 100:.2f})")
