"""Records: one checked, tokenised sequence with its label, and where it came from.

Every bad value raises DataError with one line naming the file, the row and the column:

    train.csv, row 7, column 'target': 'abc' is not a number

Rows are counted as a spreadsheet or an editor shows them: the header is row 1, the first data
row is row 2. In-memory data (records_from_pairs) is counted from item 0. Files are read in
reading.py; this module checks values and builds Records, from files or from Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass

from esm2lite.errors import DataError, TokenizerError, quoted
from esm2lite.model.tokenizer import EOS, Tokenizer
from esm2lite.tasks import DEFAULT_TASK, Task, task_named

_TOKENIZER = Tokenizer()
STOP = "*"


@dataclass
class DataSpec:
    """How to read the columns of a labelled CSV."""

    task: Task | str = DEFAULT_TASK  # a task, or its name
    sequence_column: str = "sequence"
    target_columns: tuple[str, ...] = ("target",)  # a multi-target task (regression) may list several
    mask_column: str | None = None  # per-residue tasks: "1"/"0" per residue, 0 = ignore
    split_column: str | None = None  # one CSV: says each row's split; per-split files holding it must agree
    id_column: str | None = None  # row ids for the predictions written after training (None: "id" if present)
    max_residues: int | None = 1022  # longer sequences are an error...
    truncate: bool = False  # ...or are cut to max_residues (labels and mask cut too)

    def __post_init__(self):
        if isinstance(self.target_columns, str):
            self.target_columns = (self.target_columns,)
        self.target_columns = tuple(self.target_columns)
        self.task = task_named(self.task)
        if not self.target_columns:
            raise DataError("no target column given")
        if (why := self.task.check_target_columns(self.target_columns)) is not None:
            raise DataError(why)
        if self.mask_column is not None and not self.task.per_residue:
            raise DataError(f"a mask column is only used by per-residue tasks, not {self.task.name}")
        names = [self.sequence_column, *self.target_columns]
        names += [c for c in (self.mask_column, self.split_column, self.id_column) if c is not None]
        dup = sorted({c for c in names if names.count(c) > 1})
        if dup:
            raise DataError(f"column {quoted(dup[0])} is given for two different roles")
        if self.max_residues is not None and self.max_residues < 1:
            raise DataError(f"max_residues must be at least 1, got {self.max_residues}")

    @property
    def columns(self) -> tuple:
        """(sequence, target, mask) column names, as make_record names them in messages."""
        return self.sequence_column, self.target_columns[0], self.mask_column


@dataclass
class Record:
    """One sequence and its label."""

    sequence: str  # as given (a trailing '*' included: tokens leave it out)
    tokens: list[int]  # [cls] + residues + [eos]
    target: object  # its task's (regression: a tuple of floats; classification: a str; per residue: a str
    #                 with a character per residue); None without a label
    mask: str | None  # per-residue tasks only: "1"/"0" per residue (0 = no label), or None
    source: str  # file path, or "<memory>"
    row: int  # spreadsheet row (header = 1), or 0-based index for in-memory data
    row_name: str = "row"  # "row" for files, "item" for in-memory data (used in messages)
    target_column: str = "target"  # the column the label came from (used in messages)
    id: str | None = None  # the row's id (DataSpec.id_column), written next to its predictions

    def where(self, column: str | None = None) -> str:
        """'train.csv, row 7, column 'target'' — the prefix of an error message."""
        return where(self.source, self.row, column, self.row_name)


def where(source, row=None, column=None, row_name="row") -> str:
    out = str(source)
    if row is not None:
        out += f", {row_name} {row}"
    if column is not None:
        out += f", column {quoted(column)}"
    return out


def without_stop(seq: str) -> str:
    """The sequence without one trailing '*': the stop codon that translated ORFs end with is not
    a residue, so it is accepted there and dropped (anywhere else '*' is an unknown residue)."""
    end = seq.rstrip()
    return end[:-1] if end.endswith(STOP) else seq


def residue_error(e: TokenizerError) -> str:
    """A tokenizer message without its "sequence 0: " prefix, with a hint for a '*' mid-sequence."""
    msg = str(e)
    if msg.startswith("sequence ") and ": " in msg:
        msg = msg.split(": ", 1)[1]
    if f"unknown residue {STOP!r}" in msg:
        msg += " ('*', a stop codon, is accepted only at the end of a sequence, where it is dropped)"
    return msg


def encode_sequence(seq: str, here: str) -> list[int]:
    """Tokenize without a length limit (a trailing '*' dropped); tokenizer errors become
    DataErrors at `here`."""
    try:
        return _TOKENIZER.encode(without_stop(seq))
    except TokenizerError as e:
        raise DataError(f"{here}: {residue_error(e)}") from None


def check_length(tokens: list[int], here: str, max_residues: int | None, truncate: bool) -> None:
    if max_residues is not None and not truncate and len(tokens) - 2 > max_residues:
        raise DataError(f"{here}: {len(tokens) - 2} residues, more than the maximum {max_residues} "
                        "(--truncate cuts longer sequences)")


def make_record(task: Task, seq, target, mask, source, row, row_name, columns, max_residues, truncate) -> Record:
    """Check one row and build its Record. `columns` = (sequence, target, mask) names."""
    seq_col, target_col, mask_col = columns
    tokens = encode_sequence(seq, where(source, row, seq_col, row_name))
    n = len(tokens) - 2
    task.check_residue_labels(target, mask, n, where(source, row, target_col, row_name),
                              where(source, row, mask_col, row_name))
    if max_residues is not None and n > max_residues:
        if not truncate:
            raise DataError(f"{where(source, row, seq_col, row_name)}: {n} residues, more than "
                            f"the maximum {max_residues} (turn on truncation to cut it)")
        tokens = tokens[: max_residues + 1] + [EOS]
        target, mask = task.cut(target, mask, max_residues)
    return Record(sequence=seq, tokens=tokens, target=target, mask=mask, source=source, row=row,
                  row_name=row_name, target_column=target_col)


def records_from_pairs(pairs, task=DEFAULT_TASK, source="<memory>", max_residues: int | None = 1022,
                       truncate: bool = False) -> list[Record]:
    """In-memory (sequence, target) pairs -> Records (the Python API's dataset).

    target: as the task reads it: a number or a tuple/list of numbers (regression, the same count
    for every pair); a class name (classification); a string with one label per residue
    (token-classification, where a third element, a "1"/"0" mask string, is allowed).
    Errors name `source` and the 0-based item index.
    """
    task = task_named(task)
    out = []
    for i, pair in enumerate(pairs):
        n_targets = len(out[0].target) if out and task.multi_target else None
        out.append(_record_from_pair(pair, task, source, i, n_targets, max_residues, truncate))
        out[-1].id = str(i + 1)  # reading.ID_RULE: the place in the list, from 1
    if not out:
        raise DataError(f"{source}: no data")
    return out


def _record_from_pair(pair, task: Task, source, i, n_targets, max_residues, truncate) -> Record:
    item = where(source, i, None, "item")
    if not isinstance(pair, (tuple, list)) or len(pair) not in (2, 3):
        raise DataError(f"{item}: expected a (sequence, target) pair")
    if len(pair) == 3 and not task.per_residue:
        raise DataError(f"{item}: a third element (mask) is only used by per-residue tasks")
    seq, target, mask = pair[0], pair[1], pair[2] if len(pair) == 3 else None
    if not isinstance(seq, str):
        raise DataError(f"{where(source, i, 'sequence', 'item')}: expected a string, got {type(seq).__name__}")
    target = task.target_from_object(target, where(source, i, "target", "item"), n_targets)
    if mask is not None and not isinstance(mask, str):
        raise DataError(f"{where(source, i, 'mask', 'item')}: expected a '1'/'0' string")
    return make_record(task, seq.strip(), target, mask, source, i, "item", ("sequence", "target", "mask"),
                       max_residues, truncate)


def unlabelled_records(pairs, source: str = "<memory>", max_residues: int | None = 1022,
                       truncate: bool = False) -> list[Record]:
    """[(id, sequence)] -> Records without targets (tokenised, length-checked): what to predict."""
    records = []
    for i, (sid, seq) in enumerate(pairs):
        try:
            tokens = _TOKENIZER.encode(without_stop(seq), i, max_residues, truncate)
        except TokenizerError as e:
            raise DataError(f"{source}, record {i + 1} ({quoted(sid)}): {residue_error(e)}") from None
        records.append(Record(sequence=seq, tokens=tokens, target=None, mask=None, source=source, row=i + 1))
    return records
