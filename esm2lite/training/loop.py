"""Fine-tuning: one process, or many under torchrun (distributed.py).

    data   -> checked records and their label space; one global stream of length-bucketed batches
    model  -> ESM-2 encoder + task head (task_model.py); the mode (modes.py) says what trains
    loop   -> fit: train_step (AdamW, warmup then cosine/constant LR, clipping, accumulation, bf16
              autocast on GPU), evaluate on the valid split every eval_every steps, checkpoint
    disk   -> everything under --out goes through the checkpointer (checkpointer.py)

On CPU a run is deterministic, and --resume from any checkpoint ends with exactly the weights
of an uninterrupted run (optimizer, LR schedule, RNG and data position are saved).
"""

import contextlib
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from esm2lite.runtime import distributed
from esm2lite.training import plot
from esm2lite.data.batching import Batches
from esm2lite.checkpoints.modes import MODE
from esm2lite.checkpoints.run_dir import Checkpointer
from esm2lite.runtime.device import amp_dtype_for
from esm2lite.runtime.distributed import Dist
from esm2lite.errors import Esm2liteError, TrainingInterrupted
from esm2lite.inference.evaluate import evaluate, prediction_rows, score
from esm2lite.training.inputs import DataFiles, check_ranks_agree, check_resume, data_paths, stream_layout
from esm2lite.tasks.labels import LabelSpace
from esm2lite.tasks.metrics import metric_direction
from esm2lite.training.optim import lr_at, make_optimizer, set_lr
from esm2lite.data.reading import load_splits
from esm2lite.data.records import DataSpec
from esm2lite.checkpoints.loading import finetuned_dir
from esm2lite.training.build import build_model
from esm2lite.checkpoints.spec import CheckpointSpec
from esm2lite.model.task_model import TaskModel
from esm2lite.training.config import TrainConfig

@dataclass
class TrainState:
    """What the loop carries from step to step; a step checkpoint stores all but the timing."""

    step: int = 0
    best_value: float | None = None
    best_step: int | None = None
    skipped: int = 0  # steps whose loss was not finite (--skip-nonfinite)
    window_loss: float = 0.0  # train loss summed over the steps since the last train log line
    window_steps: int = 0
    window_tokens: int = field(default=0, metadata={"saved": False})
    window_start: float = field(default_factory=time.time, metadata={"saved": False})

    def to_dict(self, batches: Batches, world: int) -> dict:
        saved = {k: v for k, v in asdict(self).items() if self.__dataclass_fields__[k].metadata.get("saved", True)}
        return {**saved, "epoch": batches.epoch, "index": batches.index, "world_size": world, "packed": batches.packed}

    @classmethod
    def from_dict(cls, state: dict) -> "TrainState":
        return cls(**{k: state[k] for k in ("step", "best_value", "best_step", "skipped")},
                   window_loss=state.get("window_loss", 0.0), window_steps=state.get("window_steps", 0))


