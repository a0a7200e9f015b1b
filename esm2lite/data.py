"""Reading labelled sequences (CSV) and sequences to score (CSV / FASTA), encoding
targets, and cutting length-bucketed batches.

Every bad input raises DataError with one line naming the file, the row and the column:

    train.csv, row 7, column 'target': 'abc' is not a number

Rows are counted as a spreadsheet or an editor shows them: the header is row 1, the first
data row is row 2 (blank lines count as rows and are skipped). Files are read whole and
every row of every split is checked before anything is returned.

Conventions chosen here:
- CSV files: UTF-8 (a byte-order mark is fine), LF or CRLF line ends, comma-separated
  (`.tsv` / `.tab` files are tab-separated). Values are stripped of surrounding spaces.
- Split column values (case-insensitive): `train`; `valid`, `validation`, `val` or `dev`
  (all mean the validation split, key "valid"); `test`. Anything else is an error.
- CSV ids for inference without an id column: "row2", "row3", ... (the spreadsheet row).
- FASTA: id = first word of the header; lines starting with ';' are comments.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from .errors import DataError, TokenizerError
from .tokenizer import CLS, EOS, PAD, Tokenizer

TASKS = ("regression", "classification", "token-classification")
IGNORE_INDEX = -100  # target value for positions without a label (cls, eos, pad, mask 0)
SPLITS = ("train", "valid", "test")
SPLIT_ALIASES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid",
                 "dev": "valid", "test": "test"}
FASTA_SUFFIXES = (".fa", ".fasta", ".faa", ".fas")

_TOKENIZER = Tokenizer()


# ----------------------------------------------------------------------------- records

@dataclass
class DataSpec:
    """How to read the columns of a labelled CSV."""

    task: str = "regression"
    sequence_column: str = "sequence"
    target_columns: tuple[str, ...] = ("target",)  # regression may list several; other tasks one
    mask_column: str | None = None  # token-classification: per-residue "1"/"0", 0 = ignore
    split_column: str | None = None  # one CSV holding train/valid/test rows
    max_residues: int | None = 1022  # longer sequences are an error...
    truncate: bool = False  # ...or are cut to max_residues (labels and mask cut too)

    def __post_init__(self):
        if isinstance(self.target_columns, str):
            self.target_columns = (self.target_columns,)
        self.target_columns = tuple(self.target_columns)
        if self.task not in TASKS:
            raise DataError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if not self.target_columns:
            raise DataError("no target column given")
        if self.task != "regression" and len(self.target_columns) != 1:
            raise DataError(f"task {self.task!r} takes exactly one target column, "
                            f"got {len(self.target_columns)}: {', '.join(self.target_columns)}")
        if self.mask_column is not None and self.task != "token-classification":
            raise DataError("a mask column is only used by token-classification")
        names = [self.sequence_column, *self.target_columns]
        names += [c for c in (self.mask_column, self.split_column) if c is not None]
        dup = sorted({c for c in names if names.count(c) > 1})
        if dup:
            raise DataError(f"column {dup[0]!r} is given for two different roles")
        if self.max_residues is not None and self.max_residues < 1:
            raise DataError(f"max_residues must be at least 1, got {self.max_residues}")


@dataclass
class Record:
    """One labelled sequence."""

    sequence: str
    tokens: list[int]  # [cls] + residues + [eos]
    target: object  # regression: tuple of floats; classification: str; token: str (one char/residue)
    mask: str | None  # token-classification only: "1"/"0" per residue (0 = no label), or None
    source: str  # file path, or "<memory>"
    row: int  # spreadsheet row (header = 1), or 0-based index for in-memory data
    row_name: str = "row"  # "row" for files, "item" for in-memory data (used in messages)
    target_column: str = "target"  # the column the label came from (used in messages)

    @property
    def num_residues(self) -> int:
        return len(self.tokens) - 2

    def where(self, column: str | None = None) -> str:
        """'train.csv, row 7, column 'target'' — the prefix of an error message."""
        return _where(self.source, self.row, column, self.row_name)


def _where(source, row=None, column=None, row_name="row") -> str:
    out = str(source)
    if row is not None:
        out += f", {row_name} {row}"
    if column is not None:
        out += f", column {column!r}"
    return out


def _encode_sequence(seq: str, where: str) -> list[int]:
    """Tokenize without a length limit; tokenizer errors become DataErrors at `where`."""
    try:
        return _TOKENIZER.encode(seq)
    except TokenizerError as e:
        msg = str(e)
        if msg.startswith("sequence ") and ": " in msg:  # drop the tokenizer's "sequence 0: "
            msg = msg.split(": ", 1)[1]
        raise DataError(f"{where}: {msg}") from None


def _make_record(task, seq, target, mask, source, row, row_name, columns, max_residues, truncate):
    """Validate one row and build its Record. `columns` = (sequence, target, mask) names."""
    seq_col, target_col, mask_col = columns
    tokens = _encode_sequence(seq, _where(source, row, seq_col, row_name))
    n = len(tokens) - 2
    if task == "token-classification":
        where = _where(source, row, target_col, row_name)
        bad = next((c for c in target if c.isspace()), None)
        if bad is not None:
            raise DataError(f"{where}: per-residue labels contain whitespace")
        if len(target) != n:
            raise DataError(f"{where}: {len(target)} per-residue labels for a sequence of "
                            f"{n} residues")
        if mask is not None:
            where = _where(source, row, mask_col, row_name)
            if len(mask) != n:
                raise DataError(f"{where}: mask of length {len(mask)} for a sequence of "
                                f"{n} residues")
            bad = next((i for i, c in enumerate(mask) if c not in "01"), None)
            if bad is not None:
                raise DataError(f"{where}: mask character {mask[bad]!r} at position {bad + 1} "
                                f"(only '0' and '1' are allowed)")
    if max_residues is not None and n > max_residues:
        if not truncate:
            raise DataError(f"{_where(source, row, seq_col, row_name)}: {n} residues, more than "
                            f"the maximum {max_residues} (turn on truncation to cut it)")
        tokens = tokens[: max_residues + 1] + [EOS]
        if task == "token-classification":
            target = target[:max_residues]
            mask = mask[:max_residues] if mask is not None else None
    return Record(sequence=seq, tokens=tokens, target=target, mask=mask, source=source, row=row,
                  row_name=row_name, target_column=target_col)


# ----------------------------------------------------------------------------- CSV

def _read_text(path) -> str:
    """A whole text file as str: BOM dropped, binary / non-UTF-8 / missing -> DataError."""
    name = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{name}: is a directory, expected a file") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read ({e.strerror or e})") from None
    if b"\x00" in raw:
        raise DataError(f"{name}: not a text file (binary data)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{name}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); "
                        f"save the file as UTF-8") from None
    return text


def _delimiter(path) -> str:
    return "\t" if str(path).lower().endswith((".tsv", ".tab")) else ","


def _read_csv(path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """-> (header, [(row number, {column: stripped value})]) with blank rows skipped."""
    name = str(path)
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{name}: empty file")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(path))
    rows = []
    header = None
    try:
        for rownum, fields in enumerate(reader, start=1):
            fields = [f.strip() for f in fields]
            if not any(fields):
                continue  # blank line (or a row of empty cells)
            if header is None:
                header = fields
                if "" in header:
                    raise DataError(f"{_where(name, rownum)}: the header has an empty column "
                                    f"name (column {header.index('') + 1})")
                dup = next((c for i, c in enumerate(header) if c in header[:i]), None)
                if dup is not None:
                    raise DataError(f"{_where(name, rownum)}: column {dup!r} appears more than "
                                    f"once in the header")
                header_row = rownum
                continue
            if len(fields) > len(header) and any(fields[len(header):]):
                raise DataError(f"{_where(name, rownum)}: {len(fields)} fields, but the header "
                                f"(row {header_row}) has {len(header)} columns")
            if len(fields) < len(header):
                raise DataError(f"{_where(name, rownum)}: {len(fields)} fields, but the header "
                                f"(row {header_row}) has {len(header)} columns "
                                f"(missing: {', '.join(repr(c) for c in header[len(fields):])})")
            rows.append((rownum, dict(zip(header, fields))))
    except csv.Error as e:
        raise DataError(f"{_where(name, reader.line_num)}: malformed CSV ({e})") from None
    if header is None:
        raise DataError(f"{name}: empty file")
    return header, rows


def _require_columns(name, header, columns):
    for c in columns:
        if c not in header:
            raise DataError(f"{name}: no column {c!r}; the columns are: "
                            f"{', '.join(repr(h) for h in header)}")


def _parse_float(value: str, where: str) -> float:
    if value == "":
        raise DataError(f"{where}: empty value, expected a number")
    try:
        x = float(value)
    except ValueError:
        raise DataError(f"{where}: {value!r} is not a number") from None
    if not math.isfinite(x):
        raise DataError(f"{where}: {value!r} is not a finite number")
    return x


def _records_from_rows(spec: DataSpec, name: str, rows) -> list[Record]:
    out = []
    for rownum, values in rows:
        seq = values[spec.sequence_column]
        if spec.task == "regression":
            target = tuple(_parse_float(values[c], _where(name, rownum, c))
                           for c in spec.target_columns)
        else:
            target = values[spec.target_columns[0]]
            if target == "":
                raise DataError(f"{_where(name, rownum, spec.target_columns[0])}: empty label")
        mask = values[spec.mask_column] if spec.mask_column is not None else None
        out.append(_make_record(spec.task, seq, target, mask, name, rownum, "row",
                                (spec.sequence_column, spec.target_columns[0], spec.mask_column),
                                spec.max_residues, spec.truncate))
    return out


def _load_csv(spec: DataSpec, path, split_column=None):
    name = str(path)
    header, rows = _read_csv(path)
    needed = [spec.sequence_column, *spec.target_columns]
    needed += [c for c in (spec.mask_column, split_column) if c is not None]
    _require_columns(name, header, needed)
    return name, rows


def load_splits(spec: DataSpec, train=None, valid=None, test=None, csv=None) -> dict[str, list[Record]]:
    """Labelled records per split: {"train": [...], "valid": [...], "test": [...]}.

    Either per-split files (`train` required, `valid` / `test` optional), or one `csv`
    whose `spec.split_column` says train / valid / test for each row (aliases: see the
    module docstring). Only splits that are present get a key; a file without data rows,
    or a single CSV without train rows, is an error.
    """
    if csv is not None:
        if any(p is not None for p in (train, valid, test)):
            raise DataError("give either one csv with a split column, or train/valid/test "
                            "files, not both")
        if spec.split_column is None:
            raise DataError(f"{csv}: a single CSV needs a split column (train/valid/test)")
        name, rows = _load_csv(spec, csv, spec.split_column)
        if not rows:
            raise DataError(f"{name}: no data rows")
        by_split = {s: [] for s in SPLITS}
        for rownum, values in rows:
            raw = values[spec.split_column]
            split = SPLIT_ALIASES.get(raw.lower())
            if split is None:
                raise DataError(f"{_where(name, rownum, spec.split_column)}: split {raw!r} is "
                                f"not one of train, valid (or validation/val/dev), test")
            by_split[split].append((rownum, values))
        if not by_split["train"]:
            raise DataError(f"{name}: split 'train' has no rows")
        return {s: _records_from_rows(spec, name, r) for s, r in by_split.items() if r}
    if train is None:
        raise DataError("no training data given (a train file, or one csv with a split column)")
    if spec.split_column is not None:
        raise DataError("a split column is only used with one csv holding all splits; "
                        "with separate train/valid/test files leave it unset")
    loaded = {}
    for split, path in (("train", train), ("valid", valid), ("test", test)):
        if path is None:
            continue
        name, rows = _load_csv(spec, path)
        if not rows:
            raise DataError(f"{name}: no data rows")
        loaded[split] = (name, rows)
    return {s: _records_from_rows(spec, name, rows) for s, (name, rows) in loaded.items()}


def records_from_pairs(pairs, task="regression", source="<memory>", max_residues: int | None = 1022,
                       truncate: bool = False) -> list[Record]:
    """In-memory (sequence, target) pairs -> Records (the Python API's dataset).

    target: a number or a tuple/list of numbers (regression, the same count for every
    pair); a class name (classification); a string with one label per residue
    (token-classification, where a third element, a "1"/"0" mask string, is allowed).
    Errors name `source` and the 0-based item index.
    """
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    out, n_targets = [], None
    for i, pair in enumerate(pairs):
        here = lambda col=None: _where(source, i, col, "item")  # noqa: E731
        if not isinstance(pair, (tuple, list)) or len(pair) not in (2, 3):
            raise DataError(f"{here()}: expected a (sequence, target) pair")
        if len(pair) == 3 and task != "token-classification":
            raise DataError(f"{here()}: a third element (mask) is only used by "
                            f"token-classification")
        seq, target = pair[0], pair[1]
        mask = pair[2] if len(pair) == 3 else None
        if not isinstance(seq, str):
            raise DataError(f"{here('sequence')}: expected a string, got {type(seq).__name__}")
        if task == "regression":
            if isinstance(target, torch.Tensor):
                target = target.tolist()
            values = tuple(target) if isinstance(target, (tuple, list, np.ndarray)) else (target,)
            for v in values:
                if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                    raise DataError(f"{here('target')}: {v!r} is not a finite number")
            if not values:
                raise DataError(f"{here('target')}: no target values")
            if n_targets is None:
                n_targets = len(values)
            elif len(values) != n_targets:
                raise DataError(f"{here('target')}: {len(values)} target values, item 0 has "
                                f"{n_targets}")
            target = tuple(float(v) for v in values)
        else:
            if not isinstance(target, str) or not target.strip():
                raise DataError(f"{here('target')}: expected a non-empty string label, got "
                                f"{target!r}")
            target = target.strip()
            if mask is not None and not isinstance(mask, str):
                raise DataError(f"{here('mask')}: expected a '1'/'0' string")
        out.append(_make_record(task, seq.strip(), target, mask, source, i, "item",
                                ("sequence", "target", "mask"), max_residues, truncate))
    if not out:
        raise DataError(f"{source}: no data")
    return out


# ----------------------------------------------------------------------------- inference input

def _looks_like_fasta(path) -> bool:
    if str(path).lower().endswith(FASTA_SUFFIXES):
        return True
    if str(path).lower().endswith((".csv", ".tsv", ".tab")):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b">")


def _check_length(tokens: list[int], where: str, max_residues: int | None, truncate: bool) -> None:
    if max_residues is not None and not truncate and len(tokens) - 2 > max_residues:
        raise DataError(f"{where}: {len(tokens) - 2} residues, more than the maximum {max_residues} "
                        "(--truncate cuts longer sequences)")


def read_sequences(path, sequence_column="sequence", id_column=None, max_residues: int | None = None,
                   truncate: bool = False) -> list[tuple[str, str]]:
    """Sequences to score -> [(id, sequence)] in input order.

    FASTA (by suffix .fa/.fasta/.faa/.fas, or content starting with '>'), otherwise CSV
    (.tsv/.tab: tab-separated). CSV ids come from `id_column`, or are "row<N>" with N the
    spreadsheet row (header = 1). Every sequence is checked with the tokenizer (and against
    max_residues unless truncate); ids must be unique.
    """
    if _looks_like_fasta(path):
        return read_fasta(path, max_residues, truncate)
    name = str(path)
    header, rows = _read_csv(path)
    _require_columns(name, header, [sequence_column] + ([id_column] if id_column else []))
    if not rows:
        raise DataError(f"{name}: no data rows")
    out, seen = [], {}
    for rownum, values in rows:
        if id_column is None:
            sid = f"row{rownum}"
        else:
            sid = values[id_column]
            if sid == "":
                raise DataError(f"{_where(name, rownum, id_column)}: empty id")
            if sid in seen:
                raise DataError(f"{_where(name, rownum, id_column)}: duplicate id {sid!r} "
                                f"(also on row {seen[sid]})")
            seen[sid] = rownum
        seq = values[sequence_column]
        where = _where(name, rownum, sequence_column)
        _check_length(_encode_sequence(seq, where), where, max_residues, truncate)
        out.append((sid, seq))
    return out


def read_fasta(path, max_residues: int | None = None, truncate: bool = False) -> list[tuple[str, str]]:
    """FASTA -> [(id, sequence)] in file order.

    Multi-line records, lowercase, blank lines, CRLF and a BOM are fine; id = first word of
    the header; lines starting with ';' are comments. Errors name the record (1-based), its
    id and the line: sequence lines before the first header, an empty header or record,
    duplicate ids, unknown residues.
    """
    name = str(path)
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{name}: empty file")
    records = []  # [id, header line, [(line number, stripped line)]]
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith(";"):
            continue
        if s.startswith(">"):
            words = s[1:].split()
            if not words:
                raise DataError(f"{name}, line {lineno}, record {len(records) + 1}: header "
                                f"without an id")
            records.append([words[0], lineno, []])
        elif not records:
            raise DataError(f"{name}, line {lineno}: sequence line before the first '>' "
                            f"header; is this a FASTA file?")
        else:
            records[-1][2].append((lineno, "".join(s.split())))
    if not records:
        raise DataError(f"{name}: no FASTA records")
    out, seen = [], {}
    for k, (sid, header_line, lines) in enumerate(records, start=1):
        label = f"{name}, record {k} ({sid!r}, line {header_line})"
        if sid in seen:
            j, first_line = seen[sid]
            raise DataError(f"{name}: duplicate id {sid!r} in record {j} (line {first_line}) "
                            f"and record {k} (line {header_line})")
        seen[sid] = (k, header_line)
        seq = "".join(piece for _, piece in lines)
        if not seq:
            raise DataError(f"{label}: empty sequence")
        try:
            _check_length(_TOKENIZER.encode(seq), label, max_residues, truncate)
        except TokenizerError as e:
            msg = str(e).split(": ", 1)[1]
            # name the file line of the bad character
            bad_line = lines[0][0]
            if "at position " in msg:
                pos = int(msg.rsplit("at position ", 1)[1])
                start = 0
                for ln, piece in lines:
                    if pos <= start + len(piece):
                        bad_line = ln
                        break
                    start += len(piece)
            raise DataError(f"{name}, record {k} ({sid!r}), line {bad_line}: {msg}") from None
        out.append((sid, seq))
    return out


# ----------------------------------------------------------------------------- targets

@dataclass
class LabelSpace:
    """Everything needed to encode targets and rebuild a head; stored in checkpoints as JSON."""

    task: str
    target_names: list[str]  # regression column names; classification/token: [the label column]
    classes: list[str]  # sorted class names / label chars seen in train; [] for regression
    mean: list[float] | None = None  # regression standardisation (None = off)
    std: list[float] | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise DataError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        self.target_names = list(self.target_names)
        self.classes = list(self.classes)
        self._index = {c: i for i, c in enumerate(self.classes)}

    @classmethod
    def fit(cls, task, train_records, target_names, standardize=False) -> "LabelSpace":
        """Classes (sorted) or regression mean/std (population std; 1 where constant) from
        the training records."""
        if isinstance(target_names, str):
            target_names = [target_names]
        target_names = list(target_names)
        if not train_records:
            raise DataError("no training records to fit the labels on")
        source = train_records[0].source
        if task == "regression":
            y = np.array([r.target for r in train_records], dtype=np.float64)
            if y.ndim != 2 or y.shape[1] != len(target_names):
                raise DataError(f"{source}: {y.shape[-1] if y.ndim == 2 else '?'} target values "
                                f"per record, but {len(target_names)} target names")
            mean = std = None
            if standardize:
                mean = y.mean(0)
                std = y.std(0)
                std = np.where(std > 0, std, 1.0)
                mean, std = mean.tolist(), std.tolist()
            return cls(task, target_names, [], mean, std)
        if len(target_names) != 1:
            raise DataError(f"task {task!r} takes exactly one target column, got {target_names}")
        if task == "classification":
            classes = sorted({r.target for r in train_records})
        else:
            classes = sorted({c for r in train_records
                              for c, m in zip(r.target, r.mask or "1" * len(r.target)) if m == "1"})
        if len(classes) < 2:
            raise DataError(f"{source}, column {target_names[0]!r}: {len(classes)} distinct "
                            f"label(s) {classes} in the training data; classification needs "
                            f"at least two")
        return cls(task, target_names, classes)

    def check(self, records) -> None:
        """DataError for a label unseen in training, or a wrong number of targets."""
        for r in records:
            col = r.target_column
            if self.task == "regression":
                if len(r.target) != len(self.target_names):
                    raise DataError(f"{r.where()}: {len(r.target)} target values, the model "
                                    f"predicts {len(self.target_names)}")
            elif self.task == "classification":
                if r.target not in self._index:
                    raise DataError(f"{r.where(col)}: class {r.target!r} was not seen in "
                                    f"training (classes: {', '.join(self.classes)})")
            else:
                mask = r.mask or "1" * len(r.target)
                for i, (c, m) in enumerate(zip(r.target, mask)):
                    if m == "1" and c not in self._index:
                        raise DataError(f"{r.where(col)}: label {c!r} at position {i + 1} was "
                                        f"not seen in training (labels: {''.join(self.classes)})")

    def to_dict(self) -> dict:
        return {"task": self.task, "target_names": list(self.target_names),
                "classes": list(self.classes), "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, d) -> "LabelSpace":
        try:
            return cls(task=d["task"], target_names=list(d["target_names"]),
                       classes=list(d.get("classes", [])), mean=d.get("mean"), std=d.get("std"))
        except (KeyError, TypeError) as e:
            raise DataError(f"bad label space {d!r}: {e}") from None

    @property
    def num_outputs(self) -> int:
        return len(self.target_names) if self.task == "regression" else len(self.classes)

    def encode(self, records) -> torch.Tensor:
        """regression: float32 [N, n_targets] (standardised when mean/std are set);
        classification: long [N]; token-classification: long [N, T_max] aligned with the
        padded tokens (cls, eos, pad and mask-0 residues = -100, residue i at i + 1)."""
        self.check(records)
        if self.task == "regression":
            y = torch.tensor([r.target for r in records], dtype=torch.float64).reshape(
                len(records), len(self.target_names))
            if self.mean is not None:
                y = (y - torch.tensor(self.mean, dtype=torch.float64)) / torch.tensor(
                    self.std, dtype=torch.float64)
            return y.float()
        if self.task == "classification":
            return torch.tensor([self._index[r.target] for r in records], dtype=torch.long)
        T = max(len(r.tokens) for r in records)
        out = torch.full((len(records), T), IGNORE_INDEX, dtype=torch.long)
        for b, r in enumerate(records):
            mask = r.mask or "1" * len(r.target)
            ids = [self._index[c] if m == "1" else IGNORE_INDEX for c, m in zip(r.target, mask)]
            out[b, 1: 1 + len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def unstandardize(self, values: torch.Tensor) -> torch.Tensor:
        """Regression values [N, n] on the training scale -> the original scale (float32,
        or float64 for float64 input)."""
        values = torch.as_tensor(values)
        values = values.double() if values.dtype == torch.float64 else values.float()
        if self.mean is None:
            return values
        mean = torch.tensor(self.mean, dtype=values.dtype, device=values.device)
        std = torch.tensor(self.std, dtype=values.dtype, device=values.device)
        return values * std + mean

    def decode(self, outputs: torch.Tensor, lengths=None, tokens=None):
        """Head outputs -> predictions.

        regression: [N, n] -> float tensor on the original scale; classification: logits
        [N, C] (or class indices [N]) -> list of class names; token-classification: logits
        [N, T, C] -> list of label strings, one char per residue; needs `lengths` (residues
        per sequence) or the padded `tokens` [N, T] the outputs came from.
        """
        outputs = torch.as_tensor(outputs).detach()
        if self.task == "regression":
            return self.unstandardize(outputs.reshape(outputs.shape[0], -1).cpu())
        if self.task == "classification":
            idx = outputs if outputs.dim() == 1 else outputs.argmax(-1)
            return [self.classes[i] for i in idx.cpu().tolist()]
        if lengths is None:
            if tokens is None:
                raise ValueError("token-classification decode needs lengths or tokens")
            tokens = torch.as_tensor(tokens)
            lengths = (~(tokens.eq(CLS) | tokens.eq(EOS) | tokens.eq(PAD))).sum(-1).tolist()
        idx = (outputs if outputs.dim() == 2 else outputs.argmax(-1)).cpu().tolist()
        return ["".join(self.classes[c] for c in row[1: 1 + int(n)]) for row, n in zip(idx, lengths)]


# ----------------------------------------------------------------------------- batches

def make_batches(lengths: list[int], batch_tokens: int, shuffle: bool, seed: int = 0,
                 epoch: int = 0) -> list[list[int]]:
    """Indices grouped into length-bucketed batches with max(len) * len(batch) <= batch_tokens
    (a sequence longer than the budget goes alone). `lengths` are token counts.

    shuffle=False: longest first, ties by index (so an out-of-memory shows at once).
    shuffle=True: the indices are permuted with a generator seeded by (seed, epoch), cut
    into chunks of about 50 batches, each chunk sorted by length (random tie-breaks) and
    batched, and then the order of all batches is permuted. Same (seed, epoch) -> same
    batches; every index appears exactly once.
    """
    if int(batch_tokens) < 1:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    n = len(lengths)
    if n == 0:
        return []

    def greedy(order):  # order: indices sorted by decreasing length
        batches, cur, cur_max = [], [], 0
        for i in order.tolist():
            m = max(cur_max, int(lengths[i]))
            if cur and m * (len(cur) + 1) > batch_tokens:
                batches.append(cur)
                cur, m = [], int(lengths[i])
            cur.append(i)
            cur_max = m
        if cur:
            batches.append(cur)
        return batches

    if not shuffle:
        return greedy(np.lexsort((np.arange(n), -lengths)))
    rng = np.random.default_rng([int(seed), int(epoch)])
    perm = rng.permutation(n)
    per_batch = max(1, int(batch_tokens) // max(1, int(np.mean(lengths))))
    chunk = max(1, 50 * per_batch)
    batches = []
    for start in range(0, n, chunk):
        part = perm[start: start + chunk]
        # stable sort by decreasing length keeps the random order among equal lengths
        batches += greedy(part[np.argsort(-lengths[part], kind="stable")])
    order = rng.permutation(len(batches))
    return [batches[k] for k in order]


def collate(records: list[Record], label_space: LabelSpace | None) -> dict:
    """{"tokens": LongTensor [B, T] right-padded with <pad> (1), "target": encoded targets
    (see LabelSpace.encode) or None}."""
    T = max(len(r.tokens) for r in records)
    tokens = torch.full((len(records), T), PAD, dtype=torch.long)
    for b, r in enumerate(records):
        tokens[b, : len(r.tokens)] = torch.tensor(r.tokens, dtype=torch.long)
    target = label_space.encode(records) if label_space is not None else None
    return {"tokens": tokens, "target": target}


__all__ = ["TASKS", "IGNORE_INDEX", "DataSpec", "Record", "load_splits", "records_from_pairs",
           "read_sequences", "read_fasta", "LabelSpace", "make_batches", "collate"]
