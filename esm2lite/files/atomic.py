"""Atomic writes: a reader sees the old file/directory or the new one, never half of one.

Results get the permissions a plain open() / mkdir() would give them under the caller's umask
(mkstemp and mkdtemp create 0600 / 0700 temporaries, which a colleague could not read). A write
that fails (disk full, file too large, no permission) is one Esm2liteError naming the file, and
leaves nothing behind.
"""

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile

from esm2lite.errors import Esm2liteError


def umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), else by setting
    and restoring it."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_error(path: str, e: Exception) -> Esm2liteError:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:200]
    return Esm2liteError(f"{path}: cannot write ({reason})")


def _is_write_error(e: Exception) -> bool:
    return isinstance(e, OSError) or type(e).__name__ == "SafetensorError"  # safetensors' I/O errors


def _temporary(path: str) -> str:
    """A new empty hidden file beside `path` (.NAME.*.tmp)."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
        os.close(fd)
    except OSError as e:
        raise _write_error(path, e) from None
    return tmp


def _seal(tmp: str) -> None:
    """The umask's permissions, and the data on disk, before the rename that publishes it."""
    os.chmod(tmp, 0o666 & ~umask())
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside `path`; on success it is renamed onto `path`."""
    tmp = _temporary(path)
    try:
        yield tmp
        _seal(tmp)
        os.replace(tmp, path)
    except Exception as e:
        if _is_write_error(e):
            raise _write_error(path, e) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def csv_text(rows: list[dict]) -> str:
    """Rows (dicts with the same keys, in column order) as CSV text with a header."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def json_text(obj) -> str:
    return json.dumps(obj, indent=2) + "\n"


def write_csv(path: str, rows: list[dict]) -> None:
    """Rows (dicts with the same keys, in column order) as a CSV with a header; written atomically."""
    write_text(path, csv_text(rows))


def write_json(path: str, obj) -> None:
    write_text(path, json_text(obj))


def write_together(files: list[tuple[str, str | None]]) -> None:
    """Text files (path, text) replaced as one set, such as predictions and the metrics that describe
    them: whenever a kill comes, what is there is old files only or new files only, never a new file
    beside an old one of the set. text None: the file is removed (an old metrics JSON must not pass
    for predictions that have none).

    1. every new file is written in full under a hidden temporary name;
    2. the old versions are removed, all but the first file's (its rename replaces it at once);
    3. the new files are renamed into place, in list order.

    A kill in 1 leaves the old set; in 2, part of the old set; in 3, the first k new files and no old
    one. So the file that vouches for the others goes last: the metrics appear only beside the
    predictions they were computed from."""
    staged = []
    try:
        for path, text in files:
            if text is not None:
                staged.append((path, tmp := _temporary(path)))
                with open(tmp, "w", encoding="utf-8", newline="") as f:
                    f.write(text)
                _seal(tmp)
        for path, _ in files:
            if not staged or path != staged[0][0]:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
        for path, tmp in staged:
            os.replace(tmp, path)
    except OSError as e:
        raise _write_error(path, e) from None
    finally:
        for _, tmp in staged:
            if os.path.exists(tmp):
                os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str, overwrite: bool = False):
    """Yield a temporary directory; on success it replaces `path` in (nearly) one rename: an old
    `path` is first moved aside into a hidden `.NAME.*.old` (what a kill between the two renames
    leaves; the caller's cleanup removes it).

    With overwrite=False an existing non-empty `path` is an error raised before any work."""
    path = os.path.abspath(path)
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"{path}: output directory exists and is not empty")
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        yield tmp
        _plain_permissions(tmp)
        _replace_dir(tmp, path)
    except Exception as e:
        if _is_write_error(e):
            raise _write_error(path, e) from None
        raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _plain_permissions(top: str) -> None:
    """What open() / mkdir() give under the umask, for the directory and everything in it
    (safetensors, like mkdtemp, creates its files 0600)."""
    mask = umask()
    os.chmod(top, 0o777 & ~mask)
    for root, dirs, files in os.walk(top):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _replace_dir(tmp: str, path: str) -> None:
    if not os.path.exists(path):
        os.replace(tmp, path)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=os.path.dirname(path))
    os.replace(path, os.path.join(old, "x"))
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def remove_dir(path: str) -> None:
    """Delete a directory so that no reader ever sees it half deleted: hide it by one rename
    (`.NAME.*.old`), then remove it."""
    if not os.path.isdir(path):
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=os.path.dirname(path))
    os.replace(path, os.path.join(old, "x"))
    shutil.rmtree(old, ignore_errors=True)
