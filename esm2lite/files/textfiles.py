"""Reading files that may be anything: a size cap, binary data refused at once, one-line errors
naming the file.

A path may be a device (/dev/zero), a FIFO, a pipe or a file of many GB. Nothing here blocks on
opening (O_NONBLOCK: a FIFO without a writer would block a plain open() forever), and what is
checked is the open descriptor itself (fstat), so it is what is read:
- `regular=True` (every file of a checkpoint or model directory): a regular file only (a symlink
  to one is followed); a device, FIFO or socket is refused before a byte is read.
- otherwise (data files named on the command line, which may be `<(zcat x.csv.gz)`): read in
  chunks, a NUL byte ends the read as "binary" at once, more than `limit` bytes is an error
  instead of a MemoryError.
- a regular file whose size or modification time changes while it is read is refused (it is
  being written). `complete=True` (CSV / FASTA data) also refuses a file whose last line has no
  line end and that was modified less than FRESH_SECONDS ago: it may be still being written, and
  its partly written last row would be read as a shorter one. A complete file can always be
  made acceptable by ending its last line.
"""

import json
import os
import stat
import time

from esm2lite.errors import Esm2liteError

CHUNK = 1 << 20
MAX_TEXT_BYTES = 4 << 30  # a CSV / FASTA of data
MAX_JSON_BYTES = 64 << 20  # a config or state file
FRESH_SECONDS = 60  # complete=True: an unended last line this recent may be still being written


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "something else"


def open_file(path, error=Esm2liteError, regular: bool = True, limit: int | None = None,
              what: str = "not a regular file"):
    """(binary file object, its os.stat_result), opened for reading without ever blocking, checked
    on the open descriptor. `error` when it is missing, a directory, unreadable, (regular) anything
    but a regular file ("NAME: <what>: it is a FIFO ..."), or a regular file over `limit` bytes."""
    name = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error(f"{name}: no such file") from None
    except OSError as e:
        raise error(f"{name}: cannot read ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise error(f"{name}: is a directory, expected a file")
        if regular and not stat.S_ISREG(st.st_mode):
            link = f" (a link to {os.path.realpath(path)})" if os.path.islink(path) else ""
            raise error(f"{name}: {what}: it is {_kind(st.st_mode)}{link}; only regular files are read here")
        if limit is not None and stat.S_ISREG(st.st_mode) and st.st_size > limit:
            raise error(f"{name}: {st.st_size} bytes, larger than the {limit >> 20} MiB this file may have; "
                        "is this the right file?")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


def changed_while_read(before: os.stat_result, f) -> bool:
    """A regular file whose size or modification time is not what it was when it was opened."""
    after = os.fstat(f.fileno())
    return stat.S_ISREG(before.st_mode) and (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns)


def _unended_and_fresh(raw: bytes, st: os.stat_result) -> float | None:
    """The file's age in seconds when its last line has no line end and it was modified less than
    FRESH_SECONDS ago (or is dated in the future); None otherwise."""
    if not raw or raw.endswith((b"\n", b"\r")) or not stat.S_ISREG(st.st_mode):
        return None
    age = time.time() - st.st_mtime
    return age if abs(age) < FRESH_SECONDS else None


def read_bytes(path, error=Esm2liteError, limit: int = MAX_TEXT_BYTES, regular: bool = False,
               complete: bool = False) -> bytes:
    """The file's bytes; `error` (a message naming the file) when it is missing, a directory,
    unreadable, binary (a NUL byte), longer than `limit`, changed while being read, (regular) not a
    regular file, or (complete) perhaps still being written. See the module docstring."""
    name, parts, size = str(path), [], 0
    f, st = open_file(path, error, regular, limit, what="not a text file")
    with f:
        try:
            while chunk := f.read(CHUNK):
                if b"\x00" in chunk:
                    raise error(f"{name}: not a text file (binary data)")
                size += len(chunk)
                if size > limit:
                    raise error(f"{name}: larger than {limit >> 20} MiB; is this the right file?")
                parts.append(chunk)
            changed = changed_while_read(st, f) or (stat.S_ISREG(st.st_mode) and size != st.st_size)
        except OSError as e:
            raise error(f"{name}: cannot read ({e.strerror or e})") from None
    if changed:
        raise error(f"{name}: changed while it was being read (is it still being written?); "
                    "run again once it is complete")
    raw = b"".join(parts)
    age = _unended_and_fresh(raw, st) if complete else None
    if age is not None:
        last_line = raw.count(b"\n") + 1
        raise error(f"{name}, line {last_line}: the last line has no line end and the file was modified "
                    f"{max(age, 0):.0f} s ago, so it may be still being written (a partly written row would be read "
                    "as a shorter one); run again once it is complete, or end its last line with a newline")
    return raw


def read_text(path, error=Esm2liteError, limit: int = MAX_TEXT_BYTES, regular: bool = False,
              complete: bool = False) -> str:
    """A whole UTF-8 text file as str (a byte-order mark dropped)."""
    return decode_text(read_bytes(path, error, limit, regular, complete), path, error)


def decode_text(raw: bytes, path, error=Esm2liteError) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise error(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); "
                    f"save the file as UTF-8") from None


def read_json(path, error=Esm2liteError, limit: int = MAX_JSON_BYTES, regular: bool = False):
    """A JSON file's value; a missing file says "file not found", bad JSON "not valid JSON"."""
    try:
        text = read_text(path, error, limit, regular)
    except error as e:
        if str(e) == f"{path}: no such file":
            raise error(f"{path}: file not found") from None
        raise
    return parse_json(text, path, error)


def parse_json(text: str, path, error=Esm2liteError):
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise error(f"{path}: not valid JSON ({' '.join(str(e).split())[:200]})") from None
