"""Zero-shot scoring against the published recipes, re-written here and run on fair-esm's and
transformers' models with the same random weights as ours:

    fair-esm  examples/variant-prediction/predict.py      masked / wt marginals, label_row
    ProteinGym proteingym/baselines/esm/compute_fitness.py multi-mutant label_row, optimal window
                                                          (utils/scoring_utils.get_optimal_window)

Tokens for the references come from fair-esm's own alphabet, never from our tokenizer."""

import csv
import math
import re

import pytest
import torch
from scipy.stats import spearmanr

import oracles
from esm2lite import ESM2
from esm2lite.errors import CheckpointError, DataError
from esm2lite.inference.dms import read_dms, score_dms
from esm2lite.model.batch import Batch
from esm2lite.inference.scoring import Substitution, mutate, parse_mutant, plan_mutants, score_mutants, score_sequences
from test_windows import proteingym_optimal_window, protein
from esm2lite import load_pretrained

AA = "ACDEFGHIKLMNPQRSTVWY"


@pytest.fixture(scope="module")
def alphabet():
    import esm

    return esm.data.Alphabet.from_architecture("ESM-1b")


class Reference:
    """A reference implementation's logits function [B, T] -> [B, T, 33], as it runs (fp32) and on a
    float64 copy of the same model: the yardstick of every fp32 comparison (no fixed fp32 tolerance,
    those do not travel between machines)."""

    def __init__(self, model, call):
        exact = oracles.float64_copy(model)
        self.fp32, self.fp64 = (lambda tokens: call(model, tokens)), (lambda tokens: call(exact, tokens))

    def agrees(self, ours, recipe, what=""):
        """ours (esm2lite's scores) against recipe(logits function), the published recipe on this reference:
        within the recipe's own fp32 error, both measured against the recipe on the float64 model.
        Returns the recipe's fp32 result."""
        theirs = recipe(self.fp32)
        oracles.assert_fp32_agrees(ours, theirs, recipe(self.fp64), what=what)
        return theirs


@pytest.fixture(scope="module")
def fair(fair_tiny):
    """(ours, Reference) on the same fair-esm file."""
    return load_pretrained(fair_tiny), Reference(oracles.load_fair_esm(fair_tiny), lambda m, t: m(t)["logits"])


@pytest.fixture(scope="module")
def hf(hf_tiny):
    return load_pretrained(hf_tiny), Reference(oracles.load_hf(hf_tiny), lambda m, t: m(input_ids=t).logits)


def counting(model, monkeypatch):
    """Wraps the model's forward (for one test) to record every batch it runs as (sequences, the
    longest's tokens): a padded batch's shape, whichever layout ran."""
    shapes, forward = [], model.forward

    def wrapped(batch, *args, **kwargs):
        lengths = Batch.of(batch).lengths
        shapes.append((len(lengths), int(lengths.max())))
        return forward(batch, *args, **kwargs)

    monkeypatch.setattr(model, "forward", wrapped)
    return shapes


# ---------------------------------------------------------------- the recipes


def encode(alphabet, seq):
    return alphabet.get_batch_converter()([("protein1", seq)])[2]  # [1, L + 2]


@torch.no_grad()
def recipe_token_probs(logits_fn, alphabet, seq, strategy, model_window=None):
    """predict.py's token_probs [1, T, 33]: wt-marginals = one forward; masked-marginals = token i
    masked in turn. With model_window, masked-marginals slices ProteinGym's optimal window."""
    batch_tokens = encode(alphabet, seq)
    if strategy == "wt-marginals":
        return torch.log_softmax(logits_fn(batch_tokens), dim=-1)
    all_token_probs = []
    for i in range(batch_tokens.size(1)):
        batch_tokens_masked = batch_tokens.clone()
        batch_tokens_masked[0, i] = alphabet.mask_idx
        start = 0
        if model_window is not None and batch_tokens.size(1) > model_window:
            start, end = proteingym_optimal_window(i, len(seq) + 2, model_window)
            batch_tokens_masked = batch_tokens_masked[:, start:end]
        token_probs = torch.log_softmax(logits_fn(batch_tokens_masked), dim=-1)
        all_token_probs.append(token_probs[:, i - start])
    return torch.cat(all_token_probs, dim=0).unsqueeze(0)


