"""Reading the files users give: labelled CSVs for training, CSV or FASTA sequences to score.

Conventions chosen here:
- CSV files: UTF-8 (a byte-order mark is fine), LF or CRLF line ends, comma-separated
  (`.tsv` / `.tab` files are tab-separated). Values are stripped of surrounding spaces.
  Blank lines count as rows (as an editor shows them) and are skipped.
- Split column values (case-insensitive): `train`; `valid`, `validation`, `val` or `dev`
  (all mean the validation split, key "valid"); `test`. Anything else is an error.
- CSV ids for inference without an id column: "row2", "row3", ... (the spreadsheet row).
- FASTA: id = first word of the header; lines starting with ';' are comments.
- Regression targets: finite float32 numbers (|x| <= 3.4e38, tasks.base.TARGET_LIMIT: they are
  trained on and scored in float32; 1e308, whose square is not even a float64, is refused);
  anything else is refused naming the file, row and column.
- A file that is perhaps still being written is refused, not read short (textfiles): one that
  changes while it is read, or whose last line has no line end and that was modified less than
  a minute ago (end the last line with a newline to have it read at once).

Files are read whole (textfiles.py caps the size) and every row of every split is checked
before anything is returned.
"""

from __future__ import annotations

import csv
import io
import re

from esm2lite.errors import DataError, TokenizerError, quoted
from esm2lite.data.records import DataSpec, Record, check_length, encode_sequence, make_record, residue_error, where, without_stop
from esm2lite.files.textfiles import read_text
from esm2lite.model.tokenizer import Tokenizer

SPLIT_ALIASES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid",
                 "dev": "valid", "test": "test"}
FASTA_SUFFIXES = (".fa", ".fasta", ".faa", ".fas")
# The id of every output row (training's predictions_*.csv, infer.py, esm2lite.predict): the id
# column's value when the input has one (--id-column, else a column named "id"); else the FASTA
# record's id (the rest of its header line in a "description" column); else the row's number among
# the data rows, "1" for the first under the header (in Python, the sequence's place in the list,
# from 1). Error messages count spreadsheet rows instead (the header is row 1).
ID_RULE = "id column, else FASTA id, else the data row's number from 1"
MASK_WORDS = ("mask", "resolved")  # column names that look like a per-residue mask


# ----------------------------------------------------------------------------- CSV

def _text(path) -> str:
    text = read_text(path, DataError, complete=True)  # a file still being written is refused, not read short
    if not text.strip():
        raise DataError(f"{path}: empty file")
    return text


def _check_header(header: list[str], name: str, rownum: int, delimiter: str) -> None:
    if delimiter == "," and len(header) == 1 and "\t" in header[0]:
        raise DataError(f"{where(name, rownum)}: the header is tab-separated, but only files named .tsv or .tab are "
                        "read with tabs; rename the file to .tsv (or separate its columns with commas)")
    if "" in header:
        raise DataError(f"{where(name, rownum)}: the header has an empty column name "
                        f"(column {header.index('') + 1})")
    dup = next((c for i, c in enumerate(header) if c in header[:i]), None)
    if dup is not None:
        raise DataError(f"{where(name, rownum)}: column {quoted(dup)} appears more than once in the header")


def _check_width(fields: list[str], header: list[str], name: str, rownum: int, header_row: int) -> None:
    if len(fields) > len(header) and any(fields[len(header):]):
        raise DataError(f"{where(name, rownum)}: {len(fields)} fields, but the header "
                        f"(row {header_row}) has {len(header)} columns")
    if len(fields) < len(header):
        raise DataError(f"{where(name, rownum)}: {len(fields)} fields, but the header "
                        f"(row {header_row}) has {len(header)} columns "
                        f"(missing: {', '.join(quoted(c) for c in header[len(fields):])})")


def read_csv(path, text: str | None = None) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """-> (header, [(row number, {column: stripped value})]) with blank rows skipped (text: the
    file's contents, when already read)."""
    name = str(path)
    delimiter = "\t" if name.lower().endswith((".tsv", ".tab")) else ","
    reader = csv.reader(io.StringIO(_text(path) if text is None else text, newline=""), delimiter=delimiter)
    header, header_row, rows = None, None, []
    try:
        for rownum, fields in enumerate(reader, start=1):
            fields = [f.strip() for f in fields]
            if not any(fields):
                continue  # blank line (or a row of empty cells)
            if header is None:
                _check_header(fields, name, rownum, delimiter)
                header, header_row = fields, rownum
                continue
            _check_width(fields, header, name, rownum, header_row)
            rows.append((rownum, dict(zip(header, fields))))
    except csv.Error as e:
        raise DataError(f"{where(name, reader.line_num)}: malformed CSV ({e})") from None
    if header is None:
        raise DataError(f"{name}: empty file")
    return header, rows


def require_columns(name, header, columns) -> None:
    for c in columns:
        if c not in header:
            raise DataError(f"{name}: no column {quoted(c)}; the columns are: "
                            f"{', '.join(quoted(h) for h in header)}")


