"""Inference, one pipeline for the command line (infer.py, under torchrun too) and for Python
(esm2lite.predict): the same reading, ids, kept columns, predictions and metrics.

    run(cfg)        an InferConfig: predictions (CSV, per-residue CSV, metrics JSON), embeddings
                    (safetensors), or zero-shot scores (--score); every output checked before any
                    work, written only once all work succeeded
    predict(...)    sequences in memory -> the rows infer.py writes, as dicts

A table (inference/table.py) is the input as read: ids, sequences and every other column. A fine-tuned
model predicts records built from it as training builds them (labelled when the input holds the
label columns: then training's evaluation scores them too, from the same forward).
"""

import os
from dataclasses import replace

from esm2lite.checkpoints.loading import load_model
from esm2lite.errors import CheckpointError, DataError, Esm2liteError, plural
from esm2lite.files.atomic import csv_text, json_text, write_together
from esm2lite.inference import embed
from esm2lite.inference import table as tables
from esm2lite.inference.config import InferConfig
from esm2lite.inference.evaluate import run_batches, score, score_groups
from esm2lite.inference.outputs import check_outputs, print_demo_table, say_windows, write_predictions
from esm2lite.inference.score_file import read_wildtype, score_file
from esm2lite.model.int8 import for_precision, is_int8
from esm2lite.model.task_model import TaskModel
from esm2lite.runtime import distributed
from esm2lite.runtime.device import check_precision
from esm2lite.runtime.distributed import Dist
from esm2lite.weights.pretrained import load_pretrained


def run(cfg: InferConfig, demo: bool = False) -> None:
    """What infer.py does with `cfg` (checked: InferConfig.check), on one process or under torchrun."""
    check_outputs(cfg)
    d, device = distributed.setup(cfg.device)  # under torchrun: data-parallel, rank 0 writes
    try:
        check_precision(cfg.precision, device)  # int8: CPU only, refused before any loading
        if cfg.score and d.world > 1:
            raise Esm2liteError("--score runs in one process: start it with python, not torchrun")
        with distributed.lost_ranks_reported(distributed.DIST_TIMEOUT):  # a lost rank: one line, not a traceback
            if cfg.score:
                score_and_write(cfg, device)
            else:
                predict_and_write(cfg, d, device, demo)
    finally:
        distributed.teardown(d)


def predict(checkpoint, sequences, ids=None, batch_tokens: int = 8192, precision: str = "auto", device=None,
            merge: bool = True, max_residues: int | None = 1022, truncate: bool = False,
            sequence_column: str | None = None, id_column: str | None = None) -> list[dict]:
    """Notebook API: a checkpoint directory (or a loaded TaskModel, used as it is) and sequences ->
    the rows infer.py writes: {"id", "sequence", prediction columns...}; with truncate, "residues_scored".

    sequences: a list of sequences (ids "1", "2", ... unless given), or the path of a CSV or FASTA
    file, read as infer.py reads --input (its other columns kept; ids by reading.ID_RULE)."""
    model = checkpoint if isinstance(checkpoint, TaskModel) else load_model(checkpoint, device=device, merge=merge)
    if precision == "int8" and not is_int8(model.encoder):  # a model given loaded is the caller's: not changed
        if model is checkpoint:
            raise Esm2liteError("precision='int8' with a loaded TaskModel: quantize it first, "
                                "esm2lite.model.int8.quantize_int8(model.encoder)")
        for_precision(model.encoder, precision)
    if isinstance(sequences, (str, os.PathLike)):
        if ids is not None:
            raise DataError(f"{sequences}: a file's ids come from the file (id_column=...), not from ids=")
        table = tables.read_table(sequences, sequence_column, id_column)
    else:
        if (sequence_column, id_column) != (None, None):
            raise DataError("sequence_column and id_column name columns of a file; give sequences as its path")
        table = tables.in_memory(list(sequences), ids)
    cfg = InferConfig(batch_tokens=batch_tokens, precision=precision, truncate=truncate,
                      max_residues=max_residues if max_residues is not None else 10**9)
    return predictions(cfg, Dist(), table, model)["rows"]


# ---------------------------------------------------------------- predictions and embeddings


def load(cfg: InferConfig, device) -> tuple[TaskModel | None, object]:
    """-> (the fine-tuned task model, or None for --base; the encoder)."""
    if cfg.base:
        return None, for_precision(load_pretrained(cfg.base, device=device), cfg.precision)
    if cfg.run and not os.path.isdir(cfg.checkpoint_dir):
        raise Esm2liteError(f"{cfg.run}: no best/ checkpoint in this run directory")
    model = load_model(cfg.checkpoint_dir, device=device, base_path=cfg.base_path, merge=not cfg.no_merge)
    return model, for_precision(model.encoder, cfg.precision)  # int8: in place, the head stays fp32


def prepare(cfg: InferConfig, table, model) -> tuple:
    """-> (records, labelled) for predictions, every option checked against the model and the input."""
    labels = model.labels
    if cfg.residue_probs and not labels.task.per_residue:
        raise Esm2liteError(f"--residue-probs: the model's task is {labels.task.name}; only per-residue "
                            "(token-classification) models give per-residue probabilities")
    tables.check_no_clash(table, tables.prediction_columns(labels, cfg.truncate))
    labelled = tables.label_columns(table, labels, cfg.mask_column)
    hint = tables.unlabelled_mask_hint(table, labels, cfg.mask_column) if labelled else None
    if hint and int(os.environ.get("RANK", "0")) == 0:
        print(hint, flush=True)
    records = tables.prediction_records(table, labels, cfg.max_residues, cfg.truncate, labelled, cfg.mask_column)
    return records, labelled


