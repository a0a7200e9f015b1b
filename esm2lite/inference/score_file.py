"""Zero-shot scores of a whole file in one call (what `infer.py --score` runs), every input column kept.

    a DMS CSV (a `mutant` column: A24G, A24G:K46R)   masked-marginal, wt-marginal or pll of each mutant
    plain sequences (a CSV `sequence` column, FASTA)  pll and pseudo-perplexity of each sequence

Output rows: the input's columns as they are (FASTA: `id`, `sequence`), then the score in a column
named after the method, `pseudo_perplexity` for pll, and `window`: "none" when the protein fit in
max_residues (the plain forward), "optimal" when it was scored in ProteinGym's optimal windows
(docs/scoring.md). The summary says how: method, variants, forwards, batches, tokens, window,
window_tokens, and `spearman` against the DMS score column when the file has one.

    from esm2lite.inference.score_file import score_file
    scored = score_file("facebook/esm2_t33_650M_UR50D", "dms.csv", "masked-marginal", wildtype="MKT...")
    scored.rows, scored.summary["spearman"]
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from esm2lite.inference.dms import read_dms
from esm2lite.errors import DataError, quoted
from esm2lite.data.reading import data_format, read_csv, read_fasta, require_columns
from esm2lite.inference.table import residues
from esm2lite.data.records import where
from esm2lite.inference.scoring import METHODS, ScoreResult, score_mutants, score_sequences
from esm2lite.tasks.base import parse_number


@dataclass
class Scored:
    """Output rows in input order, the library's result, and the summary written beside them."""

    rows: list[dict]
    result: ScoreResult
    summary: dict


def read_wildtype(value: str) -> str:
    """--wildtype: a sequence, or a FASTA file holding exactly one record."""
    if os.path.isfile(value):
        records = read_fasta(value)
        if len(records) != 1:
            raise DataError(f"{value}: --wildtype needs a FASTA file with one record, it has {len(records)}")
        return records[0][1]
    if any(c in value for c in (os.sep, "/", ".")):  # a file name ('.' is no residue a wild type holds)
        raise DataError(f"--wildtype {quoted(value)}: no such file (give the wild-type sequence or a FASTA file)")
    return value


def _added(method: str) -> list[str]:
    """The columns the scores add to the input's: the score, pll's pseudo-perplexity, the window rule."""
    return [method] + (["pseudo_perplexity"] if method == "pll" else []) + ["window"]


def _check_no_clash(source: str, header: list[str], method: str) -> None:
    clash = next((c for c in header if c in _added(method)), None)
    if clash is not None:
        raise DataError(f"{source}: has a column {quoted(clash)}, which the scores are written to; rename it")


def _rows(inputs: list[dict], result: ScoreResult, windows: list[str]) -> list[dict]:
    out = []
    for k, row in enumerate(inputs):
        extra = [result.scores[k]] + ([result.pseudo_perplexity[k]] if result.pseudo_perplexity else [])
        out.append({**row, **dict(zip(_added(result.method), extra + [windows[k]]))})
    return out


def _score_dms(model, path, header, method, wildtype, mutant_column, score_column, sequence_column, offset,
               kw) -> Scored:
    seq_col = sequence_column or "mutated_sequence"
    if wildtype is None and seq_col not in header:
        raise DataError(f"{path}: give the wild type (--wildtype SEQ or a FASTA file): the file has no "
                        f"{quoted(seq_col)} column to derive it from")
    _check_no_clash(str(path), header, method)
    dms = read_dms(path, wildtype, mutant_column, score_column, seq_col, 1 if offset is None else offset)
    result = score_mutants(model, dms.wildtype, dms.mutants, method, offset=dms.offset, dms_scores=dms.dms_scores,
                           source=dms.source, **kw)
    summary = {**result.summary(), "input": str(path), "wildtype_residues": len(dms.wildtype),
               "dms_score_column": score_column if dms.dms_scores is not None else None}
    return Scored(_rows(dms.rows, result, [result.window] * len(dms.rows)), result, summary)


def _read_sequences(path, sequence_column, score_column):
    """Plain sequences -> (input rows, sequences, DMS scores or None). FASTA rows are id, sequence."""
    fasta, text = data_format(path)
    if fasta:
        if sequence_column is not None:
            raise DataError(f"{path}: is FASTA, so --sequence-column has no use")
        pairs = read_fasta(path, text=text)
        return [{"id": i, "sequence": s} for i, s in pairs], [residues(s, str(path)) for _, s in pairs], None
    name, (header, rows) = str(path), read_csv(path, text)
    seq_col = sequence_column or "sequence"
    require_columns(name, header, [seq_col])
    if not rows:
        raise DataError(f"{name}: no data rows")
    sequences = [residues(v[seq_col], where(name, n, seq_col)) for n, v in rows]
    scores = [parse_number(v[score_column], where(name, n, score_column)) for n, v in rows] \
        if score_column in header else None
    return [v for _, v in rows], sequences, scores


def _score_sequences(model, path, method, mutant_column, score_column, sequence_column, max_residues, kw) -> Scored:
    if method != "pll":
        raise DataError(f"{path}: no {quoted(mutant_column)} column (mutants such as A24G or A24G:K46R); {method} "
                        "scores mutants of one wild type, only pll scores plain sequences")
    inputs, sequences, dms_scores = _read_sequences(path, sequence_column, score_column)
    _check_no_clash(str(path), list(inputs[0]), method)
    result = score_sequences(model, sequences, max_residues=max_residues, dms_scores=dms_scores, source=str(path),
                             **kw)
    windows = ["optimal" if len(s) > max_residues else "none" for s in sequences]
    summary = {**result.summary(), "input": str(path),
               "dms_score_column": score_column if dms_scores is not None else None}
    return Scored(_rows(inputs, result, windows), result, summary)


def score_file(model, path, method: str = "masked-marginal", wildtype: str | None = None, *,
               mutant_column: str = "mutant", score_column: str = "DMS_score", sequence_column: str | None = None,
               offset: int | None = None, max_residues: int = 1022, batch_tokens: int = 8192,
               precision: str = "auto", layout: str = "auto") -> Scored:
    """Score every row of `path` (see the module docstring). `model`: an ESM2 with its masked-LM head,
    or a path / hub id. `wildtype`: the sequence; without it, derived from the first row's
    `mutated_sequence`. `sequence_column`: plain sequences' column (default "sequence") or the DMS
    file's mutated sequences (default "mutated_sequence"). `offset`: the number of the wild type's
    first residue in the mutant codes (default 1). `layout`: batches padded, packed or auto
    (runtime/device.packs): the same scores."""
    if method not in METHODS:
        raise DataError(f"unknown scoring method {quoted(method)}; choose one of {', '.join(METHODS)}")
    kw = dict(batch_tokens=batch_tokens, precision=precision, layout=layout)
    fasta, text = data_format(path)
    header = [] if fasta else read_csv(path, text)[0]
    if mutant_column in header:
        return _score_dms(model, path, header, method, wildtype, mutant_column, score_column, sequence_column,
                          offset, dict(kw, max_residues=max_residues))
    for flag, value in (("--wildtype", wildtype), ("--offset", offset)):
        if value is not None:
            raise DataError(f"{path}: has no {quoted(mutant_column)} column, so {flag} has no use "
                            "(plain sequences are scored by pll as they are)")
    return _score_sequences(model, path, method, mutant_column, score_column, sequence_column, max_residues, kw)