def _records_from_rows(spec: DataSpec, name: str, rows) -> list[Record]:
    """rows: (spreadsheet row, data row number, values), as _rows_of numbers them."""
    out = []
    for rownum, number, values in rows:
        target = spec.task.parse_target([values[c] for c in spec.target_columns],
                                        [where(name, rownum, c) for c in spec.target_columns])
        mask = values[spec.mask_column] if spec.mask_column is not None else None
        out.append(make_record(spec.task, values[spec.sequence_column], target, mask, name, rownum, "row",
                               spec.columns, spec.max_residues, spec.truncate))
        out[-1].id = values.get(spec.id_column or "id", str(number))  # the id rule: ID_RULE
    return out


def _rows_of(spec: DataSpec, path, split_column=None, note=None) -> tuple[str, list]:
    header, rows = read_csv(path)
    needed = [spec.sequence_column, *spec.target_columns]
    needed += [c for c in (spec.mask_column, split_column, spec.id_column) if c is not None]
    require_columns(str(path), header, needed)
    if not rows:
        raise DataError(f"{path}: no data rows")
    for column in unused_mask_columns(spec, header):
        (note or print)(f"WARNING: {path}: column {quoted(column)} looks like a per-residue mask, but no --mask-column "
                        f"was given, so every residue is trained on and scored; pass --mask-column {column} to leave "
                        "out the residues it marks 0")
    return str(path), [(rownum, number, values) for number, (rownum, values) in enumerate(rows, start=1)]


def unused_mask_columns(spec: DataSpec, header) -> list[str]:
    """Token classification without a mask column: the columns named like a mask (FLIP's
    `resolved`, BioNeMo's `labels_mask`), which are then not used."""
    if not spec.task.per_residue or spec.mask_column is not None:
        return []
    return mask_like(header)


def mask_like(columns) -> list[str]:
    """The column names that look like a per-residue mask (MASK_WORDS), in order."""
    return [c for c in columns if any(word in c.lower() for word in MASK_WORDS)]


def _split_rows(spec: DataSpec, csv_path, note=None) -> tuple[str, dict]:
    """One CSV with a split column -> (name, {split: [(spreadsheet row, data row number, values)]})."""
    name, rows = _rows_of(spec, csv_path, spec.split_column, note)
    by_split = {"train": [], "valid": [], "test": []}
    for rownum, number, values in rows:
        raw = values[spec.split_column]
        split = SPLIT_ALIASES.get(raw.lower())
        if split is None:
            raise DataError(f"{where(name, rownum, spec.split_column)}: split {quoted(raw)} is "
                            f"not one of train, valid (or validation/val/dev), test")
        by_split[split].append((rownum, number, values))
    if not by_split["train"]:
        raise DataError(f"{name}: split 'train' has no rows")
    return name, {s: r for s, r in by_split.items() if r}


def load_splits(spec: DataSpec, train=None, valid=None, test=None, csv=None, note=None) -> dict[str, list[Record]]:
    """Labelled records per split: {"train": [...], "valid": [...], "test": [...]}.

    Either per-split files (`train` required, `valid` / `test` optional), or one `csv`
    whose `spec.split_column` says train / valid / test for each row (aliases: see the
    module docstring). A per-split file that has `spec.split_column` must name its own split
    on every row. Only splits that are present get a key; a file without data rows, or a
    single CSV without train rows, is an error. `note` (default print) gets the warnings:
    token classification without a mask column, from a file with a column named like one.
    """
    if csv is not None:
        if any(p is not None for p in (train, valid, test)):
            raise DataError("give either one csv with a split column, or train/valid/test files, not both")
        if spec.split_column is None:
            raise DataError(f"{csv}: a single CSV needs a split column (train/valid/test)")
        name, by_split = _split_rows(spec, csv, note)
        return {s: _records_from_rows(spec, name, r) for s, r in by_split.items()}
    if train is None:
        raise DataError("no training data given (a train file, or one csv with a split column)")
    loaded = {s: _rows_of(spec, p, note=note) for s, p in (("train", train), ("valid", valid), ("test", test))
              if p is not None}
    for split, (name, rows) in loaded.items():
        _check_role(spec.split_column, name, rows, split)
    return {s: _records_from_rows(spec, name, rows) for s, (name, rows) in loaded.items()}


def _check_role(column: str | None, name: str, rows, split: str) -> None:
    """A per-split file may hold a split column only when every row names that file's split: one
    whose rows say otherwise was meant to be split by it (--csv), not trained on whole."""
    for rownum, _, values in rows:
        raw = values.get(column) if column is not None else None
        if raw is not None and SPLIT_ALIASES.get(raw.lower()) != split:
            raise DataError(f"{where(name, rownum, column)}: split {quoted(raw)} in the --{split}-csv file, whose rows "
                            f"are all used as {split}; to split the rows by this column write --csv {name} "
                            f"(--split-column {column}) instead")


