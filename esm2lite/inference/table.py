"""infer.py's tables: the input read once (CSV or FASTA) with every column it holds, the records a
fine-tuned model predicts, and the output rows.

Output columns, in this order: `id`, `sequence`, the input's other columns as they are (labels,
mutant names, notes...), then what the model adds: `prediction` (several regression targets:
`prediction_<target>`; classification: also `prob_<class>`), and with --truncate
`residues_scored` (how many residues the model read). An input column with one of those names is
an error. Ids: --id-column, else a column named `id`, else the spreadsheet row ("row2", ...);
FASTA: the first word of each header.

When the input holds the column(s) the model was trained on (its label space's target names), the
rows become labelled records exactly as training reads them (the same checks, per-residue labels
and mask cut with the sequence under --truncate), and infer.py scores them with training's
evaluate.score: its loss and metrics, from the same forward as the predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

from esm2lite.errors import DataError, quoted
from esm2lite.tasks.labels import LabelSpace
from esm2lite.data.reading import SPLIT_ALIASES, data_format, mask_like, read_csv, read_fasta, require_columns
from esm2lite.data.records import Record, encode_sequence, make_record, where
from esm2lite.model.tokenizer import EOS, TOKENS


@dataclass
class Table:
    """An input file's rows: ids, sequences and every other column, in input order."""

    source: str
    ids: list[str]
    sequences: list[str]
    rows: list[int]  # spreadsheet row (header = 1) or FASTA record number (1-based)
    row_name: str  # "row" or "record"
    sequence_column: str | None  # None for FASTA
    kept: list[str]  # the other input columns, in input order
    values: list[dict]  # every input column of each row ({} for FASTA)

    def where(self, k: int, column: str | None = None) -> str:
        """'in.csv, row 7, column 'x'', 'in.fasta, record 3 ('id')' or '<memory>, item 2': the start of an
        error line."""
        if self.row_name == "record":
            return f"{self.source}, record {self.rows[k]} ({quoted(self.ids[k])})"
        return where(self.source, self.rows[k], column, self.row_name)


def _csv_ids(name: str, rows, id_column: str | None) -> list[str]:
    if id_column is None:  # reading.ID_RULE: the data row's number, from 1
        return [str(k) for k in range(1, len(rows) + 1)]
    ids, seen = [], {}
    for n, values in rows:
        sid = values[id_column]
        if sid == "":
            raise DataError(f"{where(name, n, id_column)}: empty id")
        if sid in seen:
            raise DataError(f"{where(name, n, id_column)}: duplicate id {quoted(sid)} (also on row {seen[sid]}); "
                            "give --id-column another column")
        seen[sid] = n
        ids.append(sid)
    return ids


def read_table(path, sequence_column: str | None = None, id_column: str | None = None) -> Table:
    """A CSV (every column kept) or FASTA file -> Table. Residues are checked; lengths are not (what
    is too long depends on what the sequences are used for)."""
    name = str(path)
    fasta, text = data_format(path)
    if fasta:
        for flag, value in (("--sequence-column", sequence_column), ("--id-column", id_column)):
            if value is not None:
                raise DataError(f"{name}: is FASTA (ids and sequences come from its records), so {flag} has no use")
        records = read_fasta(path, text=text, described=True)  # (id, description, sequence)
        return Table(name, [i for i, _, _ in records], [s for _, _, s in records], list(range(1, len(records) + 1)),
                     "record", None, ["description"], [{"description": d} for _, d, _ in records])
    header, rows = read_csv(path, text)
    seq_col = sequence_column or "sequence"
    if id_column is None and "id" in header and seq_col != "id":
        id_column = "id"
    require_columns(name, header, [seq_col] + ([id_column] if id_column else []))
    if not rows:
        raise DataError(f"{name}: no data rows")
    if id_column == seq_col:
        raise DataError(f"--id-column and --sequence-column both name {quoted(seq_col)}")
    for n, values in rows:
        encode_sequence(values[seq_col], where(name, n, seq_col))
    kept = [c for c in header if c not in (seq_col, id_column)]
    return Table(name, _csv_ids(name, rows, id_column), [v[seq_col] for _, v in rows], [n for n, _ in rows], "row",
                 seq_col, kept, [v for _, v in rows])