@dataclass
class Run:
    """Everything one run works with, built once by setup()."""

    cfg: TrainConfig
    d: Dist
    device: torch.device
    model: TaskModel
    spec: CheckpointSpec
    optimizer: torch.optim.Optimizer
    batches: Batches
    records: dict
    checkpointer: Checkpointer
    total: int  # optimizer steps
    data: DataFiles  # the data files read, their identity, watched for changes while the run uses them

    @property
    def amp(self):
        return amp_dtype_for(self.cfg.precision, self.device)

    @property
    def eval_every(self) -> int:
        return self.cfg.eval_every or max(1, self.total // 5)

    @property
    def save_every(self) -> int:
        return self.cfg.save_every or self.eval_every


def train_model(cfg: TrainConfig | None = None, records=None, resume: bool = False, **overrides) -> dict:
    """Fine-tune and return {"checkpoint": OUT/best, "summary": summary dict}.

    `records`: optional {"train": [...], "valid": [...], "test": [...]} of esm2lite.data.records.Record
    (e.g. from records_from_pairs) instead of CSV paths in cfg. Under torchrun every rank
    calls this; rank 0 writes the files."""
    cfg = cfg or TrainConfig(**overrides)
    start_time = time.time()
    with distributed.lost_ranks_reported(cfg.dist_timeout):  # a rank that dies or stalls: one line on the others
        d, device = distributed.setup(cfg.device, cfg.dist_timeout)
        checkpointer = Checkpointer(cfg.out, d)
        try:
            run, state = setup(cfg, records, resume, d, device, checkpointer)
            return fit(run, state, start_time)
        finally:
            checkpointer.close()
            distributed.teardown(d)


# ---------------------------------------------------------------- setting up


def load_data(cfg: TrainConfig, records=None, main: bool = True) -> tuple[dict, LabelSpace, DataFiles]:
    """Every split's records (from cfg's CSVs unless given), the label space fitted on train, and
    the data files identified (sha256, rows) and watched; every row of every split is checked.
    main: this process says what it notices (rank 0)."""
    note = print if main else (lambda _line: None)
    files = DataFiles(data_paths(cfg, records))
    if records is None:
        spec = DataSpec(task=cfg.task, sequence_column=cfg.sequence_column, target_columns=cfg.target_columns,
                        mask_column=cfg.mask_column, split_column=cfg.split, id_column=cfg.id_column,
                        max_residues=cfg.max_residues, truncate=cfg.truncate)
        records = load_splits(spec, train=cfg.train_csv, valid=cfg.valid_csv, test=cfg.test_csv, csv=cfg.csv,
                              note=note)
    files.identify(records)
    labels = LabelSpace.fit(cfg.task, records["train"], list(cfg.target_columns), standardize=cfg.standardize)
    for split in ("valid", "test"):
        if split in records:
            labels.check(records[split])
    if "valid" not in records:
        if cfg.best_metric is not None:
            raise Esm2liteError(f"--best-metric {cfg.best_metric}: there is no validation split to measure it on "
                                "(give --valid-csv, or valid rows in --csv)")
        note("note: no validation split, so best/ will hold the last step (give --valid-csv, or valid rows in "
             "--csv, to keep the step with the lowest validation loss)")
    return records, labels, files


def setup(cfg, records, resume: bool, d: Dist, device, checkpointer: Checkpointer) -> tuple[Run, TrainState]:
    """Data, model, optimizer and batch stream; the run directory claimed, and on --resume the last
    checkpoint loaded. Every check that can fail runs on every rank, and every rank fails alike."""
    settings = {**cfg.to_dict(), "world_size": d.world}
    with distributed.same_error(d):
        if d.enabled and cfg.mode == "lora" and cfg.lora.tie_weights:
            raise Esm2liteError("--lora-tie-weights shares one adapter across blocks, which FSDP cannot shard: "
                                "train it in one process (without torchrun)")
        records, labels, files = load_data(cfg, records, d.main)
    with distributed.same_error(d):
        resume = checkpointer.check(settings, resume)
    with distributed.same_error(d):
        model, spec = build_model(cfg, labels, device)
    check_ranks_agree(d, settings, files.identity, spec)  # one all_gather: the same data, base and options
    if resume:  # the data files and base the run started with (before the directory is touched)
        check_resume(d, checkpointer.step_dirs()[-1][1], files.identity, spec)
    amp = amp_dtype_for(cfg.precision, device)
    if d.enabled:  # FSDP2 casts each rank's fp32 shard to the autocast dtype, then gathers it (param_dtype)
        distributed.shard(model, d, amp)
    elif amp is not None:  # one process: frozen weights stored in bf16
        MODE[cfg.mode].store_frozen(model.encoder, amp)
    optimizer = make_optimizer(model, cfg)
    with distributed.same_error(d):
        packed = stream_layout(cfg.batches, device, checkpointer.step_dirs()[-1][1] if resume else None)
    batches = Batches(records["train"], cfg, labels, d.rank, d.world, packed=packed)
    per_epoch = -(-len(batches) // d.world)
    total = cfg.steps or max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
    with distributed.same_error(d):
        checkpointer.claim(settings, resume)
    state = TrainState()
    if resume:
        saved = checkpointer.resume(model, spec, optimizer, cfg.keep_last)
        state, batches.epoch, batches.index = TrainState.from_dict(saved), saved["epoch"], saved["index"]
    elif d.rank > 0:  # identical initial weights on every rank, then each its own dropout stream
        torch.manual_seed(cfg.seed * 1000 + d.rank)
    return Run(cfg, d, device, model, spec, optimizer, batches, records, checkpointer, total, files), state


# ---------------------------------------------------------------- the loop


def fit(run: Run, state: TrainState, start_time: float) -> dict:
    """Train from state.step to run.total; evaluate, log and checkpoint on schedule; then score
    best/ on the valid and test splits and write the summary."""
    cfg, d = run.cfg, run.d
    run.model.train()
    bar = tqdm(total=run.total, initial=state.step, desc="train", dynamic_ncols=True,
               disable=None if d.main else True)  # None: shown on a terminal only (stderr is for errors)
    try:
        if state.step == 0 and "valid" in run.records and finetuned_dir(run.spec.base.path):  # a fine-tuned start
            score_valid(run, 0, bar, "step 0 (--checkpoint)")
        with stop_on_signals() as stop:
            while state.step < run.total:
                train_step(run, state)
                bar.update(1)
                if state.step % cfg.log_every == 0 or state.step == run.total:
                    log_train(run, state, bar)
                is_best = validate(run, state, bar)
                saved = state.step % run.save_every == 0 or state.step == run.total or is_best
                if saved:
                    save(run, state, is_best)
                if distributed.any_true(d, bool(stop)):
                    if not saved:
                        save(run, state, False)
                    interrupted(run, state, stop)
    finally:
        bar.close()
    return finish(run, state, start_time)


def train_step(run: Run, state: TrainState) -> None:
    """One optimizer step: cfg.grad_accum micro-batches on every rank, clipped gradients, AdamW.
    A non-finite loss stops the run, or with --skip-nonfinite skips the step (counted)."""
    cfg, d, model = run.cfg, run.d, run.model
    set_lr(run.optimizer, lr_at(state.step, cfg, run.total))
    run.optimizer.zero_grad(set_to_none=True)
    step_loss, finite = 0.0, True
    for _ in range(cfg.grad_accum):
        batch = run.batches.next().to(run.device)  # tokens [B, T], targets
        with torch.autocast(run.device.type, dtype=run.amp, enabled=run.amp is not None):
            out = model(batch)  # [B, n_outputs] or [B, T, n_classes]
        loss = model.labels.task.loss(out, batch.target)
        if distributed.any_true(d, not bool(torch.isfinite(loss))):
            finite = False
            if not cfg.skip_nonfinite:
                kept = run.checkpointer.step_dirs()  # say only what is there
                raise Esm2liteError(
                    f"non-finite training loss at step {state.step + 1}; "
                    + (f"the last checkpoint, {kept[-1][1]}, is kept" if kept else "no checkpoint had been written yet")
                    + " (--skip-nonfinite skips such batches instead)")
            break
        (loss / cfg.grad_accum).backward()
        step_loss += loss.item() / cfg.grad_accum
        state.window_tokens += int(batch.lengths.sum())
    if finite:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.clip)
        run.optimizer.step()
    else:
        state.skipped += 1
    state.step += 1
    state.window_loss += distributed.mean(d, step_loss)
    state.window_steps += 1


def log_train(run: Run, state: TrainState, bar) -> None:
    """The mean train loss since the last line, LR and throughput: one line of metrics.jsonl."""
    elapsed = max(time.time() - state.window_start, 1e-9)
    tokens_per_s = distributed.mean(run.d, state.window_tokens / elapsed) * run.d.world
    record = {"step": state.step, "split": "train", "loss": state.window_loss / state.window_steps,
              "lr": run.optimizer.param_groups[0]["lr"], "tokens_per_s": tokens_per_s}
    if run.cfg.skip_nonfinite:
        record["skipped_steps"] = state.skipped
    run.checkpointer.log(record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tokens_per_s:.0f}")
    state.window_loss, state.window_tokens, state.window_steps, state.window_start = 0.0, 0, 0, time.time()


def validate(run: Run, state: TrainState, bar) -> bool:
    """Score the valid split when scheduled; True when this step is the best so far (without a
    valid split the last step is "best")."""
    if "valid" not in run.records:
        if state.step == run.total:
            state.best_step = state.step
        return state.step == run.total
    if not (state.step % run.eval_every == 0 or state.step == run.total):
        return False
    cfg = run.cfg
    result = score_valid(run, state.step, bar, f"step {state.step}")
    if not is_better(result[cfg.metric], state.best_value, cfg.metric):
        return False
    state.best_value, state.best_step = result[cfg.metric], state.step
    return True


def score_valid(run: Run, step: int, bar, label: str) -> dict:
    """The valid split's metrics, logged at `step` and shown under the progress bar."""
    cfg = run.cfg
    result = evaluate(run.model, run.records["valid"], cfg.batch_tokens, cfg.precision, "valid", run.d, cfg.batches)
    run.checkpointer.log({"step": step, "split": "valid", **result})
    if run.d.main:
        bar.write(f"{label}: valid " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result


def is_better(value: float, best: float | None, metric: str) -> bool:
    if best is None:
        return True
    if value != value:  # nan never wins
        return False
    return value < best if metric_direction(metric) == "min" else value > best


def save(run: Run, state: TrainState, is_best: bool) -> None:
    """A step checkpoint (best/ too when is_best) recording the data it was trained on; then the data
    files are checked: one edited under the run stops it (its checkpoints hold the file as read)."""
    trainer_state = {**state.to_dict(run.batches, run.d.world), "data": run.data.identity}
    run.checkpointer.save(run.model, run.spec, run.optimizer, trainer_state, is_best, run.cfg.keep_last)
    check_data_files(run)


def check_data_files(run: Run) -> None:
    """Every rank's data files still hold what the run read (inputs.DataFiles.check); all fail alike."""
    with distributed.same_error(run.d):
        run.data.check()


def finish(run: Run, state: TrainState, start_time: float) -> dict:
    """best/ scored on the valid and test splits (test once, here); its predictions next to the
    true values, the plots (with matplotlib), and last summary.json."""
    cfg, d, labels = run.cfg, run.d, run.model.labels
    check_data_files(run)  # the predictions written below name rows of the files as read
    has_valid = "valid" in run.records
    summary = {"best_step": state.best_step, "best_metric": cfg.metric if has_valid else None,
               "valid": None, "test": None, "task": cfg.task, "targets": list(labels.target_names)}
    run.checkpointer.load_best(run.model)
    outputs = {}
    for split in ("valid", "test"):
        if split in run.records:
            summary[split], outputs[split] = score(run.model, run.records[split], cfg.batch_tokens, cfg.precision,
                                                   split, d, cfg.batches)
    if summary["test"] is not None:
        run.checkpointer.log({"step": state.best_step, "split": "test", **summary["test"]})
    summary.update(labels.task.report(labels, run.records, outputs))  # per class, confusion matrix
    summary.update(steps=run.total, skipped_steps=state.skipped, world_size=d.world,
                   wall_time_s=time.time() - start_time)
    if d.main:
        write_outputs(run, summary, outputs)
    run.checkpointer.write_summary(summary)
    return {"checkpoint": run.checkpointer.best, "summary": summary}


def write_outputs(run: Run, summary: dict, outputs: dict) -> None:
    """predictions_<split>.csv, then the PNGs (when matplotlib is installed)."""
    predictions = {}
    for split, out in outputs.items():
        predictions[split] = prediction_rows(run.model.labels, run.records[split], out)
        run.checkpointer.write_predictions(split, predictions[split])
    if not plot.available():
        print(f"note: no plots (matplotlib is not installed: {plot.INSTALL}; then esm2lite-plot "
              f"{run.cfg.out})", flush=True)
        return
    plot.write_plots(run.checkpointer.plots, run.checkpointer.read_log(), summary, predictions)


# ---------------------------------------------------------------- signals


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT/SIGTERM set a flag instead of killing the process: the loop finishes its step,
    saves a checkpoint and exits cleanly (TrainingInterrupted)."""
    stop = []
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, lambda signum, _frame: stop.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def interrupted(run: Run, state: TrainState, stop: list):
    signum = stop[0] if stop else signal.SIGTERM
    raise TrainingInterrupted(f"{signal.Signals(signum).name}: stopped after step {state.step}; checkpoint saved in "
                              f"{run.checkpointer.step_dir(state.step)}", signum)  # the command adds how to continue
