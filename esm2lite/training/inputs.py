"""What a run reads, recorded and compared: a run never mixes inputs that changed under it.

    data     per split: the file, the sha256 of its bytes, the rows read from it
    base     the base model: the sha256 of its encoder weights and its encoder config (spec.BaseRef)
    options  the run's settings (RUN/config.json, which checkpointer compares on --resume)

Every step checkpoint records the data in its trainer_state.json ("data") and the base in its
config.json (spec: base.sha256, model_config). Three checks use them, each one line naming what
changed (train.py calls them):
- --resume compares the data files and the base with those of the checkpoint it continues from,
  before any step or any change to the run directory, and continues in the batch layout it used.
- Under torchrun the ranks compare all three before step 1 (one all_gather): node-local copies
  that differ stop every rank, naming the rank.
- While the run trains, the data files are checked again at every checkpoint and at the end (a
  stat; the sha256 when the stat moved): a file edited under the run stops it, naming the file.

A data file that is not a regular file (a pipe such as <(zcat x.csv.gz)) can be read only once:
its sha256 is null and only its row counts are compared; so are records given in memory
(train_model(records=...)).
"""

import hashlib
import os
import stat

from esm2lite.checkpoints import checkpoint_dir as ckpt_dir
from esm2lite.runtime import distributed
from esm2lite.constants import SPLITS
from esm2lite.runtime.device import packs
from esm2lite.runtime.distributed import Dist
from esm2lite.errors import CheckpointError, DataError, Esm2liteError
from esm2lite.checkpoints.spec import CheckpointSpec, config_changes

# Settings ranks may hold apart: each its own device; the inputs' paths (node-local copies may lie
# elsewhere on each node: their contents are compared instead)
UNCOMPARED = ("device", "dist_timeout", "checkpoint", "train_csv", "valid_csv", "test_csv", "csv")
RESTORE = "--resume continues only with the inputs its run started with: restore it, or start a new run in another --out"


# ---------------------------------------------------------------- data files


def data_paths(cfg, in_memory: dict | None) -> dict:
    """{split: the file it is read from} (None: records given in memory)."""
    if in_memory is not None:
        return {split: None for split in in_memory}
    if cfg.csv is not None:
        return {split: cfg.csv for split in SPLITS}
    return {"train": cfg.train_csv, "valid": cfg.valid_csv, "test": cfg.test_csv}


def file_state(path) -> tuple | None:
    """(device, inode, size, modification time) of a regular file; None for anything else."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def file_sha256(path) -> str | None:
    """The sha256 of a regular file's bytes; None when it is gone or anything but a regular file
    (opened without blocking: a FIFO put in its place must not hang the run)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        h = hashlib.sha256()
        while chunk := f.read(1 << 22):
            h.update(chunk)
        return h.hexdigest()


class DataFiles:
    """The data files of a run: watched from before they are read (DataFiles(paths)), identified
    once read (identify), checked for changes while the run uses them (check)."""

    def __init__(self, paths: dict):
        self.paths = paths
        self.states = {p: file_state(p) for p in dict.fromkeys(paths.values()) if p is not None}
        self.sums: dict = {}
        self.identity: dict = {}

    def identify(self, records: dict) -> dict:
        """{split: {"file", "sha256", "rows"}} of the records just read; DataError when a file
        changed between its reading and its hashing."""
        for path, before in self.states.items():
            self.sums[path] = file_sha256(path) if before else None
            if file_state(path) != before:
                raise DataError(f"{path}: changed while it was being read (is it still being written?); "
                                "run again once it is complete")
        self.identity = {split: {"file": path, "sha256": self.sums.get(path), "rows": len(records[split])}
                         for split, path in self.paths.items() if split in records}
        return self.identity

    def check(self) -> None:
        """DataError naming the first data file whose bytes changed since the run read them (the
        stat first; the sha256 only when the stat moved, so a file merely touched passes)."""
        for path, before in self.states.items():
            now = file_state(path)
            if before is None or now == before:
                continue
            sha = file_sha256(path)
            if sha != self.sums[path]:
                what = f"sha256 {sha[:12]}... now" if sha else "gone or no longer a regular file now"
                raise DataError(f"{path}: changed while this run was using it (sha256 {self.sums[path][:12]}... when "
                                f"read, {what}); the run stops: its checkpoints were trained on the file as it was "
                                "(restore it to --resume, or start a new run in another --out)")
            self.states[path] = now


def _same_file(a: dict | None, b: dict | None) -> bool:
    """One split's record then and now: the same rows, and the same bytes where both were hashed."""
    if a is None or b is None:
        return a is b
    shas = (a.get("sha256"), b.get("sha256"))
    return a.get("rows") == b.get("rows") and (None in shas or shas[0] == shas[1])


def _shown(entries: list) -> str:
    """One file's identity from its splits' records: "sha256 1a2b3c4d5e6f..., 40 rows" (per
    split with several: "train 30 rows, valid 10 rows")."""
    present = [(split, e) for split, e in entries if e is not None]
    sha = present[0][1].get("sha256") if present else None
    rows = (f"{entries[0][1]['rows'] if present else 0} rows" if len(entries) == 1
            else ", ".join(f"{split} {e['rows'] if e else 0} rows" for split, e in entries))
    return (f"sha256 {sha[:12]}..., " if sha else "") + rows