# ----------------------------------------------------------------------------- sequences to score

def data_format(path) -> tuple[bool, str | None]:
    """(FASTA?, the text when it had to be read to tell). By suffix, else by the first character:
    the file is read once (a pipe such as <(zcat x.fa.gz) can be read only once)."""
    if str(path).lower().endswith(FASTA_SUFFIXES):
        return True, None
    if str(path).lower().endswith((".csv", ".tsv", ".tab")):
        return False, None
    text = _text(path)
    return text.lstrip("\ufeff \t\r\n").startswith(">"), text


def _csv_id(values: dict, id_column, rownum: int, number: int, name: str, seen: dict) -> str:
    if id_column is None:
        return str(number)
    sid = values[id_column]
    if sid == "":
        raise DataError(f"{where(name, rownum, id_column)}: empty id")
    if sid in seen:
        raise DataError(f"{where(name, rownum, id_column)}: duplicate id {quoted(sid)} (also on row {seen[sid]})")
    seen[sid] = rownum
    return sid


def read_sequences(path, sequence_column="sequence", id_column=None, max_residues: int | None = None,
                   truncate: bool = False) -> list[tuple[str, str]]:
    """Sequences to score -> [(id, sequence)] in input order.

    FASTA (by suffix .fa/.fasta/.faa/.fas, or content starting with '>'), otherwise CSV
    (.tsv/.tab: tab-separated). CSV ids come from `id_column`, or are the row's number among the
    data rows ("1" for the first row under the header): ID_RULE. Every sequence is checked with the tokenizer (and against
    max_residues unless truncate); ids must be unique.
    """
    fasta, text = data_format(path)
    if fasta:
        return read_fasta(path, max_residues, truncate, text)
    name = str(path)
    header, rows = read_csv(path, text)
    require_columns(name, header, [sequence_column] + ([id_column] if id_column else []))
    if not rows:
        raise DataError(f"{name}: no data rows")
    out, seen = [], {}
    for number, (rownum, values) in enumerate(rows, start=1):
        sid = _csv_id(values, id_column, rownum, number, name, seen)
        here = where(name, rownum, sequence_column)
        check_length(encode_sequence(values[sequence_column], here), here, max_residues, truncate)
        out.append((sid, values[sequence_column]))
    return out


def _fasta_records(text: str, name: str) -> list:
    """-> [[id, description, header line, [(line number, residues of the line)]]]."""
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith(";"):
            continue
        if s.startswith(">"):
            words = s[1:].split(maxsplit=1)
            if not words:
                raise DataError(f"{name}, line {lineno}, record {len(records) + 1}: header without an id")
            records.append([words[0], words[1].strip() if len(words) > 1 else "", lineno, []])
        elif not records:
            raise DataError(f"{name}, line {lineno}: sequence line before the first '>' header; is this a FASTA file?")
        else:
            records[-1][3].append((lineno, "".join(s.split())))
    if not records:
        raise DataError(f"{name}: no FASTA records")
    return records


def _bad_residue_line(msg: str, lines: list) -> int:
    """The file line holding the residue a tokenizer message points at ("... at position N")."""
    found = re.search(r"at position (\d+)", msg)
    if found is None:
        return lines[0][0]
    pos, start = int(found.group(1)), 0
    for ln, piece in lines:
        if pos <= start + len(piece):
            return ln
        start += len(piece)
    return lines[0][0]


def read_fasta(path, max_residues: int | None = None, truncate: bool = False,
               text: str | None = None, described: bool = False) -> list[tuple]:
    """FASTA -> [(id, sequence)] in file order; described: [(id, description, sequence)].

    Multi-line records, lowercase, blank lines, CRLF and a BOM are fine; id = first word of
    the header, description = the rest of it ("" if none); lines starting with ';' are comments. Errors name the record (1-based), its
    id and the line: sequence lines before the first header, an empty header or record,
    duplicate ids, unknown residues.
    """
    name = str(path)
    out, seen = [], {}
    for k, (sid, description, header_line, lines) in enumerate(_fasta_records(_text(path) if text is None else text, name),
                                                               start=1):
        if sid in seen:
            j, first_line = seen[sid]
            raise DataError(f"{name}: duplicate id {quoted(sid)} in record {j} (line {first_line}) "
                            f"and record {k} (line {header_line})")
        seen[sid] = (k, header_line)
        seq = "".join(piece for _, piece in lines)
        if not seq:
            raise DataError(f"{name}, record {k} ({quoted(sid)}, line {header_line}): empty sequence")
        try:
            tokens = Tokenizer().encode(without_stop(seq))
        except TokenizerError as e:
            msg = residue_error(e)
            raise DataError(f"{name}, record {k} ({quoted(sid)}), line {_bad_residue_line(msg, lines)}: "
                            f"{msg}") from None
        check_length(tokens, f"{name}, record {k} ({quoted(sid)}, line {header_line})", max_residues, truncate)
        out.append((sid, description, seq) if described else (sid, seq))
    return out