def in_memory(sequences: list[str], ids=None) -> Table:
    """Sequences given in Python -> a Table: source "<memory>", items counted from 0 (in messages),
    ids "1", "2", ... (reading.ID_RULE) unless given (unique, one per sequence)."""
    ids = [str(k) for k in range(1, len(sequences) + 1)] if ids is None else [str(i) for i in ids]
    if len(ids) != len(sequences):
        raise DataError(f"<memory>: {len(ids)} ids for {len(sequences)} sequences")
    seen = {}
    for k, (sid, seq) in enumerate(zip(ids, sequences)):
        if sid in seen:
            raise DataError(f"<memory>, item {k}: duplicate id {quoted(sid)} (also item {seen[sid]})")
        seen[sid] = k
        if not isinstance(seq, str):
            raise DataError(f"<memory>, item {k}: expected a sequence string, got {type(seq).__name__}")
        encode_sequence(seq, where("<memory>", k, None, "item"))
    return Table("<memory>", ids, list(sequences), list(range(len(sequences))), "item", None, [],
                 [{} for _ in sequences])


# ----------------------------------------------------------------------------- what a model adds


def prediction_columns(labels: LabelSpace, truncate: bool) -> list[str]:
    """The columns a fine-tuned model's predictions add, in order."""
    return labels.task.prediction_columns(labels) + (["residues_scored"] if truncate else [])


def check_no_clash(table: Table, added: list[str]) -> None:
    """An input column named like one the output adds would be overwritten: refuse it."""
    clash = next((c for c in table.kept if c in ["id", "sequence", *added]), None)
    if clash is not None:
        raise DataError(f"{table.source}: has a column {quoted(clash)}, which infer.py writes itself; "
                        "rename that column in the input")


def label_columns(table: Table, labels: LabelSpace, mask_column: str | None) -> bool:
    """True when the input holds every column the model was trained on (then metrics are computed);
    errors for some but not all, and for a --mask-column that cannot be used."""
    present = [c for c in labels.target_names if c in table.kept]
    if mask_column is not None:
        if not labels.task.per_residue:
            raise DataError(f"--mask-column: the model's task is {labels.task.name}; only per-residue tasks use a mask")
        if not present:
            raise DataError(f"--mask-column: {table.source} has no label column {quoted(labels.target_names[0])} "
                            "to score against, so the mask has no use")
        if mask_column not in table.kept:
            raise DataError(f"{table.source}: no column {quoted(mask_column)} (--mask-column)")
    if present and len(present) < len(labels.target_names):
        missing = [c for c in labels.target_names if c not in present]
        raise DataError(f"{table.source}: has the label column(s) {', '.join(map(quoted, present))} but not "
                        f"{', '.join(map(quoted, missing))}; the model was trained on all of them")
    return bool(present)


def unlabelled_mask_hint(table: Table, labels: LabelSpace, mask_column: str | None) -> str | None:
    """A warning when per-residue labels are scored without a mask while a mask-like column exists."""
    if not labels.task.per_residue or mask_column is not None:
        return None
    like = next(iter(mask_like(table.kept)), None)
    if like is None:
        return None
    return (f"WARNING: {table.source}: column {quoted(like)} looks like a per-residue mask, but no --mask-column was "
            f"given, so the metrics count every residue; pass --mask-column {like} to leave out the residues it "
            "marks 0 (as training did with it)")


def _too_long(here: str, n: int, max_residues: int) -> DataError:
    return DataError(f"{here}: {n} residues, more than the maximum {max_residues} (--max-residues) a fine-tuned "
                     "head reads; --truncate cuts the sequence (embeddings and --score take any length, in windows)")


