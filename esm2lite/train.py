"""Fine-tuning loop: one process (or many under torchrun, see distributed.py).

    data  -> length-bucketed token-budget batches, reshuffled per epoch from the seed
    model -> ESM-2 encoder (lora | full | head mode) + task head
    loop  -> AdamW, warmup then cosine/constant LR, clipping, accumulation, bf16 autocast on GPU
    eval  -> every eval_every steps and at the end; best checkpoint by a metric; test once at the end
    disk  -> OUT/metrics.jsonl, OUT/summary.json, OUT/checkpoints/step_N/, OUT/best/ (all atomic)

On CPU a run is deterministic, and --resume from any checkpoint ends with exactly the weights
of an uninterrupted run (optimizer, LR schedule, RNG and data position are saved).
"""

import contextlib
import json
import math
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import distributed
from .atomic import write_json, write_text
from .distributed import Dist
from .data import DataSpec, LabelSpace, collate, load_splits, make_batches
from .errors import Esm2liteError, TrainingInterrupted
from .finetuned import MODES, BaseRef, FineTuned, amp_dtype_for, run_batches
from .heads import build_head
from .lora import LoRAConfig, apply_lora
from .metrics import TASK_METRICS, compute_metrics, metric_direction, metric_names

DEFAULT_METRIC = {"regression": "spearman", "classification": "accuracy", "token-classification": "accuracy"}


