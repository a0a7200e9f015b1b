"""Reading text and JSON files that may be anything: a size cap, binary data refused at once,
one-line errors naming the file.

A path may be a device (/dev/zero), a pipe or a file of many GB: it is read in chunks, a NUL
byte ends the read as "binary" at once, and more than `limit` bytes is an error instead of a
MemoryError.
"""

import json

from .errors import Esm2liteError

CHUNK = 1 << 20
MAX_TEXT_BYTES = 4 << 30  # a CSV / FASTA of data
MAX_JSON_BYTES = 64 << 20  # a config or state file


def read_bytes(path, error=Esm2liteError, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The file's bytes; `error` (a message naming the file) when it is missing, a directory,
    unreadable, binary (a NUL byte) or longer than `limit`."""
    name, parts, size = str(path), [], 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                if b"\x00" in chunk:
                    raise error(f"{name}: not a text file (binary data)")
                size += len(chunk)
                if size > limit:
                    raise error(f"{name}: larger than {limit >> 20} MiB; is this the right file?")
                parts.append(chunk)
    except FileNotFoundError:
        raise error(f"{name}: no such file") from None
    except IsADirectoryError:
        raise error(f"{name}: is a directory, expected a file") from None
    except OSError as e:
        raise error(f"{name}: cannot read ({e.strerror or e})") from None
    return b"".join(parts)


def read_text(path, error=Esm2liteError, limit: int = MAX_TEXT_BYTES) -> str:
    """A whole UTF-8 text file as str (a byte-order mark dropped)."""
    raw = read_bytes(path, error, limit)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise error(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); "
                    f"save the file as UTF-8") from None


def read_json(path, error=Esm2liteError, limit: int = MAX_JSON_BYTES):
    """A JSON file's value; a missing file says "file not found", bad JSON "not valid JSON"."""
    try:
        text = read_text(path, error, limit)
    except error as e:
        if str(e) == f"{path}: no such file":
            raise error(f"{path}: file not found") from None
        raise
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise error(f"{path}: not valid JSON ({' '.join(str(e).split())[:200]})") from None
