"""The run directory (train.py --out): the one module that writes and reads the files in it.

    .lock                 an OS lock held while a run works here (released when it ends or dies);
                          it names the holder, for the error a second run on the same --out gets
    config.json           the run's settings and number of ranks: --resume must match them
    metrics.jsonl         one JSON line per train log and per evaluation
    summary.json          at the end: best step, the valid and test metrics of best/ (per class and
                          the confusion matrix for classification and per-residue tasks), wall time
    predictions_valid.csv at the end: best/'s predictions on each split next to the true values,
    predictions_test.csv  in input order (plot.py draws them, with metrics.jsonl, into plots/)
    checkpoints/step_N/   step checkpoints: weights, optimizer, RNG, data position (ckpt_dir.py)
    best/                 the best step's weights, for prediction (ckpt_dir.py)

Every file is written under a temporary name and renamed into place. Writes come in this order,
so that a kill at any instant leaves a state --resume completes to exactly the uninterrupted result:

    1. step N's lines in metrics.jsonl (train, valid), appended
    2. checkpoints/step_N/: its trainer_state names the best step so far
    3. best/, when step N is the best (its config.json says step N)
    4. older step checkpoints pruned (hidden by one rename, then deleted; the best one stays)
    5. at the end: the test line, predictions_*.csv, plots/ (plot.py), then summary.json

--resume takes the last step checkpoint, drops log lines written after it (and a line cut short),
rebuilds best/ from the best step's checkpoint when best/ is missing or holds another step, and
removes what writes cut short by a kill left. A directory that never reached its first checkpoint
is started afresh.

Never destroy what is not ours. A run writes, replaces and removes files only in a directory that is
ours: one that does not exist, is empty (but for .lock and the temporaries of a start a kill cut
short), or whose config.json is a run's (RUN_FORMAT; a run written before the format field
existed is known by its settings and its metrics.jsonl). Any other directory is refused in one line
before anything is created in it, and even in ours only the files named above (and the hidden
temporaries of their writes) are ever touched. --out must not be, or lie inside, the base model or
a data file, and no file of the run may be one of them (paths.py: whatever spelling reaches them).
"""

import contextlib
import csv
import fcntl
import io
import json
import os
import re
import shutil
import socket
import sys
import time

from esm2lite.checkpoints import checkpoint_dir as ckpt_dir
from esm2lite.runtime import distributed
from esm2lite.files.atomic import remove_dir, write_csv, write_json, write_text
from esm2lite.runtime.distributed import Dist
from esm2lite.errors import Esm2liteError
from esm2lite.files.paths import Input, check_output
from esm2lite.files.textfiles import open_file, read_json, read_text

UNCHECKED = ("out", "device", "dist_timeout", "grad_accum")  # may change on --resume (grad_accum x ranks may not)
LENGTH = ("steps", "epochs")  # may grow on --resume: the run continues to its new end
RUN_FORMAT = "esm2lite-run"  # config.json's "format": this directory is a run's, ours to write in
OWN = ("config.json", "metrics.jsonl", "summary.json", "predictions_valid.csv", "predictions_test.csv", "plots",
       "best", "checkpoints", ".lock")  # everything a run writes in its directory (as in Checkpointer)
# The hidden temporaries of a write to one of them (atomic.py: .NAME.<8 random characters>.tmp / .old)
LEFTOVER = re.compile(r"\.(config\.json|metrics\.jsonl|summary\.json|predictions_(valid|test)\.csv|plots|best)"
                      r"\.[a-z0-9_]+\.(tmp|old)")
STEP_LEFTOVER = re.compile(r"\.step_\d+\.[a-z0-9_]+\.(tmp|old)")  # the same, in checkpoints/
INPUT_OPTIONS = {"checkpoint": "the base model", "train_csv": "a data file this run reads",
                "valid_csv": "a data file this run reads", "test_csv": "a data file this run reads",
                "csv": "a data file this run reads"}  # the run's inputs, by TrainConfig field