@dataclass
class TrainConfig:
    # data
    task: str = "regression"
    train_csv: str | None = None
    valid_csv: str | None = None
    test_csv: str | None = None
    csv: str | None = None  # one CSV with a split column
    split_column: str = "split"
    sequence_column: str = "sequence"
    target_columns: tuple = ("target",)
    mask_column: str | None = None
    max_residues: int = 1022
    truncate: bool = False
    standardize: bool = False
    # model
    checkpoint: str | None = None  # pretrained weights
    model: str | None = None  # or an architecture, randomly initialised
    mode: str = "lora"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    head_hidden: int = 256
    head_dropout: float = 0.25
    # optimisation
    steps: int | None = None
    epochs: float | None = None
    batch_tokens: int = 8192
    lr: float = 4e-4
    head_lr_mult: float = 1.0
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule: str = "cosine"
    grad_accum: int = 1
    clip: float = 1.0
    precision: str = "auto"
    seed: int = 0
    skip_nonfinite: bool = False
    activation_checkpointing: bool = False
    # evaluation and output
    eval_every: int | None = None
    save_every: int | None = None
    keep_last: int = 2
    best_metric: str | None = None
    log_every: int = 10
    out: str = "runs/esm2lite"
    device: str | None = None

    def __post_init__(self):
        self.target_columns = tuple(self.target_columns)
        checks = [
            (self.mode in MODES, f"--mode must be one of {', '.join(MODES)}"),
            (self.schedule in ("cosine", "constant"), "--schedule must be cosine or constant"),
            ((self.checkpoint is None) != (self.model is None), "give exactly one of --checkpoint and --model"),
            ((self.steps is None) != (self.epochs is None), "give exactly one of --steps and --epochs"),
            (self.steps is None or self.steps > 0, "--steps must be positive"),
            (self.epochs is None or self.epochs > 0, "--epochs must be positive"),
            (self.batch_tokens > 0 and self.grad_accum > 0, "--batch-tokens and --grad-accum must be positive"),
            (self.lr > 0 and self.head_lr_mult > 0, "--lr and --head-lr-mult must be positive"),
            (self.precision in ("auto", "fp32", "bf16", "fp16"), "--precision must be auto, fp32, bf16 or fp16"),
            (self.eval_every is None or self.eval_every > 0, "--eval-every must be positive"),
            (self.save_every is None or self.save_every > 0, "--save-every must be positive"),
            (self.task in TASK_METRICS, f"--task must be one of {', '.join(TASK_METRICS)}"),
            (self.warmup_steps >= 0, "--warmup-steps must be 0 or more"),
            (self.log_every > 0 and self.keep_last > 0, "--log-every and --keep-last must be positive"),
            (self.clip > 0 and self.weight_decay >= 0, "--clip must be positive and --weight-decay 0 or more"),
            (self.max_residues > 0, "--max-residues must be positive"),
            (self.head_hidden > 0, "--head-hidden must be positive"),
            (0.0 <= self.head_dropout < 1.0, "--head-dropout must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise Esm2liteError(message)
        try:
            self.lora = LoRAConfig.from_dict(self.lora) if isinstance(self.lora, dict) else self.lora
            self.lora.validate()
        except ValueError as e:
            raise Esm2liteError(f"LoRA settings (--lora-*): {e}") from None
        known = metric_names(self.task, self.target_columns)
        if self.best_metric is not None and self.best_metric not in known:
            raise Esm2liteError(f"--best-metric {self.best_metric!r} is not reported for task {self.task}; "
                                f"choose one of {', '.join(known)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora"] = self.lora.to_dict()
        d["target_columns"] = list(self.target_columns)
        return d


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


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup, then cosine to 0 or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_model(cfg: TrainConfig, labels: LabelSpace, device) -> FineTuned:
    torch.manual_seed(cfg.seed)
    local = cfg.checkpoint and os.path.exists(cfg.checkpoint)  # stored absolute: found again from any directory
    base = (BaseRef(path=os.path.abspath(cfg.checkpoint) if local else cfg.checkpoint) if cfg.checkpoint
            else BaseRef(name=cfg.model, seed=cfg.seed))
    if cfg.model:
        print(f"WARNING: --model {cfg.model}: the encoder is RANDOMLY INITIALISED, not pretrained. "
              "Pass --checkpoint for pretrained ESM-2 weights.", flush=True)
    encoder = base.load(device=device)
    if cfg.mode == "lora":
        apply_lora(encoder, cfg.lora)
    elif cfg.mode == "head":
        encoder.requires_grad_(False)
    else:  # full: the masked-LM head is not on the task's path; it keeps its pretrained weights
        encoder.lm_head.requires_grad_(False)
    head = build_head(labels.task, encoder.config.d_model, labels.num_outputs, cfg.head_hidden, cfg.head_dropout)
    return FineTuned(encoder, head.to(device), labels, cfg.mode, base, cfg.lora if cfg.mode == "lora" else None)


def make_optimizer(model: FineTuned, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.98 as BioNeMo); weight decay on matrices only; head LR multiplier."""
    groups = []
    for part, mult in ((model.encoder, 1.0), (model.head, cfg.head_lr_mult)):
        params = [p for p in part.parameters() if p.requires_grad]
        for decay in (True, False):
            chosen = [p for p in params if (p.dim() >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": cfg.lr * mult, "base_lr": cfg.lr * mult,
                               "weight_decay": cfg.weight_decay if decay else 0.0})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)


class Batches:
    """One global, endless stream of training batches, epoch by epoch, each epoch reshuffled
    from (seed, epoch). Every call hands each of the `world` ranks its own next batch, so over
    all ranks every row is used once per epoch. The position (epoch, index) is global: it is
    the resumable state, valid for any number of ranks."""

    def __init__(self, records, cfg: TrainConfig, labels: LabelSpace, rank: int = 0, world: int = 1):
        self.records, self.labels, self.cfg = records, labels, cfg
        self.rank, self.world = rank, world
        self.lengths = [len(r.tokens) for r in records]
        self.epoch, self.index = 0, 0
        self._order, self._order_epoch = None, None

    def epoch_batches(self, epoch):
        return make_batches(self.lengths, self.cfg.batch_tokens, shuffle=True, seed=self.cfg.seed, epoch=epoch)

    def __len__(self):
        return len(self.epoch_batches(0))

    def _take(self) -> list[int]:
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self.epoch_batches(self.epoch), self.epoch
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            return self._take()
        self.index += 1
        return self._order[self.index - 1]

    def next_indices(self) -> list[int]:
        """This rank's record indices for the next micro-batch (every rank advances the stream)."""
        return [self._take() for _ in range(self.world)][self.rank]

    def next(self) -> dict:
        return collate([self.records[i] for i in self.next_indices()], self.labels)


# ---------------------------------------------------------------- the run directory


class RunDir:
    def __init__(self, out: str):
        self.out = out
        self.checkpoints = os.path.join(out, "checkpoints")
        self.best = os.path.join(out, "best")
        self.metrics = os.path.join(out, "metrics.jsonl")

    def step_dirs(self) -> list[tuple[int, str]]:
        if not os.path.isdir(self.checkpoints):
            return []
        found = [(int(m.group(1)), os.path.join(self.checkpoints, n))
                 for n in os.listdir(self.checkpoints) if (m := re.fullmatch(r"step_(\d+)", n))]
        return sorted(found)

    def log(self, record: dict) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_log(self, step: int) -> None:
        """On resume: drop records written after the checkpoint we resume from (and a line
        cut short by a kill)."""
        if not os.path.exists(self.metrics):
            return
        keep = []
        with open(self.metrics, encoding="utf-8", errors="replace") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record["step"] <= step and record["split"] != "test":
                        keep.append(json.dumps(record) + "\n")
        write_text(self.metrics, "".join(keep))

    def remove_leftovers(self) -> None:
        """Temporary directories of writes a kill cut short (never read: their names start with '.')."""
        for parent in (self.out, self.checkpoints):
            if os.path.isdir(parent):
                for name in os.listdir(parent):
                    if name.startswith(".") and name.endswith((".tmp", ".old")):
                        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)

    def prune(self, keep_last: int, protect: int | None) -> None:
        steps = self.step_dirs()
        for step, path in steps[:-keep_last]:  # keep_last >= 1 (TrainConfig checks)
            if step != protect:
                shutil.rmtree(path, ignore_errors=True)


def training_state_tensors(model, optimizer, d: Dist, moments: bool = True) -> dict:
    """Every rank's RNG state and (with moments) the optimizer moments keyed by parameter name,
    unsharded, so resumable on any number of ranks. Collective; complete on rank 0 only.
    Full fine-tunes keep their moments in the sharded checkpoint instead (moments=False)."""
    tensors = {}
    for name, st in distributed.full_optimizer_state(model, optimizer).items() if moments else ():
        for k, v in st.items():
            tensors[f"{name}.{k}"] = v.detach().to("cpu").contiguous()
    for rank, (cpu, cuda) in enumerate(distributed.gather(d, (torch.get_rng_state(), torch.cuda.get_rng_state()
                                                               if torch.cuda.is_available() else None))):
        tensors[f"rng.cpu.{rank}"] = cpu
        if cuda is not None:
            tensors[f"rng.cuda.{rank}"] = cuda
    return tensors


def load_training_state(path: str, model, optimizer, d: Dist) -> dict:
    """Inverse of training_state_tensors, onto a (possibly sharded) model's optimizer."""
    tensors = load_file(path + ".safetensors")
    with open(path + ".json", encoding="utf-8") as f:
        state = json.load(f)
    for name, p in model.named_parameters():
        if p.requires_grad and f"{name}.exp_avg" in tensors:
            optimizer.state[p] = {"step": tensors[f"{name}.step"].clone(),
                                  "exp_avg": distributed.like(p, tensors[f"{name}.exp_avg"]),
                                  "exp_avg_sq": distributed.like(p, tensors[f"{name}.exp_avg_sq"])}
    if f"rng.cpu.{d.rank}" in tensors and f"rng.cpu.{d.world}" not in tensors:  # same number of ranks
        torch.set_rng_state(tensors[f"rng.cpu.{d.rank}"])
        if f"rng.cuda.{d.rank}" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{d.rank}"])
    else:  # another number of ranks: a fresh, still deterministic stream per rank
        torch.manual_seed(state["step"] * 1000 + d.rank)
    return state


# ---------------------------------------------------------------- evaluation


def evaluate(model: FineTuned, records, cfg: TrainConfig, split: str, d: Dist | None = None) -> dict:
    outputs, loss = run_batches(model, records, cfg.batch_tokens, cfg.precision, desc=f"eval {split}",
                                with_loss=True, d=d)
    labels = model.labels
    if labels.task == "token-classification":  # per-record [T_i, C] outputs: pass as a list of batches
        outputs, targets = [o[None] for o in outputs], [labels.encode([r]) for r in records]
    else:
        outputs, targets = torch.stack(outputs), labels.encode(records)
    return {"loss": loss, **compute_metrics(labels.task, outputs, targets, labels)}


def is_better(value: float, best: float | None, metric: str) -> bool:
    if best is None:
        return True
    if value != value:  # nan never wins
        return False
    return value < best if metric_direction(metric) == "min" else value > best


# ---------------------------------------------------------------- the loop


def load_records(cfg: TrainConfig):
    spec = DataSpec(task=cfg.task, sequence_column=cfg.sequence_column, target_columns=cfg.target_columns,
                    mask_column=cfg.mask_column, split_column=cfg.split_column if cfg.csv else None,
                    max_residues=cfg.max_residues, truncate=cfg.truncate)
    return load_splits(spec, train=cfg.train_csv, valid=cfg.valid_csv, test=cfg.test_csv, csv=cfg.csv)


def prepare_run_dir(cfg: TrainConfig, run: RunDir, resume: bool, world: int) -> None:
    """Resume only with the same settings; the number of ranks may change if grad_accum x ranks
    (micro-batches per optimizer step) stays the same."""
    config_path = os.path.join(cfg.out, "config.json")
    if resume and os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            saved = json.load(f)
        changed = [k for k, v in cfg.to_dict().items()
                   if saved.get(k) != v and k not in ("out", "device", "grad_accum")]
        if saved["grad_accum"] * saved.get("world_size", 1) != cfg.grad_accum * world:
            changed.append(f"grad_accum x ranks (was {saved['grad_accum']} x {saved.get('world_size', 1)})")
        if changed:
            raise Esm2liteError(f"{config_path}: --resume needs the same settings; changed: {', '.join(changed)}")
    elif not resume and (os.path.exists(run.metrics) or run.step_dirs()):
        raise Esm2liteError(f"{cfg.out}: already holds a run; pass --resume to continue it or choose another --out")


def train_model(cfg: TrainConfig | None = None, records=None, resume: bool = False, **overrides) -> dict:
    """Fine-tune and return {"checkpoint": OUT/best, "summary": summary dict}.

    `records`: optional {"train": [...], "valid": [...], "test": [...]} of esm2lite.data.Record
    (e.g. from records_from_pairs) instead of CSV paths in cfg. Under torchrun every rank
    calls this; rank 0 writes the files."""
    cfg = cfg or TrainConfig(**overrides)
    start_time = time.time()
    d, device = distributed.setup(cfg.device)
    try:
        return _train(cfg, records, resume, d, device, start_time)
    finally:
        distributed.teardown(d)


def _train(cfg, records, resume, d: Dist, device, start_time) -> dict:
    if cfg.precision == "fp16":
        raise Esm2liteError("--precision fp16 training is not supported (use bf16 or fp32)")
    amp = amp_dtype_for(cfg.precision, device)

    def load_data():
        recs = records if records is not None else load_records(cfg)
        labels = LabelSpace.fit(cfg.task, recs["train"], list(cfg.target_columns), standardize=cfg.standardize)
        for split in ("valid", "test"):
            if split in recs:
                labels.check(recs[split])
        return recs, labels

    records, labels = distributed.agree(d, load_data)  # every rank validates every row; errors agree
    metric = cfg.best_metric or DEFAULT_METRIC[cfg.task]
    run = RunDir(cfg.out)
    distributed.agree(d, lambda: prepare_run_dir(cfg, run, resume, d.world))

    if resume and d.main:
        run.remove_leftovers()
    distributed.barrier(d)
    resume = resume and bool(run.step_dirs())  # killed before the first checkpoint: start over
    model = build_model(cfg, labels, device)
    model.encoder.activation_checkpointing = cfg.activation_checkpointing
    step, best_value, best_step, skipped = 0, None, None, 0
    if d.enabled:
        distributed.shard(model, d, amp)
    optimizer = make_optimizer(model, cfg)
    batches = Batches(records["train"], cfg, labels, d.rank, d.world)
    per_epoch = -(-len(batches) // d.world)
    total = cfg.steps or max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
    eval_every = cfg.eval_every or max(1, total // 5)
    save_every = cfg.save_every or eval_every

    if resume:
        _, last_dir = run.step_dirs()[-1]
        model.load_trained(last_dir, optimizer=optimizer if cfg.mode == "full" else None)  # onto the shards
        state = load_training_state(os.path.join(last_dir, "trainer_state"), model, optimizer, d)
        step, best_value, best_step, skipped = state["step"], state["best_value"], state["best_step"], state["skipped"]
        batches.epoch, batches.index = state["epoch"], state["index"]
        if d.main:
            run.truncate_log(step)
            print(f"resumed from {last_dir} at step {step}", flush=True)
    else:
        if d.main:
            os.makedirs(cfg.out, exist_ok=True)
            write_json(os.path.join(cfg.out, "config.json"), {**cfg.to_dict(), "world_size": d.world})
            write_text(run.metrics, "")
        if d.rank > 0:  # identical initial weights on every rank, then each its own dropout stream
            torch.manual_seed(cfg.seed * 1000 + d.rank)

    def checkpoint(step_now: int, is_best: bool) -> None:
        """Collective. Full mode: every rank writes its shards of the weights and the optimizer
        state. lora/head: the small trained state is gathered to rank 0, which writes."""
        sharded = cfg.mode == "full"
        tensors = distributed.trained_full_state(model) if d.enabled and not sharded else None
        extra = training_state_tensors(model, optimizer, d, moments=not sharded)
        state = {"step": step_now, "epoch": batches.epoch, "index": batches.index, "best_value": best_value,
                 "best_step": best_step, "skipped": skipped, "world_size": d.world}

        def write_state(directory):
            save_file(extra, os.path.join(directory, "trainer_state.safetensors"))
            write_json(os.path.join(directory, "trainer_state.json"), state)

        model.save(os.path.join(run.checkpoints, f"step_{step_now}"), tensors, extra=write_state, d=d,
                   optimizer=optimizer if sharded else None)
        if is_best:
            model.save(run.best, tensors, d=d)
        if d.main:
            run.prune(cfg.keep_last, protect=best_step)
        distributed.barrier(d)

    model.train()
    bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True, disable=not d.main)
    window_loss, window_tokens, window_steps, window_start = 0.0, 0, 0, time.time()
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        with stop_on_signals() as stop:
            while step < total:
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * lr_at(step, cfg, total)
                optimizer.zero_grad(set_to_none=True)
                step_loss, finite = 0.0, True
                for _ in range(cfg.grad_accum):
                    batch = batches.next()
                    tokens = batch["tokens"].to(device)
                    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        out = model(tokens)
                    loss = model.head.loss(out.float(), batch["target"].to(device))
                    if distributed.any_true(d, not bool(torch.isfinite(loss))):
                        finite = False
                        if not cfg.skip_nonfinite:
                            raise Esm2liteError(
                                f"non-finite training loss at step {step + 1}; the last good checkpoint is kept in "
                                f"{run.checkpoints} (--skip-nonfinite skips such batches instead)")
                        break
                    (loss / cfg.grad_accum).backward()
                    step_loss += loss.item() / cfg.grad_accum
                    window_tokens += int((tokens != 1).sum())
                if finite:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.clip)
                    optimizer.step()
                else:
                    skipped += 1
                step += 1
                window_loss, window_steps = window_loss + distributed.mean(d, step_loss), window_steps + 1
                bar.update(1)
                if step % cfg.log_every == 0 or step == total:
                    elapsed = max(time.time() - window_start, 1e-9)
                    tokens_per_s = distributed.mean(d, window_tokens / elapsed) * d.world
                    record = {"step": step, "split": "train", "loss": window_loss / window_steps,
                              "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": tokens_per_s}
                    if cfg.skip_nonfinite:
                        record["skipped_steps"] = skipped
                    if d.main:
                        run.log(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tokens_per_s:.0f}")
                    window_loss, window_tokens, window_steps, window_start = 0.0, 0, 0, time.time()
                is_best = False
                if "valid" in records and (step % eval_every == 0 or step == total):
                    result = evaluate(model, records["valid"], cfg, "valid", d)
                    if d.main:
                        run.log({"step": step, "split": "valid", **result})
                        bar.write(f"step {step}: valid " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
                    if is_better(result[metric], best_value, metric):
                        best_value, best_step, is_best = result[metric], step, True
                elif "valid" not in records and step == total:
                    best_step, is_best = step, True  # no validation split: the last step is "best"
                if step % save_every == 0 or step == total or is_best:
                    checkpoint(step, is_best)
                if distributed.any_true(d, bool(stop)):
                    if not (step % save_every == 0 or step == total or is_best):
                        checkpoint(step, False)
                    signum = stop[0] if stop else signal.SIGTERM
                    raise TrainingInterrupted(
                        f"{signal.Signals(signum).name}: stopped after step {step}; checkpoint saved in "
                        f"{os.path.join(run.checkpoints, f'step_{step}')}; continue with --resume", signum)
    finally:
        bar.close()

    summary = {"best_step": best_step, "best_metric": metric, "valid": None, "test": None}
    model.load_trained(run.best)
    if "valid" in records:
        summary["valid"] = evaluate(model, records["valid"], cfg, "valid", d)
    if "test" in records:
        summary["test"] = evaluate(model, records["test"], cfg, "test", d)
        if d.main:
            run.log({"step": best_step, "split": "test", **summary["test"]})
    summary["steps"], summary["skipped_steps"], summary["world_size"] = total, skipped, d.world
    summary["wall_time_s"] = time.time() - start_time
    if d.main:
        write_json(os.path.join(cfg.out, "summary.json"), summary)
    return {"checkpoint": run.best, "summary": summary}