def label_row(row, sequence, token_probs, alphabet, offset_idx=1):
    """ProteinGym's label_row (fair-esm's, summed over ':'-separated substitutions)."""
    score = 0
    for mutation in row.split(":"):
        wt, idx, mt = mutation[0], int(mutation[1:-1]) - offset_idx, mutation[-1]
        assert sequence[idx] == wt, "The listed wildtype does not match the provided sequence"
        wt_encoded, mt_encoded = alphabet.get_idx(wt), alphabet.get_idx(mt)
        score += (token_probs[0, 1 + idx, mt_encoded] - token_probs[0, 1 + idx, wt_encoded]).item()
    return score


@torch.no_grad()
def recipe_pll(logits_fn, alphabet, sequence, model_window=None):
    """compute_pppl's loop with its indices mended: the published loop runs over tokens
    1..len-2 and reads sequence[i], the residue to the right of the masked token (token i holds
    sequence[i - 1]), so it scores L - 2 positions against their neighbours. Here every residue
    token i = 1..L is masked and scored against its own residue. With model_window, each
    masked token gets ProteinGym's optimal window."""
    batch_tokens = encode(alphabet, sequence)
    log_probs = []
    for i in range(1, len(sequence) + 1):
        batch_tokens_masked = batch_tokens.clone()
        batch_tokens_masked[0, i] = alphabet.mask_idx
        start, end = 0, batch_tokens.size(1)
        if model_window is not None:
            start, end = proteingym_optimal_window(i, len(sequence) + 2, model_window)
        token_probs = torch.log_softmax(logits_fn(batch_tokens_masked[:, start:end]), dim=-1)
        log_probs.append(token_probs[0, i - start, alphabet.get_idx(sequence[i - 1])].item())
    return sum(log_probs)


@torch.no_grad()
def windowed_wt_probs(logits_fn, alphabet, seq, model_window):
    """wt-marginal of a long protein by our rule: token i's log-probs from the unmasked wild
    type cut to i's optimal window (ProteinGym's wt-marginals has no optimal-window variant)."""
    batch_tokens = encode(alphabet, seq)
    rows = []
    for i in range(batch_tokens.size(1)):
        start, end = proteingym_optimal_window(i, len(seq) + 2, model_window)
        rows.append(torch.log_softmax(logits_fn(batch_tokens[:, start:end]), dim=-1)[:, i - start])
    return torch.cat(rows).unsqueeze(0)


