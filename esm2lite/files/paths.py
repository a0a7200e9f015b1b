"""Outputs never touch inputs, whatever path spelling reaches them.

Every command checks its outputs against what it reads (the data, the checkpoint, the base
model) before any work: an output that is an input, lies inside one, or (a directory that the
command replaces) holds one is one error line naming both. Two paths name the same thing when
their resolved forms are equal (symbolic links followed, '.' and '..' gone: `./x`, `../dir/x`
and a link to x all resolve to x) or when they are the same file on disk ((st_dev, st_ino):
hard links, bind mounts). An output that is a symbolic link to nothing is refused too: writing
there would fail only after the model has loaded, with a bare errno.
"""

import os
from typing import NamedTuple

from esm2lite.errors import Esm2liteError


class Input(NamedTuple):
    path: str | None
    what: str  # for the error line, e.g. "the input (--input x.csv)"


def _identity(path: str):
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _resolved_chain(path: str) -> list[str]:
    """`path` resolved, then each directory above it, up to /."""
    chain = [os.path.realpath(path)]
    while os.path.dirname(chain[-1]) != chain[-1]:
        chain.append(os.path.dirname(chain[-1]))
    return chain


def within(inner: str, outer: str) -> bool:
    """`inner` is `outer` or lies inside it, by resolved name or by identity on disk."""
    real, ident = os.path.realpath(outer), _identity(outer)
    return any(p == real or (ident is not None and _identity(p) == ident) for p in _resolved_chain(inner))


def dangling(path: str) -> str | None:
    """The symbolic link to nothing that `path` is, or passes through (None when there is none)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        if os.path.islink(probe):
            return probe
        if os.path.dirname(probe) == probe:
            return None
        probe = os.path.dirname(probe)
    return None


def check_output(output: str, choose: str, inputs=(), replaces: bool = False) -> None:
    """Esm2liteError when `output` is a dangling link, or is, lies inside or (`replaces`: a directory
    this command replaces or removes) holds one of `inputs` (Input rows; absent ones are skipped).
    `choose`: the option the user changes, e.g. "--output"."""
    link = dangling(output)
    if link is not None:
        where = "is" if os.path.abspath(output) == link else f"passes through {link},"
        raise Esm2liteError(f"{output}: {where} a symbolic link to {os.readlink(link)}, which does not exist; "
                            f"remove the link or choose another {choose}")
    for src in inputs:
        if not src.path or not os.path.lexists(src.path):
            continue
        if within(output, src.path):
            same = within(src.path, output)
            raise Esm2liteError(f"{output}: is {'also' if same else 'inside'} {src.what}; choose another {choose}")
        if replaces and within(src.path, output):
            raise Esm2liteError(f"{output}: holds {src.what}; choose another {choose}")


def check_output_dir(path: str, overwrite: bool, choose: str, inputs=()) -> None:
    """An output directory a command writes whole (export, convert): not an input, not holding one,
    not a file, and empty unless `overwrite`. Fails before any work."""
    check_output(path, choose, inputs, replaces=True)
    if os.path.exists(path) and not os.path.isdir(path):
        raise Esm2liteError(f"{path}: exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise Esm2liteError(f"{path}: output directory exists and is not empty (--overwrite replaces it)")
