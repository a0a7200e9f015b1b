"""Deep mutational scans in ProteinGym's CSV layout, read, checked and scored in one call.

    mutant,mutated_sequence,DMS_score
    A24G,MKT...G...,0.37
    A24G:K46R,MKT...G...R...,-1.2

`mutant` is required ("A24G:K46R", 1-based unless `offset` says otherwise); `mutated_sequence`
and `DMS_score` are optional. The wild type is given, or derived from the first row's mutated
sequence; every row is checked against it. Errors are one line naming the file, the row (the
header is row 1) and the column.
"""

from dataclasses import dataclass

from esm2lite.errors import DataError
from esm2lite.data.reading import read_csv, require_columns
from esm2lite.data.records import where
from esm2lite.inference.scoring import ScoreResult, check_options, clean_sequence, shown, mutate, parse_mutant, score_mutants
from esm2lite.inference.windows import encode_protein
from esm2lite.tasks.base import parse_number


@dataclass
class DMS:
    """A deep mutational scan read from a ProteinGym-style CSV."""

    source: str
    header: list[str]
    rows: list[dict]  # every input column, as read
    row_numbers: list[int]  # spreadsheet rows (header = 1)
    wildtype: str
    mutants: list[tuple]  # Substitutions per row, checked against the wild type
    dms_scores: list[float] | None  # the score column, when the file has it
    offset: int = 1

    def with_scores(self, result: ScoreResult, column: str | None = None) -> list[dict]:
        """The input rows with the score added (column default: the method name), plus
        'pseudo_perplexity' for pll."""
        column = column or result.method
        extra = [column] + (["pseudo_perplexity"] if result.pseudo_perplexity is not None else [])
        clash = next((c for c in extra if c in self.header), None)
        if clash is not None:
            raise DataError(f"{self.source}: already has a column {clash!r}; choose another name")
        out = []
        for k, row in enumerate(self.rows):
            values = [result.scores[k]] + ([result.pseudo_perplexity[k]] if len(extra) > 1 else [])
            out.append({**row, **dict(zip(extra, values))})
        return out


def _derive_wildtype(name, rows, mutant_column, sequence_column, offset) -> str:
    """The wild type from the first row: its mutated sequence with the substitutions undone."""
    rownum, values = rows[0]
    subs = parse_mutant(values[mutant_column], None, where(name, rownum, mutant_column), offset)
    seq = list(clean_sequence(values[sequence_column]))
    for s in subs:
        if not 0 <= s.position - offset < len(seq):
            raise DataError(f"{where(name, rownum, mutant_column)}: {s} is outside the mutated "
                            f"sequence (positions {offset}..{offset + len(seq) - 1})")
        seq[s.position - offset] = s.wt
    return "".join(seq)


def read_dms(path, wildtype: str | None = None, mutant_column: str = "mutant", score_column: str = "DMS_score",
             sequence_column: str = "mutated_sequence", offset: int = 1) -> DMS:
    """Read and check a ProteinGym-style CSV: a mutant column ("A24G:K46R"), optionally the
    mutated sequence and the measured score. Without `wildtype` it is derived from the first
    row's mutated sequence. Every row is checked against the wild type (letters, positions,
    mutated sequence); errors name the file, row and column."""
    name = str(path)
    header, rows = read_csv(path)
    require_columns(name, header, [mutant_column])
    if not rows:
        raise DataError(f"{name}: no data rows")
    has_seq, given = sequence_column in header, wildtype is not None
    if wildtype is None:
        if not has_seq:
            raise DataError(f"{name}: no wild type given, and no column {sequence_column!r} to derive it from")
        wildtype = _derive_wildtype(name, rows, mutant_column, sequence_column, offset)
    encode_protein(wildtype, "wild type" if given else where(name, rows[0][0], sequence_column))
    wildtype = clean_sequence(wildtype)
    mutants = []
    for rownum, values in rows:
        subs = parse_mutant(values[mutant_column], wildtype, where(name, rownum, mutant_column), offset)
        if has_seq and clean_sequence(values[sequence_column]) != mutate(wildtype, subs, offset):
            raise DataError(f"{where(name, rownum, sequence_column)}: not the wild type with "
                            f"{shown(values[mutant_column])} applied")
        mutants.append(subs)
    dms = None
    if score_column in header:
        dms = [parse_number(v[score_column], where(name, n, score_column)) for n, v in rows]
    return DMS(name, header, [v for _, v in rows], [n for n, _ in rows], wildtype, mutants, dms, offset)


def score_dms(model, path, method: str = "masked-marginal", wildtype: str | None = None, batch_tokens: int = 8192,
              max_residues: int | None = 1022, precision: str = "auto", mutant_column: str = "mutant",
              score_column: str = "DMS_score", sequence_column: str = "mutated_sequence",
              offset: int = 1, layout: str = "auto") -> tuple[DMS, ScoreResult]:
    """One call: read a DMS CSV (see read_dms) and score every row; the result carries the
    Spearman correlation with the DMS score when the file has one."""
    check_options(method, batch_tokens)
    dms = read_dms(path, wildtype, mutant_column, score_column, sequence_column, offset)
    result = score_mutants(model, dms.wildtype, dms.mutants, method, batch_tokens, max_residues, precision,
                           dms.offset, dms.dms_scores, dms.source, layout)
    return dms, result