def some_mutants(seq, seed, n=12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        picks = sorted(set(torch.randint(0, len(seq), (1 + k % 3,), generator=g).tolist()))
        subs = [f"{seq[p]}{p + 1}{AA[int(torch.randint(0, 20, (1,), generator=g))]}" for p in picks]
        out.append(":".join(subs))
    return out


WT = protein(40, seed=11)


# ---------------------------------------------------------------- short proteins


@pytest.mark.parametrize("oracle", ["fair", "hf"])
@pytest.mark.parametrize("method", ["masked-marginal", "wt-marginal"])
def test_marginals_match_the_recipe(request, alphabet, oracle, method):
    ours, ref = request.getfixturevalue(oracle)
    mutants = some_mutants(WT, seed=1)

    def recipe(logits_fn):
        token_probs = recipe_token_probs(logits_fn, alphabet, WT, method.replace("-marginal", "-marginals"))
        return [label_row(m, WT, token_probs, alphabet) for m in mutants]

    result = score_mutants(ours, WT, mutants, method, precision="fp32")
    ref.agrees(result.scores, recipe, method)
    assert result.window == "none" and result.batches == 1
    assert result.forwards == (len({int(s[1:-1]) for m in mutants for s in m.split(":")})
                               if method == "masked-marginal" else 1)


def test_pll_matches_the_recipe(alphabet, fair):
    ours, ref = fair
    seqs = [protein(n, seed=20 + n) for n in (7, 31, 18, 31)]  # the 31-residue one twice
    result = score_sequences(ours, seqs, batch_tokens=500, precision="fp32")
    ref.agrees(result.scores, lambda fn: [recipe_pll(fn, alphabet, s) for s in seqs], "pll")
    ref.agrees(result.pseudo_perplexity, lambda fn: [math.exp(-recipe_pll(fn, alphabet, s) / len(s)) for s in seqs],
               "pseudo-perplexity")
    assert result.forwards == 7 + 31 + 18 and result.batches > 1  # a repeated sequence runs once
    assert result.scores[1] == result.scores[3]


def test_deep_mutational_scan_known_by_construction(alphabet, fair, monkeypatch):
    """Every substitution at every position (and the wild type itself): one forward per
    position, synonymous codes score exactly 0, each score is the recipe's matrix entry."""
    ours, ref = fair
    wt = WT[:30]
    mutants = [f"{a}{i + 1}{b}" for i, a in enumerate(wt) for b in AA] + ["WT", f"{wt[0]}1{wt[0]}:{wt[5]}6{wt[5]}"]
    shapes = counting(ours, monkeypatch)
    result = score_mutants(ours, wt, mutants, batch_tokens=32 * 10, precision="fp32")
    assert sum(b for b, _ in shapes) == result.forwards == 30  # one per distinct position
    assert all(b * t <= 320 for b, t in shapes) and len(shapes) == result.batches == 3
    synonymous = [m == "WT" or all(s[0] == s[-1] for s in m.split(":")) for m in mutants]
    for m, score, same in zip(mutants, result.scores, synonymous):
        if same:
            assert abs(score) < 1e-12, m

    def recipe(logits_fn):
        token_probs = recipe_token_probs(logits_fn, alphabet, wt, "masked-marginals")
        return [label_row(m, wt, token_probs, alphabet) for m, same in zip(mutants, synonymous) if not same]

    ref.agrees([x for x, same in zip(result.scores, synonymous) if not same], recipe, "the scan")


def test_reverse_mutation_on_the_mutant_is_the_negative(fair):
    # Masking position i hides the residue there: X->Y on the wild type and Y->X on the single
    # mutant read the same masked input, so the scores are exact negatives.
    ours = fair[0]
    assert WT[4] == "N" and WT[11] == "L"
    for there, back in (("N5W", "W5N"), ("L12P", "P12L")):
        forward = score_mutants(ours, WT, [there], precision="fp32").scores[0]
        reverse = score_mutants(ours, mutate(WT, parse_mutant(there)), [back], precision="fp32").scores[0]
        assert forward == -reverse and abs(forward) > 1e-3


def test_pll_shares_forwards(alphabet, fair, monkeypatch):
    """19 substitutions at position 7 and the wild type: every variant masked at 7 is the wild
    type masked at 7 (one row for 20 sequences), every other masked position is its own."""
    ours, ref = fair
    wt = WT[:20]
    mutants = ["WT"] + [f"{wt[6]}7{b}" for b in AA if b != wt[6]] + ["WT"]
    shapes = counting(ours, monkeypatch)
    result = score_mutants(ours, wt, mutants, "pll", precision="fp32")
    assert sum(b for b, _ in shapes) == result.forwards == 20 + 19 * 19
    seqs = [mutate(wt, parse_mutant(m)) for m in mutants[:2]]
    ref.agrees(result.scores[:2], lambda fn: [recipe_pll(fn, alphabet, s) for s in seqs], "pll")
    assert result.scores[0] == result.scores[-1]


def test_batch_budget_does_not_change_scores(fair):
    ours = fair[0]
    mutants = some_mutants(WT, seed=3, n=30)
    a = score_mutants(ours, WT, mutants, batch_tokens=42, precision="fp32")
    b = score_mutants(ours, WT, mutants, batch_tokens=100_000, precision="fp32")
    assert a.batches == a.forwards and b.batches == 1
    # the same forwards in other batch shapes: rounding only. Each score is within ~10 eps32 x max|score|
    # of float64 (the recipe tests above), so two runs are within twice that; 64 leaves room for other machines
    oracles.assert_fp32_close(a.scores, b.scores, 64, what="batch_tokens 42 vs 100000")


# ---------------------------------------------------------------- long proteins


LONG = protein(50, seed=12)
LONG_MUTANTS = ["M1A", "K2R", "A10G:C40W", "Y25F", "H26D", "P49L:S50T", "Q30E:F35V"]


def long_mutants(seq):
    """LONG_MUTANTS' positions and new letters with the protein's own wild-type letters."""
    return [":".join(f"{seq[int(s[1:-1]) - 1]}{s[1:-1]}{s[-1]}" for s in m.split(":")) for m in LONG_MUTANTS]


@pytest.mark.parametrize("method", ["masked-marginal", "wt-marginal"])
def test_long_protein_marginals_use_the_optimal_window(alphabet, fair, method):
    ours, ref = fair
    mutants = long_mutants(LONG)

    def recipe(logits_fn):
        if method == "masked-marginal":  # ProteinGym's masked-marginals with --scoring-window optimal
            token_probs = recipe_token_probs(logits_fn, alphabet, LONG, "masked-marginals", model_window=22)
        else:
            token_probs = windowed_wt_probs(logits_fn, alphabet, LONG, model_window=22)
        return [label_row(m, LONG, token_probs, alphabet) for m in mutants]

    result = score_mutants(ours, LONG, mutants, method, max_residues=20, precision="fp32")
    ref.agrees(result.scores, recipe, method)
    assert result.window == "optimal" and result.window_tokens == 22
    whole = score_mutants(ours, LONG, mutants, method, max_residues=None, precision="fp32")
    assert whole.window == "none" and max(abs(a - b) for a, b in zip(result.scores, whole.scores)) > 1e-3


def test_long_protein_pll(alphabet, fair):
    ours, ref = fair
    seqs = [LONG, protein(23, seed=13), protein(12, seed=14)]
    result = score_sequences(ours, seqs, max_residues=20, precision="fp32")
    ref.agrees(result.scores, lambda fn: [recipe_pll(fn, alphabet, s, model_window=22) for s in seqs], "pll")
    assert result.window == "optimal"


def test_under_the_limit_is_unwindowed(fair):
    ours = fair[0]
    mutants = long_mutants(LONG)
    for method in ("masked-marginal", "wt-marginal", "pll"):
        at_limit = score_mutants(ours, LONG, mutants, method, max_residues=50, precision="fp32")
        unlimited = score_mutants(ours, LONG, mutants, method, max_residues=None, precision="fp32")
        assert at_limit.scores == unlimited.scores and at_limit.window == unlimited.window == "none"


def test_2000_residue_protein_scores(alphabet, fair):
    ours, ref = fair
    seq = protein(2000, seed=15)
    mutants = [f"{seq[p - 1]}{p}A" for p in (1, 51, 52, 1000, 1950, 2000)] + [f"{seq[9]}10W:{seq[1499]}1500Y"]
    result = score_mutants(ours, seq, mutants, max_residues=100, precision="fp32")
    batch_tokens = encode(alphabet, seq)

    @torch.no_grad()
    def recipe(logits_fn):  # ProteinGym's optimal-window masked marginal
        scores = []
        for m in mutants:
            expected = 0.0
            for s in m.split(":"):
                i = int(s[1:-1])
                start, end = proteingym_optimal_window(i, 2002, 102)
                masked = batch_tokens.clone()
                masked[0, i] = alphabet.mask_idx
                logp = torch.log_softmax(logits_fn(masked[:, start:end]), -1)[0, i - start]
                expected += (logp[alphabet.get_idx(s[-1])] - logp[alphabet.get_idx(s[0])]).item()
            scores.append(expected)
        return scores

    ref.agrees(result.scores, recipe, "masked-marginal")
    assert result.forwards == 8 and result.window == "optimal"
    wt_marginal = score_mutants(ours, seq, mutants, "wt-marginal", max_residues=100, precision="fp32")
    assert wt_marginal.forwards == 6  # positions 1, 10 and 51 share the first window [0, 102)
    assert all(math.isfinite(x) for x in wt_marginal.scores)


def test_2000_residues_at_the_real_limit(alphabet, fair):
    ours, ref = fair
    seq = protein(2000, seed=16)
    mutants = [f"{seq[p - 1]}{p}G" for p in (3, 700, 1500, 1999)]
    token_window = {3: (0, 1024), 700: (188, 1212), 1500: (978, 2002), 1999: (978, 2002)}  # by hand
    result = score_mutants(ours, seq, mutants, precision="fp32")  # max_residues 1022
    batch_tokens = encode(alphabet, seq)

    @torch.no_grad()
    def recipe(logits_fn):
        scores = []
        for m in mutants:
            i = int(m[1:-1])
            start, end = token_window[i]
            masked = batch_tokens.clone()
            masked[0, i] = alphabet.mask_idx
            logp = torch.log_softmax(logits_fn(masked[:, start:end]), -1)[0, i - start]
            scores.append((logp[alphabet.get_idx("G")] - logp[alphabet.get_idx(m[0])]).item())
        return scores

    ref.agrees(result.scores, recipe, "masked-marginal")
    assert result.window_tokens == 1024 and result.window == "optimal"


# ---------------------------------------------------------------- mutant codes and files


@pytest.mark.parametrize("code, message", [
    ("", "empty mutant"),
    ("A24", r"'A24' in 'A24' is not a substitution like A24G"),
    ("A24G;K46R", r"'A24G;K46R' in 'A24G;K46R' is not a substitution"),
    ("A24G:", r"'' in 'A24G:' is not a substitution"),
    ("J24G", r"'J24G': 'J' is not an amino-acid letter"),
    ("A24G:A24V", "'A24G:A24V' substitutes position 24 twice"),
])
def test_bad_mutant_codes(code, message):
    with pytest.raises(DataError, match=rf"^here: {message}"):
        parse_mutant(code, where="here")


def test_mutant_codes():
    assert parse_mutant(" K46R:a24g ") == (Substitution("A", 24, "G"), Substitution("K", 46, "R"))
    assert parse_mutant("_wt") == parse_mutant("WT") == ()
    assert parse_mutant("K11A", "MKV", offset=10) == (Substitution("K", 11, "A"),)  # M is residue 10
    assert str(Substitution("A", 24, "G")) == "A24G"


def test_wild_type_mismatch_names_the_item(fair):
    ours = fair[0]
    assert WT[2] == "L"
    with pytest.raises(DataError, match=r"^<memory>, item 1: A3G does not match the wild type, which has L at "
                                        r"position 3, not A$"):
        score_mutants(ours, WT, [f"{WT[0]}1A", "A3G"])
    with pytest.raises(DataError, match=r"item 0: .41A is outside the wild type \(positions 1..40\)"):
        score_mutants(ours, WT, [f"{WT[0]}41A"])
    with pytest.raises(DataError, match="unknown scoring method 'ppl'"):
        score_mutants(ours, WT, ["WT"], "ppl")
    with pytest.raises(DataError, match="unknown precision"):
        score_mutants(ours, WT, [f"{WT[0]}1A"], precision="fp64")


def write_dms(path, rows, header=("mutant", "mutated_sequence", "DMS_score")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def dms_rows(wt, mutants, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(m, mutate(wt, parse_mutant(m)), f"{float(torch.randn(1, generator=g)):.4f}") for m in mutants]


def test_dms_csv_in_one_call(tmp_path, alphabet, fair, fair_tiny):
    ours, ref = fair
    mutants = some_mutants(WT, seed=4, n=20)
    rows = dms_rows(WT, mutants)
    path = write_dms(tmp_path / "dms.csv", rows)
    dms, result = score_dms(fair_tiny, path, precision="fp32")  # wild type derived from row 2
    assert dms.wildtype == WT
    def recipe(logits_fn):
        token_probs = recipe_token_probs(logits_fn, alphabet, WT, "masked-marginals")
        return [label_row(m, WT, token_probs, alphabet) for m in mutants]

    expected = ref.agrees(result.scores, recipe, "masked-marginal")
    assert result.spearman == pytest.approx(spearmanr(expected, [float(r[2]) for r in rows]).statistic, abs=1e-6)
    out = dms.with_scores(result)
    assert list(out[0]) == ["mutant", "mutated_sequence", "DMS_score", "masked-marginal"]
    assert [r["mutant"] for r in out] == mutants
    _, same = score_dms(ours, path, wildtype=WT.lower(), precision="fp32")
    assert same.scores == result.scores


def test_dms_pll(tmp_path, alphabet, fair):
    ours, ref = fair
    mutants = some_mutants(WT[:15], seed=5, n=4)
    path = write_dms(tmp_path / "dms.csv", [(m,) for m in mutants], header=("mutant",))
    dms, result = score_dms(ours, path, "pll", wildtype=WT[:15], precision="fp32")
    ref.agrees(result.scores, lambda fn: [recipe_pll(fn, alphabet, mutate(WT[:15], parse_mutant(m))) for m in mutants],
               "pll")
    assert result.spearman is None
    assert list(dms.with_scores(result)[0]) == ["mutant", "pll", "pseudo_perplexity"]


def test_bad_dms_files(tmp_path, fair):
    ours = fair[0]
    bad_letter = "A" if WT[2] != "A" else "C"
    rows = dms_rows(WT, [f"{WT[0]}1A", f"{WT[1]}2A", f"{bad_letter}3G"])
    rows[2] = (rows[2][0], mutate(WT, parse_mutant(f"{WT[2]}3G")), rows[2][2])
    path = write_dms(tmp_path / "a.csv", rows)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}, row 4, column 'mutant': {bad_letter}3G does not match the wild "
                                        rf"type, which has {WT[2]} at position 3, not {bad_letter}$"):
        score_dms(ours, path)
    rows = dms_rows(WT, [f"{WT[0]}1A", f"{WT[1]}2A"])
    rows[1] = (rows[1][0], rows[1][1][:-1] + "W", rows[1][2])  # the wild type ends in M
    with pytest.raises(DataError, match=r"row 3, column 'mutated_sequence': not the wild type with '.2A' applied"):
        read_dms(write_dms(tmp_path / "b.csv", rows))
    rows = dms_rows(WT, [f"{WT[0]}1A", f"{WT[1]}2A"])
    rows[0] = (rows[0][0], rows[0][1], "n/a")
    with pytest.raises(DataError, match=r"row 2, column 'DMS_score': 'n/a' is not a number"):
        read_dms(write_dms(tmp_path / "c.csv", rows))
    with pytest.raises(DataError, match="no wild type given, and no column 'mutated_sequence'"):
        read_dms(write_dms(tmp_path / "d.csv", [("A1G",)], header=("mutant",)))
    with pytest.raises(DataError, match="no column 'mutant'"):
        read_dms(write_dms(tmp_path / "e.csv", [("A1G",)], header=("variant",)))
    dms, result = score_dms(ours, write_dms(tmp_path / "f.csv", dms_rows(WT, ["WT"])))
    with pytest.raises(DataError, match="already has a column 'DMS_score'"):
        dms.with_scores(result, column="DMS_score")


