"""InferConfig: every setting of a prediction, embedding or scoring run, with its help text written
once, beside the field. infer.py's command line is generated from these fields (cli.add_options), as
train.py's is from TrainConfig; `check` refuses, before any work, an option that is missing or
would be ignored."""

import os
from dataclasses import dataclass

from esm2lite.cli import UsageError, opt
from esm2lite.inference.scoring import METHODS
from esm2lite.runtime.device import LAYOUTS, PRECISIONS

MODEL, IO, SCORE, RUNNING = "model (give one)", "input and output", "zero-shot variant scores (--score, with --base)", \
    "running"


@dataclass
class InferConfig:
    run: str | None = opt(None, "a train.py output directory (uses RUN/best); under torchrun write --run-dir, as "
                          "torchrun takes --run for its own --run-path", MODEL, metavar="DIR", aliases=("--run-dir",))
    checkpoint: str | None = opt(None, "a checkpoint directory (e.g. RUN/best or RUN/checkpoints/step_500)", MODEL,
                                 metavar="DIR")
    base: str | None = opt(None, "a plain pretrained ESM-2 (HF dir, fair-esm .pt, hub id): embeddings, or --score "
                           "(which needs the model's masked-LM head)", MODEL, metavar="MODEL")
    base_path: str | None = opt(None, "where the checkpoint's base model is now, if it moved", MODEL, metavar="MODEL")
    input: str | None = opt(None, "CSV or FASTA of sequences (--score: also a ProteinGym-style DMS CSV)", IO,
                            metavar="FILE")
    sequence_column: str | None = opt(None, "CSV column holding the sequences (default: sequence; DMS files: "
                                      "mutated_sequence)", IO, metavar="COLUMN")
    id_column: str | None = opt(None, "CSV column with sequence ids (default: a column named id, else row numbers)",
                                IO, metavar="COLUMN")
    split_column: str | None = opt(None, "CSV column grouping the rows (train, valid, test, ...): metrics are "
                                   "reported for each group and for all rows (default: a column named split, if "
                                   "any)", IO, metavar="COLUMN")
    output: str | None = opt(None, "CSV to write: id, sequence, the input's other columns, the predictions (--score: "
                             "the input's columns and the score); metrics go beside it (preds.csv -> "
                             "preds.metrics.json)", IO, metavar="CSV")
    embeddings: str | None = opt(None, "safetensors file for per-sequence mean embeddings, keyed mean/LAYER/ID", IO,
                                 metavar="FILE")
    per_residue: bool = opt(False, "also store per-residue embeddings", IO)
    layers: tuple | None = opt(None, "layers to embed (0 = input embeddings; default: last)", IO, item_type=int,
                               metavar="LAYER")
    residue_probs: str | None = opt(None, "per-residue tasks: also write one row per residue: id, position, "
                                    "residue, prediction, prob_CLASS columns", IO, metavar="CSV")
    mask_column: str | None = opt(None, "per-residue tasks with labels in the input: the 1/0 column marking "
                                  "labelled residues, as in training", IO, metavar="COLUMN")
    max_residues: int | None = opt(None, "longest sequence read in one piece (default: the model's context, 1022 "
                                   "residues for ESM-2, 2046 for ESM C); a fine-tuned head refuses longer ones, "
                                   "embeddings and --score split them into overlapping windows (docs/scoring.md)", IO)
    truncate: bool = opt(False, "cut longer sequences to --max-residues instead (predictions and embeddings)", IO)
    score: str | None = opt(None, "masked-marginal / wt-marginal: score the mutants of a DMS CSV against the wild "
                            "type; pll: pseudo-log-likelihood of each sequence (docs/scoring.md)", SCORE,
                            choices=METHODS)
    wildtype: str | None = opt(None, "the wild-type sequence, or a FASTA file holding it (default: derived from the "
                               "first row's mutated_sequence)", SCORE, metavar="SEQ_OR_FASTA")
    mutant_column: str = opt("mutant", "DMS column of mutants such as A24G or A24G:K46R", SCORE, metavar="COLUMN")
    dms_score_column: str = opt("DMS_score", "measured scores; when present, the Spearman correlation is reported",
                                SCORE, metavar="COLUMN")
    offset: int | None = opt(None, "number of the wild type's first residue in the mutant codes (default: 1)", SCORE)
    batch_tokens: int = opt(8192, "tokens per batch (padded batches: padding included; packed: real tokens)",
                            RUNNING)
    precision: str = opt("auto", "auto: bf16 on GPU, fp32 on CPU; int8 (CPU only): the encoder's linears in int8, "
                         "the rest fp32 (docs/int8.md)", RUNNING, choices=PRECISIONS)
    batches: str = opt("auto", "batch layout of predictions, embeddings and scores: padded, packed (end to end, no "
                       "padding: the same numbers), auto: packed on CPU, padded on GPU", RUNNING, choices=LAYOUTS)
    device: str | None = opt(None, "cpu, cuda, ... (default: cuda if available)", RUNNING)
    no_merge: bool = opt(False, "keep LoRA adapters separate (slower; same numbers)", RUNNING)

    @property
    def checkpoint_dir(self) -> str | None:
        """The fine-tuning checkpoint this run predicts with (RUN/best for --run)."""
        return os.path.join(self.run, "best") if self.run else self.checkpoint

    @property
    def metrics(self) -> str | None:
        """preds.csv -> preds.metrics.json: the metrics (or the scoring summary) beside the output."""
        first = self.output or self.residue_probs
        return os.path.splitext(first)[0] + ".metrics.json" if first else None

    def check(self) -> None:
        """UsageError (one line, exit 2) before any work: a missing option, or one that would be ignored."""
        if len([x for x in (self.run, self.checkpoint, self.base) if x]) != 1:
            raise UsageError("give exactly one of --run, --checkpoint, --base")
        if (mixup := self._run_or_checkpoint_mixup()) is not None:
            raise UsageError(mixup)
        if not self.input:
            raise UsageError("--input is required")
        if self.batch_tokens < 1 or (self.max_residues is not None and self.max_residues < 1):
            raise UsageError("--batch-tokens and --max-residues must be positive")
        if self.score:
            self._check_score()
        else:
            self._check_predict()

    def _given(self, *names) -> list[str]:
        """The options among `names` that were given (not left at their defaults)."""
        defaults = InferConfig()
        return ["--" + n.replace("_", "-") for n in names if getattr(self, n) != getattr(defaults, n)]

    def _check_score(self) -> None:
        if not self.base:
            raise UsageError("--score uses a pretrained model's masked-LM head: give --base MODEL (a fine-tuned "
                             "checkpoint's encoder no longer matches that head)")
        if not self.output:
            raise UsageError("--score needs --output (a CSV)")
        unused = self._given("embeddings", "per_residue", "layers", "residue_probs", "mask_column", "truncate",
                             "id_column", "no_merge", "base_path")
        if unused:
            raise UsageError(f"{unused[0]} is not used with --score (longer proteins are scored in windows, every "
                             "input column is kept)")

    def _check_predict(self) -> None:
        unused = self._given("wildtype", "offset", "mutant_column", "dms_score_column")
        if unused:
            raise UsageError(f"{unused[0]} is only used with --score")
        if not (self.output or self.embeddings or self.residue_probs):
            raise UsageError("give --output (predictions) and/or --embeddings (or --score for zero-shot scores)")
        if self.base and (self.no_merge or self.base_path):
            raise UsageError(f"{self._given('no_merge', 'base_path')[0]} is for fine-tuned checkpoints, not --base")
        if self.base and (self.output or self.residue_probs):
            raise UsageError("--base has no task head: use --embeddings, or --score for zero-shot variant scores")
        if (self.per_residue or self.layers) and not self.embeddings:
            raise UsageError(f"{self._given('per_residue', 'layers')[0]} is for --embeddings")
        if self.layers and min(self.layers) < 0:
            raise UsageError("--layers are 0 (input embeddings) .. the number of layers")

    def _run_or_checkpoint_mixup(self) -> str | None:
        """--run given a checkpoint directory (RUN/best, a step), or --checkpoint given a run
        directory: the line that names the fix."""
        if self.run and not os.path.isdir(os.path.join(self.run, "best")) and any(
                os.path.exists(os.path.join(self.run, name)) for name in ("SHA256SUMS", "model.safetensors", "dcp")):
            return f"--run {self.run} is a checkpoint directory, not a train.py run: write --checkpoint {self.run}"
        if self.checkpoint and os.path.isdir(os.path.join(self.checkpoint, "best")):
            return (f"--checkpoint {self.checkpoint} is a train.py run directory, not a checkpoint: write --run "
                    f"{self.checkpoint} (or --checkpoint {os.path.join(self.checkpoint, 'best')})")
        return None