def data_changes(was: dict, now: dict) -> list[tuple[str, str, str]]:
    """(file, its identity in `was`, in `now`) for every data file whose bytes or row counts
    differ, compared split by split (the file is named as `now` names it)."""
    files: dict = {}
    for split in SPLITS:
        entry = now.get(split) or was.get(split)
        if entry is not None:
            files.setdefault(entry.get("file") or f"the {split} records (in memory)", []).append(split)
    return [(name, _shown([(s, was.get(s)) for s in splits]), _shown([(s, now.get(s)) for s in splits]))
            for name, splits in files.items() if not all(_same_file(was.get(s), now.get(s)) for s in splits)]


# ---------------------------------------------------------------- --resume


def recorded_data(ckpt: str) -> dict | None:
    """The data a step checkpoint was trained on (trainer_state.json "data"); None when it was written
    before esm2lite recorded it. CheckpointError when the field is damaged."""
    data = ckpt_dir.read_trainer_state(ckpt).get("data")
    if data is None:
        return None
    ok = isinstance(data, dict) and all(
        split in SPLITS and isinstance(e, dict) and isinstance(e.get("rows"), int)
        and (e.get("file") is None or isinstance(e.get("file"), str))
        and (e.get("sha256") is None or isinstance(e.get("sha256"), str)) for split, e in data.items())
    if not ok:
        raise CheckpointError(f"{os.path.join(ckpt, 'trainer_state.json')}: field data is damaged")
    return data


def check_resume(d: Dist, ckpt: str, data: dict, spec: CheckpointSpec) -> None:
    """--resume from the step checkpoint `ckpt`: Esm2liteError on every rank alike (one line naming
    the file or the base, and what changed) unless the data files and the base model are those it
    was trained on. The run's checkpoints then keep the base's identity as `ckpt` recorded it (an
    older hash of the same base included)."""
    with distributed.same_error(d):
        recorded = ckpt_dir.read_spec(ckpt)
        was = recorded_data(ckpt)
        for name, then, now in data_changes(was, data) if was is not None else ():
            raise Esm2liteError(f"{name}: changed since this run started (was {then}; now {now}); {RESTORE}")
        started = "this run started with"
        differs = (recorded.base.weights_difference(spec.base.weights, started)
                   or recorded.base.config_difference(spec.model_config, started))
        if differs:
            raise Esm2liteError(f"{spec.base.where}: {differs}; {RESTORE}")
    spec.base.sha256 = recorded.base.sha256
    if was is None and d.main:
        print(f"note: {ckpt} was written before esm2lite recorded the data files a run reads; they are not "
              "compared with the ones given now", flush=True)


def stream_layout(layout: str, device, ckpt: str | None) -> bool:
    """Whether the training batches are packed: the rule (runtime/device.packs), or on --resume from
    the step checkpoint `ckpt` the layout its trainer_state.json records, since a packed stream's
    batches (cut by real tokens) are not a padded stream's. An explicit --batches that differs from
    the recorded one is an Esm2liteError (older checkpoints record none: the rule)."""
    packed = packs(layout, device)
    was = ckpt_dir.read_trainer_state(ckpt).get("packed") if ckpt else None
    if was is None or was == packed:
        return packed
    if layout == "auto":
        return was
    name = lambda p: "packed" if p else "padded"  # noqa: E731
    raise Esm2liteError(f"--batches {layout}: this run was trained on {name(was)} batches and its data stream "
                        f"continues only so; leave --batches out or give --batches {name(was)}")


# ---------------------------------------------------------------- ranks


def rank_identity(settings: dict, data: dict, spec: CheckpointSpec) -> dict:
    """What one rank read: its options, data files and base model (compared across ranks)."""
    return {"options": {k: v for k, v in settings.items() if k not in UNCOMPARED}, "data": data,
            "base": {"sha256": spec.base.weights.encoder, "config": spec.model_config}}


def rank_changes(ref: dict, other: dict) -> list[tuple[str, str, str]]:
    """(what, rank 0's, this rank's) for every option, data file and part of the base that differs."""
    out = [(f"setting {k}", repr(ref["options"].get(k)), repr(other["options"].get(k)))
           for k in sorted(ref["options"].keys() | other["options"].keys())
           if ref["options"].get(k) != other["options"].get(k)]
    out += data_changes(ref["data"], other["data"])
    a, b = ref["base"], other["base"]
    if a["sha256"] != b["sha256"]:
        out.append(("base model", f"encoder weights sha256 {a['sha256'][:12]}...",
                    f"encoder weights sha256 {b['sha256'][:12]}..."))
    out += [("base model", f"config {k} {x!r}", f"config {k} {y!r}") for k, x, y in config_changes(a["config"], b["config"])]
    return out


def check_ranks_agree(d: Dist, settings: dict, data: dict, spec: CheckpointSpec) -> None:
    """Under torchrun, before step 1: every rank read the same data, base model and options (one
    all_gather), or every rank raises the same Esm2liteError naming the ranks and what differs."""
    if d.enabled:
        problem = rank_disagreement(distributed.gather(d, rank_identity(settings, data, spec)))
        if problem:
            raise Esm2liteError(problem)


def rank_disagreement(identities: list[dict]) -> str | None:
    """One line naming every rank whose inputs differ from rank 0's, and what differs; None when
    every rank read the same."""
    found = []
    for rank, identity in enumerate(identities[1:], start=1):
        found += [f"rank {rank}'s {what} differs from rank 0's (rank 0: {theirs}; rank {rank}: {mine})"
                  for what, theirs, mine in rank_changes(identities[0], identity)]
    if not found:
        return None
    shown = "; ".join(found[:4]) + (f"; ... ({len(found) - 4} more)" if len(found) > 4 else "")
    return f"the ranks did not read the same inputs: {shown}; every rank must read identical files (node-local " \
           "copies included) with the same options"