class Checkpointer:
    def __init__(self, out: str, d: Dist):
        self.out, self.d = out, d
        self.checkpoints = os.path.join(out, "checkpoints")
        self.best = os.path.join(out, "best")
        self.metrics = os.path.join(out, "metrics.jsonl")
        self.config = os.path.join(out, "config.json")
        self.summary = os.path.join(out, "summary.json")
        self.plots = os.path.join(out, "plots")  # written by plot.py
        self._lock = None

    def predictions(self, split: str) -> str:
        return os.path.join(self.out, f"predictions_{split}.csv")

    def step_dir(self, step: int) -> str:
        return os.path.join(self.checkpoints, f"step_{step}")

    def step_dirs(self) -> list[tuple[int, str]]:
        if not os.path.isdir(self.checkpoints):
            return []
        found = [(int(m.group(1)), os.path.join(self.checkpoints, n))
                 for n in os.listdir(self.checkpoints) if (m := re.fullmatch(r"step_(\d+)", n))]
        return sorted(found)

    # ------------------------------------------------------------ before any work (every rank, read-only)

    def check(self, settings: dict, resume: bool, note: bool = True) -> bool:
        """Can this run start here? True when it continues from a checkpoint."""
        self._check_inputs(settings)
        _check_creatable(self.out)
        self._check_ours()
        if self._lock is None and self.d.main:  # rank 0 speaks for the run (ranks probing at once would collide)
            self._take_lock(probe=True)  # another run working here: say so, whatever else holds
        started = bool(self.step_dirs())
        if started and not resume:
            raise Esm2liteError(f"{self.out}: already holds a run; pass --resume to continue it or choose another --out")
        if started:
            self._check_same_settings(settings)
        elif resume and note and self.d.main:
            print(f"--resume: {self.out} holds no checkpoint to continue from; starting at step 0", flush=True)
        return started

    def own_paths(self) -> list[str]:
        return [os.path.join(self.out, name) for name in OWN]

    def _check_inputs(self, settings: dict) -> None:
        """--out is not a dangling link, not the base model or a data file nor inside one, and none
        of the run's files is (or holds) one of them."""
        inputs = [Input(settings.get(k), f"{what} (--{k.replace('_', '-')} {settings.get(k)})")
                  for k, what in INPUT_OPTIONS.items()]
        check_output(self.out, "--out", inputs)
        for path in self.own_paths():
            check_output(path, "--out", inputs, replaces=True)

    def _check_ours(self) -> None:
        """Esm2liteError, before anything is created in it, unless --out is ours to write in: absent,
        empty (but for our lock and the temporaries of a start that was cut short), or a run's."""
        if not os.path.isdir(self.out):
            return
        others = [n for n in os.listdir(self.out) if n != ".lock" and not LEFTOVER.fullmatch(n)]
        if not others:
            return
        if not os.path.lexists(self.config):
            raise Esm2liteError(f"{self.out}: is not empty and is not a train.py run directory (no config.json); "
                                "nothing in it was changed: choose a new or empty --out")
        if not is_run_config(read_json(self.config), os.path.exists(self.metrics)):
            raise Esm2liteError(f"{self.out}: is not a train.py run directory (its config.json is not a run's "
                                "settings); nothing in it was changed: choose a new or empty --out")

    def _check_same_settings(self, settings: dict) -> dict:
        """Esm2liteError unless `settings` are the run's but for UNCHECKED ones, grad_accum x ranks kept,
        and a training length kept or grown; returns {length option: (saved, new)} for one that grew."""
        saved = read_json(self.config)
        if not isinstance(saved, dict) or not isinstance(saved.get("grad_accum"), int):
            raise Esm2liteError(f"{self.config}: damaged (not the settings of a run)")
        grown = self._grown(saved, settings)
        changed = [k for k, v in settings.items()
                   if saved.get(k) != v and k not in UNCHECKED + ("world_size",) + tuple(grown)]
        ranks = saved.get("world_size", 1)
        if saved["grad_accum"] * ranks != settings["grad_accum"] * settings["world_size"]:
            changed.append(f"grad_accum x ranks (was {saved['grad_accum']} x {ranks})")
        if changed:
            raise Esm2liteError(f"{self.config}: --resume needs the same settings; changed: {', '.join(changed)}")
        return grown

    def _grown(self, saved: dict, settings: dict) -> dict:
        """The length option (--steps or --epochs, the one the run was started with) given larger than the
        run's; a smaller one is refused. A switch from one to the other is left to the caller's check."""
        grown = {}
        for k in LENGTH:
            was, now = saved.get(k), settings.get(k)
            if was is None or now is None or was == now:
                continue
            if now < was:
                raise Esm2liteError(f"{self.config}: --{k} {now}: this run is {was} {k} long; --resume can train a "
                                    f"run longer (--{k} more than {was}), not shorten it")
            grown[k] = (was, now)
        return grown

    # ------------------------------------------------------------ claiming the directory (rank 0)

    def claim(self, settings: dict, resume: bool) -> None:
        """Lock the directory, check again under the lock, and set it up: a fresh run writes its
        settings and an empty log; a resumed one loses the leftovers of writes a kill cut short."""
        if not self.d.main:
            return
        self._check_ours()  # before the lock file is created in it
        self._take_lock()
        if self.check(settings, resume, note=False):
            self._remove_leftovers()
            grown = self._check_same_settings(settings)
            if grown:
                self._lengthen(grown)
            return
        self._remove_leftovers()  # what a start that never reached a checkpoint left
        remove_dir(self.best)
        self._remove_end()
        write_json(self.config, {"format": RUN_FORMAT, **settings})
        write_text(self.metrics, "")

    def _lengthen(self, grown: dict) -> None:
        """A resumed run given a larger --steps/--epochs: the outputs of its old end go (they are rewritten
        at the new one), config.json takes the new length and lists every change of length, and
        metrics.jsonl says where it happened (a "lengthened" line at the step the run continues from)."""
        self._remove_end()
        saved, step = read_json(self.config), self.step_dirs()[-1][0]
        change = {"at_step": step, **{k: {"from": was, "to": now} for k, (was, now) in grown.items()}}
        new = {k: now for k, (_, now) in grown.items()}
        write_json(self.config, {**saved, **new, "lengthened": saved.get("lengthened", []) + [change]})
        self.log({"step": step, "split": "lengthened", **new})
        print(f"--resume: {self.out} is trained longer from step {step}: "
              + ", ".join(f"--{k} {was} -> {now}" for k, (was, now) in grown.items()), flush=True)

    def _remove_end(self) -> None:
        """What a run writes at its end (plots, summary, predictions): gone until the end is reached."""
        remove_dir(self.plots)
        for path in (self.summary, self.predictions("valid"), self.predictions("test")):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)

    def _take_lock(self, probe: bool = False) -> None:
        """Hold OUT/.lock (flock: released by the OS when the process ends, however it ends). probe:
        only check that nobody holds it (nothing is created)."""
        path = os.path.join(self.out, ".lock")
        if probe and not os.path.exists(path):
            return
        os.makedirs(self.out, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another run"
            os.close(fd)
            raise Esm2liteError(f"{self.out}: in use by {holder}; two runs cannot share one --out "
                                "(wait for it to end, or choose another --out)") from None
        if probe:
            os.close(fd)
            return
        os.ftruncate(fd, 0)
        program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
        os.write(fd, f"{program} (pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
        self._lock = fd

    def close(self) -> None:
        """Release the lock (a process that dies releases it too)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _remove_leftovers(self) -> None:
        """Hidden temporaries of our writes a kill cut short (never read: their names start with '.');
        only ours, by name: a user's own hidden files stay."""
        for parent, ours in ((self.out, LEFTOVER), (self.checkpoints, STEP_LEFTOVER)):
            for name in os.listdir(parent) if os.path.isdir(parent) else ():
                path = os.path.join(parent, name)
                if ours.fullmatch(name):
                    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)

    # ------------------------------------------------------------ resuming (collective)

    def resume(self, model, spec, optimizer, keep_last: int) -> dict:
        """Load the last step checkpoint into the model and optimizer (RNG too) and return its
        trainer state; first bring best/, the step checkpoints and metrics.jsonl to that step."""
        _, last = self.step_dirs()[-1]
        best_step = ckpt_dir.read_trainer_state(last)["best_step"]  # its sha256 checked first
        if best_step is not None and ckpt_dir.saved_step(self.best) != best_step:
            self._rebuild_best(model, spec, best_step)
        self._prune(keep_last, best_step)
        ckpt_dir.load_weights(model, last, optimizer)  # a sharded checkpoint holds the moments too
        state = ckpt_dir.load_trainer_state(last, model, optimizer, self.d)
        ckpt_dir.verify(last, self.d)
        if self.d.main:
            self._truncate_log(state["step"])
            print(f"resumed from {last} at step {state['step']}", flush=True)
        return state

    def _rebuild_best(self, model, spec, step: int) -> None:
        """best/ from checkpoints/step_<step> (a kill came between writing that and best/)."""
        source = self.step_dir(step)
        if not os.path.isdir(source):
            raise Esm2liteError(f"{self.best}: does not hold the best step {step}, and {source} is gone")
        ckpt_dir.load_weights(model, source)
        ckpt_dir.verify(source, self.d)
        ckpt_dir.save(self.best, model, spec, step, self.d)

    def _truncate_log(self, step: int) -> None:
        """Drop records written after `step` (and a line cut short by a kill), and test results."""
        keep, text = [], ""
        if os.path.exists(self.metrics):  # a regular file only (a FIFO there would block); any bytes a kill left
            f, _ = open_file(self.metrics, Esm2liteError, regular=True)
            with f:
                text = f.read().decode("utf-8", errors="replace")
        for line in text.splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                record = json.loads(line)
                if record["step"] <= step and record["split"] != "test":
                    keep.append(json.dumps(record) + "\n")
        write_text(self.metrics, "".join(keep))

    # ------------------------------------------------------------ during the run

    def log(self, record: dict) -> None:
        if not self.d.main:
            return
        try:
            with open(self.metrics, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # disk full: name the file
            raise Esm2liteError(f"{self.metrics}: cannot write ({e.strerror or e})") from None

    def save(self, model, spec, optimizer, state: dict, is_best: bool, keep_last: int) -> None:
        """Collective: checkpoints/step_N/, then best/ when step N is the best, then pruning."""
        step = state["step"]
        ckpt_dir.save(self.step_dir(step), model, spec, step, self.d, optimizer, state)
        if is_best:
            ckpt_dir.save(self.best, model, spec, step, self.d)
        self._prune(keep_last, state["best_step"])
        distributed.barrier(self.d)

    def _prune(self, keep_last: int, best_step: int | None) -> None:
        """Keep the last `keep_last` step checkpoints and the best one."""
        if self.d.main:
            for old, path in self.step_dirs()[:-keep_last]:
                if old != best_step:
                    remove_dir(path)

    # ------------------------------------------------------------ the end

    def load_best(self, model) -> None:
        ckpt_dir.load_weights(model, self.best)
        ckpt_dir.verify(self.best, self.d)

    def write_predictions(self, split: str, rows: list[dict]) -> None:
        if self.d.main:
            write_csv(self.predictions(split), rows)

    def write_summary(self, summary: dict) -> None:
        if self.d.main:
            write_json(self.summary, summary)

    # ------------------------------------------------------------ reading a finished run (plot.py)

    def read_finished(self) -> tuple[list[dict], dict, dict]:
        """(metrics.jsonl records, summary.json, {split: predictions CSV rows as strings})."""
        summary = read_json(self.summary)
        if not isinstance(summary, dict) or "best_step" not in summary:
            raise Esm2liteError(f"{self.summary}: not the summary of a finished run")
        predictions = {}
        for split in ("valid", "test"):
            if os.path.exists(self.predictions(split)):
                text = read_text(self.predictions(split), Esm2liteError)
                predictions[split] = list(csv.DictReader(io.StringIO(text, newline="")))
        return self.read_log(), summary, predictions

    def read_log(self) -> list[dict]:
        """metrics.jsonl's records."""
        log = []
        for i, line in enumerate(read_text(self.metrics, Esm2liteError).splitlines(), start=1):
            try:
                log.append(json.loads(line))
            except ValueError:
                raise Esm2liteError(f"{self.metrics}, line {i}: not JSON") from None
        return log


def holds_a_run(path: str) -> bool:
    """A directory whose config.json is a run's settings (is_run_config): ours to replace."""
    config = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.isfile(config):
        return False
    try:
        return is_run_config(read_json(config), os.path.exists(os.path.join(path, "metrics.jsonl")))
    except Esm2liteError:
        return False


def is_run_config(saved, has_log: bool) -> bool:
    """Whether a config.json's value is a run's settings: it says so (RUN_FORMAT), or it was written
    before that field existed (a run's settings: grad_accum, world_size, out, task, mode) and the
    run's metrics.jsonl is beside it."""
    if not isinstance(saved, dict):
        return False
    if saved.get("format") == RUN_FORMAT:
        return True
    legacy = "format" not in saved and isinstance(saved.get("grad_accum"), int) and \
        {"world_size", "out", "task", "mode"} <= saved.keys()
    return legacy and has_log


def _check_creatable(path: str) -> None:
    """Esm2liteError before any work if the directory `path` cannot be made and written."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise Esm2liteError(f"{path}: cannot create the output directory ({probe} is a file)")
    if not os.access(probe, os.W_OK):
        raise Esm2liteError(f"{path}: cannot write the output directory ({probe} is not writable)")