def test_plan_counts_forwards_without_running():
    # pll of a full scan of 12 residues (228 single mutants): masking the mutated position gives
    # the wild type masked there (one row per position, 12), every other position is the
    # variant's own (228 * 11)
    wt = WT[:12]
    scan = [f"{a}{i + 1}{b}" for i, a in enumerate(wt) for b in AA if b != a]
    assert plan_mutants(wt, scan, "pll").forwards == 12 + 228 * 11
    assert plan_mutants(wt, scan, "masked-marginal").forwards == 12
    assert plan_mutants(wt, scan, "wt-marginal").forwards == 1
    assert plan_mutants(wt, ["WT"], "masked-marginal").forwards == 0


def test_model_without_lm_head_is_refused():
    from esm2lite import ESM2Config

    if "lm_head" not in getattr(ESM2Config, "__dataclass_fields__", {}):
        pytest.skip("this ESM2Config has no lm_head option")
    headless = ESM2(ESM2Config(num_layers=1, d_model=64, num_heads=4, ffn_dim=256, lm_head=False))
    with pytest.raises(CheckpointError, match="^scoring needs the masked-LM head"):
        score_mutants(headless, WT, [f"{WT[0]}1A"])


def test_huge_cells_make_short_messages():
    with pytest.raises(DataError) as e:
        parse_mutant("A1G:" + "x" * 100_000)
    assert len(str(e.value)) < 300
