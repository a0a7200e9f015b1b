"""Compatibility only: the names esm2lite.data held before the data layer was split into
records.py (Record, DataSpec, records_from_pairs), reading.py (CSV / FASTA files), labels.py
(LabelSpace) and batching.py (make_batches, collate). Import from those; this module goes once
nothing imports it (esm2lite/dms.py, scoring.py and windows.py still do)."""

from .batching import collate, make_batches  # noqa: F401
from .constants import IGNORE_INDEX, SPLITS, TASKS  # noqa: F401
from .labels import LabelSpace  # noqa: F401
from .reading import load_splits, parse_float, read_csv, read_fasta, read_sequences, require_columns  # noqa: F401
from .records import DataSpec, Record, records_from_pairs, where  # noqa: F401

_parse_float, _read_csv, _require_columns, _where = parse_float, read_csv, require_columns, where
