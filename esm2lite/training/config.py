"""TrainConfig: every setting of a fine-tuning run, with its help text written once, beside the
field. train.py's command line is generated from these fields (cli.add_options): a field's flag is
--its-name unless `flag` says otherwise, and its group, choices and help come from its metadata.
Every value is checked here, before any work."""

import math
from dataclasses import asdict, dataclass

from esm2lite.checkpoints.modes import MODE
from esm2lite.cli import opt
from esm2lite.tasks import DEFAULT_TASK, TASKS
from esm2lite.runtime.device import LAYOUTS, PRECISIONS as INFERENCE_PRECISIONS
from esm2lite.runtime.device import check_device
from esm2lite.runtime.distributed import DIST_TIMEOUT
from esm2lite.errors import Esm2liteError
from esm2lite.model.lora import LoRAConfig

SCHEDULES = ("cosine", "constant")
PRECISIONS = tuple(p for p in INFERENCE_PRECISIONS if p not in ("fp16", "int8"))  # fp16: no loss scaling here
MAX_HEAD_HIDDEN = 65536  # the largest head a checkpoint may ask for (spec.HEAD_LIMITS)


DATA, MODEL, OPTIM, OUTPUT = "data", "model", "optimisation", "evaluation and output"


@dataclass
class TrainConfig:
    train_csv: str | None = opt(None, "CSV of training rows", DATA)
    valid_csv: str | None = opt(None, "CSV of validation rows (model selection)", DATA)
    test_csv: str | None = opt(None, "CSV of test rows (scored once, at the end, with the best checkpoint)", DATA)
    csv: str | None = opt(None, "one CSV holding all rows, with a split column (train/valid/test)", DATA)
    split_column: str | None = opt(None, "with --csv: the column naming each row's split (default: split)", DATA)
    sequence_column: str = opt("sequence", "column holding the amino-acid sequence", DATA)
    target_columns: tuple = opt(("target",), "column(s) to predict; several for multi-target regression", DATA,
                                flag="--target-column")
    mask_column: str | None = opt(None, "token-classification: per-residue 1/0 string, 0 = ignore residue "
                                  "(FLIP's secondary structure: resolved)", DATA)
    id_column: str | None = opt(None, "column of row ids, copied into predictions_valid.csv / predictions_test.csv "
                                "(default: id, when the CSV has it)", DATA)
    task: str = opt(DEFAULT_TASK.name, "; ".join(f"{t.name}: {t.help}" for t in TASKS.values()), DATA,
                    choices=tuple(TASKS))
    max_residues: int = opt(1022, "longest sequence allowed", DATA)
    truncate: bool = opt(False, "cut longer sequences instead of stopping with an error", DATA)
    standardize: bool = opt(False, "regression: train on z-scored targets (undone at prediction)", DATA,
                            flag="--standardize-targets")
    checkpoint: str | None = opt(None, "pretrained ESM-2: HF directory, fair-esm .pt, or hub id "
                                 "(e.g. facebook/esm2_t33_650M_UR50D)", MODEL)
    model: str | None = opt(None, "architecture name to train from RANDOM weights (e.g. esm2_t6_8M_UR50D, or "
                            "ESM C's esmc_300m)", MODEL)
    mode: str = opt("lora", "lora: adapters + head train; full: everything trains; head: only the head trains",
                    MODEL, choices=tuple(MODE))
    lora: LoRAConfig = opt(LoRAConfig, "LoRA settings", MODEL, prefix="--lora-",
                           fields=("rank", "alpha", "dropout", "targets", "layers", "init_a", "init_b", "tie_weights"))
    head_hidden: int = opt(256, "hidden width of the head's MLP", MODEL)
    head_dropout: float = opt(0.25, "dropout in the head", MODEL)
    steps: int | None = opt(None, "optimizer steps (or give --epochs)", OPTIM)
    epochs: float | None = opt(None, "passes over the training data (or give --steps)", OPTIM)
    batch_tokens: int = opt(8192, "tokens per batch (padded batches: padding included; packed: real tokens)", OPTIM)
    lr: float = opt(4e-4, "peak learning rate", OPTIM)
    head_lr_mult: float = opt(1.0, "head LR = lr * this", OPTIM)
    weight_decay: float = opt(0.01, "AdamW weight decay (matrices only)", OPTIM)
    warmup_steps: int = opt(0, "steps of linear LR warmup", OPTIM)
    schedule: str = opt("cosine", "LR after warmup", OPTIM, choices=SCHEDULES)
    grad_accum: int = opt(1, "batches per optimizer step", OPTIM)
    clip: float = opt(1.0, "gradient-norm clipping", OPTIM)
    precision: str = opt("auto", "auto: bf16 autocast on GPU, fp32 on CPU", OPTIM, choices=PRECISIONS)
    batches: str = opt("auto", "batch layout: padded (each sequence in its own row), packed (end to end, no "
                       "padding: the same numbers), auto: packed on CPU, padded on GPU", OPTIM, choices=LAYOUTS)
    seed: int = opt(0, "random seed (0 .. 2^32 - 1)", OPTIM)
    activation_checkpointing: bool = opt(False, "recompute each block's activations in backward: less memory "
                                         "for long sequences / big models", OPTIM)
    skip_nonfinite: bool = opt(False, "skip batches with a NaN/inf loss (counted in metrics) instead of stopping",
                               OPTIM)
    eval_every: int | None = opt(None, "validate every N steps (default: 5 times per run)", OUTPUT)
    save_every: int | None = opt(None, "checkpoint every N steps (default: at each evaluation)", OUTPUT)
    log_every: int = opt(10, "write a train line to metrics.jsonl every N steps", OUTPUT)
    keep_last: int = opt(2, "step checkpoints to keep (best/ is kept apart)", OUTPUT)
    best_metric: str | None = opt(None, "validation metric choosing best/ (default: loss, the validation loss, for "
                                  "every task); without a validation split the last step is kept", OUTPUT)
    out: str = opt("runs/esm2lite", "output directory", OUTPUT)
    device: str | None = opt(None, "cpu, cuda, cuda:1 ... (default: cuda if available)", OUTPUT)
    dist_timeout: int = opt(DIST_TIMEOUT, "with torchrun: seconds a process waits for the others before it stops "
                            "with an error saying one stopped responding (a hung, paused or overloaded machine)",
                            OUTPUT)

    def __post_init__(self):
        self.target_columns = tuple(self.target_columns)
        try:
            self.lora = LoRAConfig.from_dict(self.lora) if isinstance(self.lora, dict) else self.lora
            self.lora.validate()
        except ValueError as e:
            raise Esm2liteError(f"LoRA settings (--lora-*): {e}") from None
        for ok, message in self._checks():
            if not ok:
                raise Esm2liteError(message)
        known = TASKS[self.task].metric_names(self.target_columns)
        if self.best_metric is not None and self.best_metric not in known:
            raise Esm2liteError(f"--best-metric {self.best_metric[:40]!r} is not reported for task {self.task}; "
                                f"choose one of {', '.join(known)}")
        check_device(self.device)

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            (self.mode in MODE, f"--mode must be one of {', '.join(MODE)}"),
            (self.task in TASKS, f"--task must be one of {', '.join(TASKS)}"),
            (not self.standardize or self.task not in TASKS or TASKS[self.task].numeric,
             f"--standardize-targets z-scores numeric targets; --task {self.task} has labels: drop it"),
            (self.schedule in SCHEDULES, "--schedule must be cosine or constant"),
            (self.precision != "fp16", "--precision fp16 training is not supported (use bf16 or fp32)"),
            (self.precision != "int8", "--precision int8 is for inference on a CPU (infer.py); train in fp32 or bf16"),
            (self.precision in PRECISIONS, "--precision must be auto, fp32 or bf16"),
            (self.batches in LAYOUTS, "--batches must be auto, padded or packed"),
            ((self.checkpoint is None) != (self.model is None), "give exactly one of --checkpoint and --model"),
            ((self.steps is None) != (self.epochs is None), "give exactly one of --steps and --epochs"),
            (self.split_column is None or self.csv is not None,
             f"--split-column {self.split_column}: only one --csv file holding every split has a split column; write "
             f"--csv FILE --split-column {self.split_column} instead of --train-csv/--valid-csv/--test-csv"),
            (self.mode == "lora" or self.lora == LoRAConfig(),
             f"--lora-* options only apply to --mode lora (this run is --mode {self.mode}); drop them or use --mode lora"),
            (self.steps is None or self.steps > 0, "--steps must be positive"),
            (self.epochs is None or 0 < self.epochs <= 1e6, "--epochs must be a number in (0, 1e6]"),
            (self.batch_tokens > 0 and self.grad_accum > 0, "--batch-tokens and --grad-accum must be positive"),
            (0 < self.lr <= 1, "--lr must be a number in (0, 1]"),
            (0 < self.head_lr_mult <= 1000, "--head-lr-mult must be a number in (0, 1000]"),
            (self.warmup_steps >= 0, "--warmup-steps must be 0 or more"),
            (self.eval_every is None or self.eval_every > 0, "--eval-every must be positive"),
            (self.save_every is None or self.save_every > 0, "--save-every must be positive"),
            (self.log_every > 0 and self.keep_last > 0, "--log-every and --keep-last must be positive"),
            (0 < self.clip < math.inf and 0 <= self.weight_decay <= 1,
             "--clip must be a positive number and --weight-decay in [0, 1]"),
            (self.max_residues > 0, "--max-residues must be positive"),
            (0 < self.head_hidden <= MAX_HEAD_HIDDEN, f"--head-hidden must be in 1..{MAX_HEAD_HIDDEN}"),
            (0.0 <= self.head_dropout < 1.0, "--head-dropout must be in [0, 1)"),
            (0 <= self.seed < 2**32, "--seed must be in 0 .. 2^32 - 1"),
            (0 < self.dist_timeout <= 7 * 24 * 3600, "--dist-timeout must be a number of seconds in 1 .. 604800 (a week)"),
            *((_utf8(v), f"--{k.replace('_', '-')}: not valid UTF-8 ({v!r:.60})")
              for k, v in asdict(self).items() if isinstance(v, str)),
        ]

    @property
    def split(self) -> str | None:
        """The split column's name: with --csv, "split" unless told; per-split files are checked
        against it (reading.load_splits)."""
        return self.split_column or "split"

    @property
    def metric(self) -> str:
        """The validation metric that chooses best/."""
        return self.best_metric or "loss"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora"] = self.lora.to_dict()
        d["target_columns"] = list(self.target_columns)
        return d


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a file name of bytes that are not UTF-8 (surrogate escapes)
        return False