def predictions(cfg: InferConfig, d: Dist, table, model: TaskModel) -> dict:
    """-> {"rows", "residues", "metrics", "report", "cut"}: what rank 0 writes. metrics: {"all": ...,
    and each split's when the input has a split column}; report: the task's per class and confusion
    matrix (classification), keyed alike."""
    with distributed.same_error(d):
        records, labelled = prepare(cfg, table, model)
    labels = model.labels
    metrics, report, groups = None, None, {}
    if labelled:  # training's evaluation of these rows (each split of them, and all): loss, metrics, outputs
        groups = tables.split_groups(table, cfg.split_column)
        if groups:
            metrics, parts, outputs = score_groups(model, records, groups, cfg.batch_tokens, cfg.precision, d,
                                                   cfg.batches)
            outputs_by = {"all": outputs, **{name: [outputs[i] for i in idx] for name, idx in groups.items()}}
        else:
            every, outputs = score(model, records, cfg.batch_tokens, cfg.precision, "input", d, cfg.batches)
            metrics, parts, outputs_by = {"all": every}, {"all": records}, {"all": outputs}
        report = labels.task.report(labels, parts, outputs_by)  # per class and confusion matrix, as summary.json
    else:
        outputs, _ = run_batches(model, records, cfg.batch_tokens, cfg.precision, "predict", d=d, layout=cfg.batches)
    predicted = [labels.task.prediction(labels, out) for out in outputs]
    rows = tables.output_rows(table, records, predicted, cfg.truncate)
    residues = tables.residue_rows(table, records, outputs, labels) if cfg.residue_probs else None
    cut = sum(1 for r in records if len(r.tokens) - 2 < len(tables.residues(r.sequence, ""))) if cfg.truncate else 0
    return {"rows": rows, "residues": residues, "metrics": metrics, "report": report, "cut": cut,
            "split_rows": {name: len(idx) for name, idx in groups.items()}}


def predict_and_write(cfg: InferConfig, d: Dist, device, demo: bool) -> None:
    with distributed.same_error(d):  # every rank reads and checks every row; errors agree
        table = tables.read_table(cfg.input, cfg.sequence_column, cfg.id_column)
    model, encoder = load(cfg, device)
    cfg = replace(cfg, max_residues=cfg.max_residues or encoder.config.max_residues)  # the model's context
    too_deep = [i for i in cfg.layers or () if i > encoder.config.num_layers]
    if cfg.embeddings and too_deep:
        raise Esm2liteError(f"--layers {' '.join(map(str, too_deep))}: this model's layers are 0 (input embeddings) "
                            f"to {encoder.config.num_layers}")
    out = predictions(cfg, d, table, model) if (cfg.output or cfg.residue_probs) else {}
    if cfg.embeddings:
        tensors, info = embed.embed_any(encoder, table.ids, table.sequences, cfg.max_residues, cfg.truncate,
                                        cfg.batch_tokens, cfg.precision, cfg.layers, cfg.per_residue, d, cfg.batches)
    if d.main:  # written only after all work succeeded: no partial outputs
        write_predictions(cfg, out, table)
        if cfg.embeddings:
            embed.write_embeddings(cfg.embeddings, tensors, table.ids, info)
            print(f"wrote embeddings of {plural(len(table.ids), 'sequence')} to {cfg.embeddings}")
            say_windows(cfg, info)
        if demo:
            print_demo_table(out["rows"])


# ---------------------------------------------------------------- --score


def score_and_write(cfg: InferConfig, device) -> None:
    wildtype = read_wildtype(cfg.wildtype) if cfg.wildtype else None
    model = load_pretrained(cfg.base, device=device)
    cfg = replace(cfg, max_residues=cfg.max_residues or model.config.max_residues)  # the model's context
    if not model.config.lm_head:
        raise CheckpointError(f"{cfg.base}: has no masked-LM head (saved as EsmModel or a task model), and --score "
                              "needs one: give an EsmForMaskedLM directory, a fair-esm .pt file or a hub id")
    for_precision(model, cfg.precision)  # int8: the encoder's linears, in place; the LM head stays fp32
    scored = score_file(model, cfg.input, cfg.score, wildtype, mutant_column=cfg.mutant_column,
                        score_column=cfg.dms_score_column, sequence_column=cfg.sequence_column, offset=cfg.offset,
                        max_residues=cfg.max_residues, batch_tokens=cfg.batch_tokens, precision=cfg.precision,
                        layout=cfg.batches)
    s = scored.summary
    write_together([(cfg.output, csv_text(scored.rows)), (cfg.metrics, json_text(s))])
    window = ("none: every protein fit in --max-residues" if s["window"] == "none" else
              f"optimal: proteins over {cfg.max_residues} residues scored in windows of {s['window_tokens']} tokens")
    print(f"scored {s['variants']} rows by {s['method']}: {s['forwards']} forwards in {s['batches']} batches; "
          f"window {window}")
    if s["spearman"] is not None:
        print(f"Spearman vs {s['dms_score_column']}: {s['spearman']:.4f}")
    print(f"wrote {cfg.output} and {cfg.metrics}")
