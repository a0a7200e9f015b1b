"""Zero-shot variant scoring with ESM-2's masked-LM head (Meier et al. 2021; ProteinGym's ESM
baselines). No labels, no fine-tuning: log-probabilities the pretrained model gives residues.

    masked-marginal   sum over substituted positions i of log p(mt_i | wt, i masked)
                                                        - log p(wt_i | wt, i masked)
    wt-marginal       the same terms from the unmasked wild type
    pll               pseudo-log-likelihood of a whole sequence s of L residues:
                      sum over i = 1..L of log p(s_i | s with i masked);
                      pseudo-perplexity = exp(-pll / L)

Mutants are written as ProteinGym writes them: "A24G:K46R" (wild-type letter, position, new
letter; 1-based positions unless `offset` says otherwise; "WT" or "_wt" = no substitution).

Work is planned first, then run in token-budget batches (windows.run_rows): every distinct
model input is forwarded once and every score reads what it needs from it.
    masked-marginal   one row per distinct mutated position (the wild type with it masked)
    wt-marginal       one row (the wild type), or one per distinct window for long proteins
    pll               one row per distinct (sequence with i masked): variants that agree
                      everywhere but at i share it (all substitutions at one position share
                      the row that masks that position), duplicates share everything
Proteins over max_residues are scored position by position in windows.optimal_window.
"""

import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from esm2lite.errors import CheckpointError, DataError
from esm2lite.tasks.metrics import spearman
from esm2lite.data.records import where as _where
from esm2lite.model.tokenizer import TOKENS
from esm2lite.inference.windows import Rows, encode_protein, optimal_window, run_rows, window_size
from esm2lite.weights.pretrained import load_pretrained

METHODS = ("masked-marginal", "wt-marginal", "pll")
LETTERS = "LAGVSERTIDPKQNFYMHWCXBUZO"  # residue letters a mutant may name
WILD_TYPE_CODES = ("wt", "_wt")  # a mutant code meaning "no substitution"
_SUBSTITUTION = re.compile(r"([A-Za-z])(-?\d+)([A-Za-z])")
_TOKEN_ID = {t: i for i, t in enumerate(TOKENS)}


# ----------------------------------------------------------------------------- mutants

@dataclass(frozen=True)
class Substitution:
    wt: str
    position: int  # in the mutant code's numbering (1-based by default)
    mt: str

    def __str__(self):
        return f"{self.wt}{self.position}{self.mt}"