def prediction_records(table: Table, labels: LabelSpace, max_residues: int, truncate: bool,
                       labelled: bool, mask_column: str | None = None) -> list[Record]:
    """The records a fine-tuned model predicts, as training would read them: labelled (targets
    checked against the label space) when `labelled`, else sequences only."""
    out = []
    seq_col, cols = table.sequence_column, (table.sequence_column, labels.target_names[0], mask_column)
    for k, seq in enumerate(table.sequences):
        here = table.where(k, seq_col)
        tokens = encode_sequence(seq, here)
        if len(tokens) - 2 > max_residues and not truncate:
            raise _too_long(here, len(tokens) - 2, max_residues)
        if not labelled:
            tokens = tokens if len(tokens) - 2 <= max_residues else tokens[: max_residues + 1] + [EOS]
            out.append(Record(seq, tokens, None, None, table.source, table.rows[k], table.row_name))
            continue
        values = table.values[k]
        target = labels.task.parse_target([values[c] for c in labels.target_names],
                                          [table.where(k, c) for c in labels.target_names])
        mask = values[mask_column] if mask_column is not None else None
        out.append(make_record(labels.task, seq, target, mask, table.source, table.rows[k], "row", cols,
                               max_residues, truncate))
    if labelled:
        labels.check(out)  # a class unseen in training: one line naming the row, before any forward
    return out


def split_groups(table: Table, column: str | None) -> dict[str, list[int]]:
    """{group: row indices} by the split column (`column`, else one named "split" if the CSV has it;
    train, valid and test first, as training names them: validation/val/dev are valid), or {}."""
    if column is not None and table.sequence_column is None:
        raise DataError(f"{table.source}: is FASTA (no columns), so --split-column has no use")
    if column is not None and column not in table.kept:
        raise DataError(f"{table.source}: no column {quoted(column)} (--split-column); the columns are: "
                        f"{', '.join(quoted(c) for c in [table.sequence_column, *table.kept])}")
    column = column or ("split" if "split" in table.kept else None)
    if column is None:
        return {}
    groups = {"train": [], "valid": [], "test": []}
    for k, values in enumerate(table.values):
        raw = values[column].strip()
        groups.setdefault(SPLIT_ALIASES.get(raw.lower(), raw or "(blank)"), []).append(k)
    return {name: idx for name, idx in groups.items() if idx}


def output_rows(table: Table, records, predictions: list[dict], truncate: bool) -> list[dict]:
    """One output row per input row: id, sequence, the kept input columns, the prediction columns."""
    rows = []
    for k, (record, pred) in enumerate(zip(records, predictions)):
        row = {"id": table.ids[k], "sequence": table.sequences[k], **{c: table.values[k][c] for c in table.kept},
               **pred}
        if truncate:
            row["residues_scored"] = len(record.tokens) - 2
        rows.append(row)
    return rows


def residues(seq: str, here: str) -> str:
    """The residues the model reads, as letters (whitespace and anything the tokenizer drops removed)."""
    return "".join(TOKENS[t] for t in encode_sequence(seq, here)[1:-1])


def residue_rows(table: Table, records, outputs, labels: LabelSpace) -> list[dict]:
    """Per-residue tasks, long format: one row per residue the model read: id, position (1-based),
    residue, predicted label, one prob_<class> column per class (rounded to 6 decimals)."""
    rows = []
    for k, (record, out) in enumerate(zip(records, outputs)):
        n = len(record.tokens) - 2
        probs = out[1: n + 1].float().softmax(-1)  # [n, C]
        best = probs.argmax(-1).tolist()
        for p in range(n):
            rows.append({"id": table.ids[k], "position": p + 1, "residue": TOKENS[record.tokens[p + 1]],
                         "prediction": labels.classes[best[p]],
                         **{f"prob_{c}": round(float(v), 6) for c, v in zip(labels.classes, probs[p])}})
    return rows
