"""The project's own error types: every expected failure is one of these.

Messages are one line and name the file, row/record and field where there is one,
so that the command-line tools can print them without a traceback.
"""


class Esm2liteError(ValueError):
    """Base class for every error esm2lite raises on bad input."""


class TokenizerError(Esm2liteError):
    """A sequence that cannot be tokenised (unknown character, empty, too long)."""


class CheckpointError(Esm2liteError):
    """A checkpoint that is missing, corrupt, unsafe or does not fit the model."""


class DataError(Esm2liteError):
    """A data file (CSV / FASTA) with a bad row, column or value."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM during training: a checkpoint was saved; --resume continues."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def quoted(value, limit: int = 60) -> str:
    """repr(value) for an error line, cut to about `limit` characters: a 10 MB FASTA id or cell
    must not become a 10 MB message."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(str(value))} characters)"


def key_mismatch(expected: dict, got: dict, unexpected) -> str:
    """"" when the tensors `got` fit `expected` (name -> shape); otherwise one clause per kind of
    problem, e.g. "1 missing keys: a; 1 shape mismatches: b file (4, 2) vs model (4, 3)", at most
    8 keys shown in each. Used for base weights, fine-tuned weights, shards and adapters alike."""
    missing = sorted(set(expected) - set(got))
    shapes = [f"{k} file {tuple(got[k].shape)} vs model {tuple(expected[k])}"
              for k in sorted(set(expected) & set(got)) if tuple(got[k].shape) != tuple(expected[k])]
    clauses = []
    for what, items in (("missing keys", missing), ("unexpected keys", sorted(unexpected)), ("shape mismatches", shapes)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items) - 8} more)" if len(items) > 8 else "")
            clauses.append(f"{len(items)} {what}: {shown}")
    return "; ".join(clauses)


def plural(n: int, word: str, words: str | None = None) -> str:
    """'1 sequence', '2 sequences' (words: an irregular plural) for messages people read."""
    return f"{n} {word if n == 1 else words or word + 's'}"