def shown(text: str, limit: int = 40) -> str:
    """repr(text) for an error line, cut short: a huge cell must not become a huge message."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def parse_mutant(code, wildtype: str | None = None, where: str = "mutant", offset: int = 1) -> tuple:
    """'A24G:K46R' -> (Substitution, ...) sorted by position; () for "WT" / "_wt". With the
    wild type, every position must exist and hold the named wild-type letter."""
    if not isinstance(code, str) or not code.strip():
        raise DataError(f"{where}: empty mutant (expected e.g. A24G or A24G:K46R)")
    code = code.strip()
    if code.lower() in WILD_TYPE_CODES:
        return ()
    subs = []
    for part in code.split(":"):
        m = _SUBSTITUTION.fullmatch(part.strip())
        if m is None:
            raise DataError(f"{where}: {shown(part.strip())} in {shown(code)} is not a substitution like A24G "
                            f"(wild-type letter, position, new letter; ':' between substitutions)")
        sub = Substitution(m.group(1).upper(), int(m.group(2)), m.group(3).upper())
        bad = next((c for c in (sub.wt, sub.mt) if c not in LETTERS), None)
        if bad is not None:
            raise DataError(f"{where}: {shown(part.strip())}: {bad!r} is not an amino-acid letter")
        subs.append(sub)
    positions = [s.position for s in subs]
    dup = next((p for i, p in enumerate(positions) if p in positions[:i]), None)
    if dup is not None:
        raise DataError(f"{where}: {shown(code)} substitutes position {dup} twice")
    subs = tuple(sorted(subs, key=lambda s: s.position))
    if wildtype is not None:
        check_mutant(subs, wildtype, where, offset)
    return subs


def check_mutant(subs, wildtype: str, where: str, offset: int = 1) -> None:
    """DataError naming `where` if a position is outside the wild type or its letter differs."""
    first, last = offset, offset + len(wildtype) - 1
    for s in subs:
        if not first <= s.position <= last:
            raise DataError(f"{where}: {s} is outside the wild type (positions {first}..{last})")
        have = wildtype[s.position - offset]
        if have != s.wt:
            raise DataError(f"{where}: {s} does not match the wild type, which has {have} at "
                            f"position {s.position}, not {s.wt}")


def mutate(wildtype: str, subs, offset: int = 1) -> str:
    """The wild type with the substitutions applied (positions not checked: see check_mutant)."""
    seq = list(wildtype)
    for s in subs:
        seq[s.position - offset] = s.mt
    return "".join(seq)


# ----------------------------------------------------------------------------- results

@dataclass
class ScoreResult:
    """Scores in input order, and what it took to compute them."""

    method: str
    scores: list[float]
    pseudo_perplexity: list[float] | None  # pll only
    forwards: int  # rows through the model: one (masked or windowed) sequence each
    batches: int  # batched model calls
    tokens: int  # tokens in those rows, padding excluded
    window: str  # "none": every input fit in max_residues; "optimal": ProteinGym's rule was used
    window_tokens: int | None  # tokens per window (max_residues + 2); None = no limit
    spearman: float | None = None  # against DMS_score, when given

    def summary(self) -> dict:
        """Everything but the per-variant values (for a log line or a JSON file)."""
        return {"method": self.method, "variants": len(self.scores), "forwards": self.forwards,
                "batches": self.batches, "tokens": self.tokens, "window": self.window,
                "window_tokens": self.window_tokens, "spearman": self.spearman}


@dataclass
class _Reads:
    """What to add up: score[slot] += weight * log p(target | row) at token `pos` of the row's
    protein (protein coordinates: the window start is subtracted when the row runs)."""

    row: list = field(default_factory=list)
    pos: list = field(default_factory=list)
    target: list = field(default_factory=list)
    slot: list = field(default_factory=list)
    weight: list = field(default_factory=list)

    def add(self, row, pos, target, slot, weight):
        for name, value in zip(("row", "pos", "target", "slot", "weight"), (row, pos, target, slot, weight)):
            getattr(self, name).append(np.asarray(value).reshape(-1))

    def arrays(self):
        return [np.concatenate(getattr(self, n)) if getattr(self, n) else np.zeros(0)
                for n in ("row", "pos", "target", "slot", "weight")]


# ----------------------------------------------------------------------------- plans

def _new_row(rows: Rows, base: int, start: int, end: int, mask: int) -> int:
    rows.base.append(base)
    rows.start.append(start)
    rows.end.append(end)
    rows.mask.append(mask)
    return len(rows) - 1


def _marginal_plan(wt_tokens, mutants, masked: bool, W, offset: int):
    """masked: one row per distinct position i (wild type, i masked, i's optimal window);
    unmasked: one row per distinct window. Each substitution reads +log p(mt) - log p(wt)."""
    T = len(wt_tokens)
    rows, reads, row_of = Rows([wt_tokens], [], [], [], []), _Reads(), {}
    columns = ([], [], [], [], [])  # row, pos, target, slot, weight
    for v, subs in enumerate(mutants):
        for s in subs:
            i = s.position - offset + 1  # token index: <cls> is token 0
            start, end = optimal_window(i, T, W)
            key = i if masked else (start, end)
            if key not in row_of:
                row_of[key] = _new_row(rows, 0, start, end, i if masked else -1)
            r = row_of[key]
            for column, values in zip(columns, ((r, r), (i, i), (_TOKEN_ID[s.mt], _TOKEN_ID[s.wt]), (v, v),
                                                (1.0, -1.0))):
                column.extend(values)
    reads.add(*columns)
    return rows, reads


def _pll_plan(bases: list[torch.Tensor], W):
    """For every base sequence and residue token i, a row masking i in i's optimal window;
    bases of one length whose windows agree everywhere but at i share that row."""
    rows, reads = Rows(bases, [], [], [], []), _Reads()
    by_length = {}
    for b, t in enumerate(bases):
        by_length.setdefault(len(t), []).append(b)
    for T, group in by_length.items():
        A = torch.stack([bases[b] for b in group]).numpy()  # [n, T]
        for i in range(1, T - 1):
            start, end = optimal_window(i, T, W)
            context = np.concatenate([A[:, start:i], A[:, i + 1:end]], axis=1)  # [n, end - start - 1]
            _, first, inverse = np.unique(context, axis=0, return_index=True, return_inverse=True)
            new = [_new_row(rows, group[j], start, end, i) for j in first]
            reads.add(np.asarray(new)[inverse.reshape(-1)], np.full(len(group), i), A[:, i], group,
                      np.ones(len(group)))
    return rows, reads


# ----------------------------------------------------------------------------- running

def _execute(model, rows: Rows, reads: _Reads, n_slots: int, batch_tokens: int, precision: str, layout: str):
    """Run the rows; -> (score per slot [n_slots] float64, batches)."""
    row, pos, target, slot, weight = reads.arrays()
    row = row.astype(np.int64)
    order = np.argsort(row, kind="stable")
    lo = np.searchsorted(row[order], np.arange(len(rows)), side="left")
    hi = np.searchsorted(row[order], np.arange(len(rows)), side="right")
    start = np.asarray(rows.start)
    in_batch = np.zeros(len(rows), dtype=np.int64)  # row -> its index in the running batch
    scores = torch.zeros(n_slots, dtype=torch.float64)
    n_batches = 0
    for idx, out in run_rows(model, rows, batch_tokens, precision, desc="score", layout=layout):
        n_batches += 1
        sel = np.concatenate([order[lo[r]:hi[r]] for r in idx])
        in_batch[idx] = np.arange(len(idx))
        b, t = in_batch[row[sel]], pos[sel].astype(np.int64) - start[row[sel]]
        logits = out["logits"][torch.as_tensor(b), torch.as_tensor(t)]  # [n_reads, 33]
        logp = logits.float().log_softmax(-1).cpu()
        picked = logp.gather(1, torch.as_tensor(target[sel], dtype=torch.long)[:, None])[:, 0]
        scores.index_add_(0, torch.as_tensor(slot[sel], dtype=torch.long),
                          torch.as_tensor(weight[sel]) * picked.double())
    return scores, n_batches


def check_options(method: str, batch_tokens: int) -> None:
    if method not in METHODS:
        raise DataError(f"unknown scoring method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise DataError(f"batch_tokens must be a positive integer, got {batch_tokens!r}")


def _as_model(model):
    """An ESM2 as it is, or a checkpoint path / hub id loaded with ESM2.from_pretrained."""
    if isinstance(model, (str, os.PathLike)):

        model = load_pretrained(str(model))
    if not getattr(getattr(model, "config", None), "lm_head", True):
        raise CheckpointError("scoring needs the masked-LM head, and this model has none (a checkpoint "
                              "saved without it: EsmModel or a task model)")
    return model


def clean_sequence(seq: str) -> str:
    return "".join(seq.split()).upper()  # as the tokenizer reads it: whitespace ignored


def _checked(mutant, wildtype, where, offset) -> tuple:
    """A mutant code, or a tuple of Substitutions, checked against the wild type."""
    if isinstance(mutant, tuple) and all(isinstance(s, Substitution) for s in mutant):
        check_mutant(mutant, wildtype, where, offset)
        return mutant
    return parse_mutant(mutant, wildtype, where, offset)


@dataclass
class Plan:
    """The work for one call, before any forward: `rows` to run, `reads` to add up into
    n_slots scores, and which slot each input takes its score from."""

    method: str
    rows: Rows
    reads: _Reads
    n_slots: int
    slot_of: list[int]  # input k's score is slot slot_of[k]
    lengths: list[int]  # tokens of each input's whole protein (pseudo-perplexity divides by len - 2)
    window_tokens: int | None

    @property
    def forwards(self) -> int:
        return len(self.rows)

    @property
    def window(self) -> str:
        W = self.window_tokens
        return "optimal" if W is not None and max(self.lengths) > W else "none"


def plan_sequences(sequences, max_residues: int | None = 1022, source: str = "<memory>") -> Plan:
    """pll of whole sequences; identical sequences share one slot (and so every row)."""
    tokens = [encode_protein(s, _where(source, k, None, "item")) for k, s in enumerate(sequences)]
    if not tokens:
        raise DataError(f"{source}: no sequences to score")
    distinct, slot_of = {}, []
    for t in tokens:
        slot_of.append(distinct.setdefault(tuple(t.tolist()), len(distinct)))
    W = window_size(max_residues)
    rows, reads = _pll_plan([torch.tensor(k, dtype=torch.long) for k in distinct], W)
    return Plan("pll", rows, reads, len(distinct), slot_of, [len(t) for t in tokens], W)


def plan_mutants(wildtype: str, mutants, method: str = "masked-marginal", max_residues: int | None = 1022,
                 offset: int = 1, source: str = "<memory>") -> Plan:
    """The plan for mutants of one wild type (codes like "A24G:K46R", or Substitution tuples;
    errors name `source` and the 0-based item)."""
    check_options(method, 1)
    wt_tokens = encode_protein(wildtype, "wild type")
    wildtype = clean_sequence(wildtype)
    mutants = [_checked(m, wildtype, _where(source, k, None, "item"), offset) for k, m in enumerate(mutants)]
    if not mutants:
        raise DataError(f"{source}: no mutants to score")
    if method == "pll":
        return plan_sequences([mutate(wildtype, subs, offset) for subs in mutants], max_residues, source)
    W = window_size(max_residues)
    rows, reads = _marginal_plan(wt_tokens, mutants, method == "masked-marginal", W, offset)
    return Plan(method, rows, reads, len(mutants), list(range(len(mutants))), [len(wt_tokens)] * len(mutants), W)


def run_plan(model, plan: Plan, batch_tokens: int = 8192, precision: str = "auto", dms_scores=None,
             layout: str = "auto") -> ScoreResult:
    """Run a plan: scores in input order, with the forwards, batches and tokens it took. layout: padded,
    packed or auto (runtime/device.packs): the same scores."""
    check_options(plan.method, batch_tokens)
    model = _as_model(model)
    per_slot, n_batches = (_execute(model, plan.rows, plan.reads, plan.n_slots, batch_tokens, precision, layout)
                           if len(plan.rows) else (torch.zeros(plan.n_slots, dtype=torch.float64), 0))
    scores = per_slot[torch.as_tensor(plan.slot_of)]
    if dms_scores is not None and len(dms_scores) != len(scores):
        raise DataError(f"{len(dms_scores)} DMS scores for {len(scores)} variants")
    rows = plan.rows
    ppl = None
    if plan.method == "pll":
        ppl = [math.exp(-float(x) / (n - 2)) for x, n in zip(scores, plan.lengths)]
    return ScoreResult(
        method=plan.method, scores=scores.tolist(), pseudo_perplexity=ppl, forwards=len(rows), batches=n_batches,
        tokens=int(sum(e - s for s, e in zip(rows.start, rows.end))), window=plan.window,
        window_tokens=plan.window_tokens,
        spearman=spearman(scores.numpy(), dms_scores) if dms_scores is not None else None)


def score_sequences(model, sequences, batch_tokens: int = 8192, max_residues: int | None = 1022,
                    precision: str = "auto", dms_scores=None, source: str = "<memory>",
                    layout: str = "auto") -> ScoreResult:
    """pll and pseudo-perplexity of whole sequences (any lengths), in input order."""
    check_options("pll", batch_tokens)
    return run_plan(model, plan_sequences(sequences, max_residues, source), batch_tokens, precision, dms_scores,
                    layout)


def score_mutants(model, wildtype: str, mutants, method: str = "masked-marginal", batch_tokens: int = 8192,
                  max_residues: int | None = 1022, precision: str = "auto", offset: int = 1, dms_scores=None,
                  source: str = "<memory>", layout: str = "auto") -> ScoreResult:
    """Scores of mutants of one wild type, in input order (see plan_mutants for `mutants`)."""
    check_options(method, batch_tokens)
    plan = plan_mutants(wildtype, mutants, method, max_residues, offset, source)
    return run_plan(model, plan, batch_tokens, precision, dms_scores, layout)
