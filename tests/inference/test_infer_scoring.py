"""infer.py --score and long proteins, through the real command line (a subprocess for the issue's
exact command, cli.main in this process for the rest).

Oracles: the published recipes (fair-esm's predict.py / ProteinGym's label_row and optimal window,
transcribed in test_scoring.py / test_windows.py) run on transformers' or fair-esm's model with the
same random weights; the library functions the CLI wires up (score_dms, score_mutants,
score_sequences, embed_windowed), which test_scoring.py and test_windows.py test against those
recipes; scipy's spearmanr; and plain forwards of hand-cut windows."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from scipy.stats import spearmanr

import oracles
from esm2lite.inference.dms import score_dms
from esm2lite.inference.scoring import score_mutants, score_sequences
from esm2lite.inference.windows import embed_windowed
from test_infer import INFER, assert_one_line_error, infer_in_process, load_cli
from test_scoring import Reference, encode, label_row, recipe_token_probs, some_mutants
from test_windows import fair_hidden, fair_tokens, protein
from esm2lite import load_pretrained

WT = protein(60, seed=31)


@pytest.fixture(scope="module")
def cli():
    return load_cli()


@pytest.fixture(scope="module")
def alphabet():
    import esm

    return esm.data.Alphabet.from_architecture("ESM-1b")


@pytest.fixture(scope="module")
def ours(fair_tiny):
    return load_pretrained(fair_tiny).eval()


def dms_file(path, wt=WT, seed=3, n=15):
    """A ProteinGym-style scan of `wt`: mutant, mutated_sequence, DMS_score and a note column."""
    from esm2lite.inference.scoring import mutate, parse_mutant

    mutants = some_mutants(wt, seed, n) + ["WT"]
    g = torch.Generator().manual_seed(seed)
    rows = [[m, mutate(wt, parse_mutant(m)), f"{float(torch.randn(1, generator=g)):.4f}", f"note {k}"]
            for k, m in enumerate(mutants)]
    return oracles.write_rows(path, ["mutant", "mutated_sequence", "DMS_score", "note"], rows)


def metrics_of(output):
    with open(os.path.splitext(str(output))[0] + ".metrics.json") as f:
        return json.load(f)


# ---------------------------------------------------------------- the issue's command


@pytest.mark.slow
def test_the_issues_command_scores_a_scan_like_the_recipe(tmp_path, hf_tiny, alphabet, forkrun):
    """`python infer.py --base CKPT --input dms.csv --wildtype SEQ --score masked-marginal --output s.csv`:
    every input column kept, the scores equal the published recipe on transformers' model with the
    same weights and the library's score_dms, Spearman equals scipy's."""
    src, out = dms_file(tmp_path / "dms.csv"), tmp_path / "s.csv"
    r = forkrun.run([INFER, "--base", hf_tiny, "--input", src, "--wildtype", WT, "--score", "masked-marginal",
                     "--output", out])
    assert r.returncode == 0, r.stderr[-2000:]
    rows, given = oracles.read_rows(out), oracles.read_rows(src)
    assert list(rows[0]) == ["mutant", "mutated_sequence", "DMS_score", "note", "masked-marginal", "window"]
    assert [{k: row[k] for k in given[0]} for row in rows] == given  # every input column, as written
    scores = [float(row["masked-marginal"]) for row in rows]

    def recipe(logits_fn):
        token_probs = recipe_token_probs(logits_fn, alphabet, WT, "masked-marginals")
        return [0.0 if m == "WT" else label_row(m, WT, token_probs, alphabet) for m in (g["mutant"] for g in given)]

    Reference(oracles.load_hf(hf_tiny), lambda m, t: m(input_ids=t).logits).agrees(scores, recipe, "masked-marginal")
    assert scores[-1] == 0.0  # the wild type itself
    _, library = score_dms(load_pretrained(hf_tiny), src, "masked-marginal", wildtype=WT)
    # the same computation in another process, written with repr(): equal here; 16 eps32 x max|score|
    # admits only a reduction split otherwise by another thread count
    oracles.assert_fp32_close(scores, library.scores, 16, what="infer.py vs score_dms")

    rho = spearmanr(scores, [float(g["DMS_score"]) for g in given]).statistic
    summary = metrics_of(out)
    assert summary["spearman"] == pytest.approx(rho, abs=1e-12)
    assert f"Spearman vs DMS_score: {rho:.4f}" in r.stdout
    assert {row["window"] for row in rows} == {"none"} and summary["window"] == "none"
    assert summary["forwards"] == library.forwards and summary["variants"] == len(given)


@pytest.mark.parametrize("method", ["masked-marginal", "wt-marginal", "pll"])
def test_other_methods_on_a_scan_equal_the_library(tmp_path, fair_tiny, ours, cli, capsys, method):
    src, out = dms_file(tmp_path / "dms.csv", seed=4, n=8), tmp_path / "s.csv"
    code, stdout, err = infer_in_process(cli, capsys, "--base", fair_tiny, "--input", src, "--wildtype", WT,
                                         "--score", method, "--output", out)
    assert code == 0, err
    rows = oracles.read_rows(out)
    expected = score_mutants(ours, WT, [r["mutant"] for r in rows], method)
    assert [float(r[method]) for r in rows] == pytest.approx(expected.scores, abs=1e-9)
    if method == "pll":
        assert [float(r["pseudo_perplexity"]) for r in rows] == pytest.approx(expected.pseudo_perplexity, rel=1e-9)
    assert metrics_of(out)["method"] == method and f"by {method}" in stdout


def test_wild_type_from_a_fasta_file_or_from_the_mutated_sequences(tmp_path, fair_tiny, cli, capsys):
    src = dms_file(tmp_path / "dms.csv", seed=5, n=6)
    (tmp_path / "wt.fasta").write_text(">wild type\n" + WT[:30] + "\n" + WT[30:] + "\n")
    outs = []
    for extra in (["--wildtype", WT], ["--wildtype", tmp_path / "wt.fasta"], []):
        outs.append(tmp_path / f"s{len(outs)}.csv")
        code, _, err = infer_in_process(cli, capsys, "--base", fair_tiny, "--input", src, "--score",
                                        "masked-marginal", "--output", outs[-1], *extra)
        assert code == 0, err
    assert oracles.read_rows(outs[0]) == oracles.read_rows(outs[1]) == oracles.read_rows(outs[2])


def test_pll_of_plain_sequences(tmp_path, fair_tiny, ours, cli, capsys):
    seqs = [protein(n, seed=40 + n) for n in (12, 30, 7)]
    fasta, table = tmp_path / "in.fasta", tmp_path / "in.csv"
    fasta.write_text("".join(f">s{k} some words\n{s}\n" for k, s in enumerate(seqs)))
    oracles.write_rows(table, ["name", "sequence", "DMS_score"], [[f"s{k}", s, k * k - 3 * k] for k, s in enumerate(seqs)])
    expected = score_sequences(ours, seqs)
    for src, columns in ((fasta, ["id", "sequence"]), (table, ["name", "sequence", "DMS_score"])):
        out = tmp_path / f"{src.stem}{src.suffix}.pll.csv"
        code, _, err = infer_in_process(cli, capsys, "--base", fair_tiny, "--input", src, "--score", "pll",
                                        "--output", out)
        assert code == 0, err
        rows = oracles.read_rows(out)
        assert list(rows[0]) == columns + ["pll", "pseudo_perplexity", "window"]
        assert [r["sequence"] for r in rows] == seqs
        assert [float(r["pll"]) for r in rows] == pytest.approx(expected.scores, abs=1e-9)
    assert metrics_of(tmp_path / "in.csv.pll.csv")["spearman"] == pytest.approx(
        spearmanr(expected.scores, [k * k - 3 * k for k in range(3)]).statistic, abs=1e-12)
    assert metrics_of(tmp_path / "in.fasta.pll.csv")["spearman"] is None


# ---------------------------------------------------------------- long proteins


def test_2000_residues_score_in_optimal_windows_at_the_real_limit(tmp_path, fair_tiny, ours, alphabet, cli, capsys):
    """Default --max-residues 1022: windows of 1024 tokens, chosen by ProteinGym's rule (by hand below)."""
    seq = protein(2000, seed=8)
    mutants = [f"{seq[p - 1]}{p}G" for p in (3, 700, 1500)] + [f"{seq[2]}3A:{seq[1998]}1999W"]
    src, out = oracles.write_rows(tmp_path / "long.csv", ["mutant"], [[m] for m in mutants]), tmp_path / "s.csv"
    code, stdout, err = infer_in_process(cli, capsys, "--base", fair_tiny, "--input", src, "--wildtype", seq,
                                         "--score", "masked-marginal", "--output", out)
    assert code == 0, err
    rows = oracles.read_rows(out)
    tokens = encode(alphabet, seq)
    window = {3: (0, 1024), 700: (188, 1212), 1500: (978, 2002), 1999: (978, 2002)}  # by hand

    @torch.no_grad()
    def recipe(logits_fn):
        def term(sub):  # the recipe's masked marginal of one substitution, in its window
            i, (start, end) = int(sub[1:-1]), window[int(sub[1:-1])]
            masked = tokens.clone()
            masked[0, i] = alphabet.mask_idx
            logp = torch.log_softmax(logits_fn(masked[:, start:end]), -1)[0, i - start]
            return (logp[alphabet.get_idx(sub[-1])] - logp[alphabet.get_idx(sub[0])]).item()
        return [sum(term(s) for s in row["mutant"].split(":")) for row in rows]

    Reference(oracles.load_fair_esm(fair_tiny), lambda m, t: m(t)["logits"]).agrees(
        [float(row["masked-marginal"]) for row in rows], recipe, "masked-marginal")
    assert {r["window"] for r in rows} == {"optimal"}
    summary = metrics_of(out)
    assert summary["window"] == "optimal" and summary["window_tokens"] == 1024 and summary["forwards"] == 4
    assert "window optimal" in stdout


def test_pll_windows_only_the_rows_over_the_limit(tmp_path, fair_tiny, ours, cli, capsys):
    """--max-residues 20: a 20-residue sequence runs unwindowed (exactly the unlimited scores), a
    21-residue one in windows (the library's windowed scores, not the unlimited ones)."""
    seqs = [protein(20, seed=9), protein(21, seed=10)]
    src, out = oracles.write_rows(tmp_path / "in.csv", ["sequence"], [[s] for s in seqs]), tmp_path / "s.csv"
    code, _, err = infer_in_process(cli, capsys, "--base", fair_tiny, "--input", src, "--score", "pll",
                                    "--max-residues", "20", "--output", out)
    assert code == 0, err
    rows = oracles.read_rows(out)
    assert [r["window"] for r in rows] == ["none", "optimal"]
    unlimited, windowed = score_sequences(ours, seqs, max_residues=None), score_sequences(ours, seqs, max_residues=20)
    assert float(rows[0]["pll"]) == unlimited.scores[0]  # exactly the unwindowed result
    assert float(rows[1]["pll"]) == pytest.approx(windowed.scores[1], abs=1e-9)
    assert abs(windowed.scores[1] - unlimited.scores[1]) > 1e-3  # the window mattered


def read_embeddings(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_2000_residues_embed_without_truncate_at_the_real_limit(tmp_path, fair_tiny, cli, capsys):
    seq = protein(2000, seed=12)
    src, emb = tmp_path / "in.fasta", tmp_path / "emb.safetensors"
    src.write_text(f">long\n{seq}\n>short\n{seq[:40]}\n")
    code, stdout, err = infer_in_process(cli, capsys, "--base", fair_tiny, "--input", src, "--embeddings", emb,
                                         "--per-residue")
    assert code == 0, err
    tensors, meta = read_embeddings(emb)
    windows = [(0, 1024), (489, 1513), (978, 2002)]
    assert json.loads(meta["windows"]) == {"long": [list(w) for w in windows]}
    ref = oracles.load_fair_esm(fair_tiny)
    refs = (ref, oracles.float64_copy(ref))  # fair-esm as it runs, and in float64: the yardstick of fp32
    tokens = fair_tokens(seq)
    parts = {r: [fair_hidden(r, tokens[s:e], [2])[2] for s, e in windows] for r in refs}  # the hand-cut windows
    h = tensors["per_residue/2/long"]  # residue p (1-based) is token p
    assert h.shape == (2000, 64)

    def agrees(ours, expected, what):
        oracles.assert_fp32_agrees(ours, *(expected(parts[r]) for r in refs), what=what)

    agrees(h[0:488], lambda p: p[0][1:489], "tokens 1..488: first window only")
    agrees(h[999], lambda p: (p[0][1000] + p[1][1000 - 489] + p[2][1000 - 978]) / 3, "token 1000")
    agrees(h[1512:], lambda p: p[2][1513 - 978: 2001 - 978], "tokens 1513..2000: last window only")
    # two fp32 means of the same 2000 rows (equal here): summed in another order they may differ by
    # ~sqrt(2000) roundings of values of the mean's size (hidden states are far from zero-mean)
    oracles.assert_fp32_close(tensors["mean/2/long"], h.mean(0), 64, what="mean/2/long")
    short = [fair_hidden(r, fair_tokens(seq[:40]), [2])[2][1:41] for r in refs]  # under the limit: the plain forward
    oracles.assert_fp32_agrees(tensors["per_residue/2/short"], *short, what="per_residue/2/short")
    assert "1 sequence over 1022 residues embedded in overlapping windows" in stdout


def test_embeddings_over_a_small_limit_equal_the_library_and_under_it_are_unwindowed(tmp_path, fair_tiny, ours,
                                                                                    cli, capsys):
    seqs = [protein(250, seed=13), protein(30, seed=14)]
    src, emb = tmp_path / "in.fasta", tmp_path / "emb.safetensors"
    src.write_text("".join(f">p{k}\n{s}\n" for k, s in enumerate(seqs)))
    code, _, err = infer_in_process(cli, capsys, "--base", fair_tiny, "--input", src, "--embeddings", emb,
                                    "--per-residue", "--layers", "1", "2", "--max-residues", "30")
    assert code == 0, err
    tensors, meta = read_embeddings(emb)
    lib = embed_windowed(ours, seqs[:1], layers=[1, 2], max_residues=30)
    assert json.loads(meta["windows"]) == {"p0": [list(w) for w in lib.windows[0]]} and len(lib.windows[0]) == 15
    tokens = fair_tokens(seqs[1])
    with torch.no_grad():
        plain = ours(tokens[None], repr_layers=[1, 2], logits=False)["hidden_states"]
    for layer in (1, 2):
        assert torch.equal(tensors[f"per_residue/{layer}/p0"], lib.per_residue(0, layer))
        assert torch.equal(tensors[f"per_residue/{layer}/p1"], plain[layer][0, 1:-1])  # exactly unwindowed


def test_truncate_keeps_cutting_embeddings_and_says_so(tmp_path, fair_tiny, ours, cli, capsys):
    seq = protein(50, seed=15)
    src, emb = tmp_path / "in.fasta", tmp_path / "emb.safetensors"
    src.write_text(f">p\n{seq}\n")
    code, stdout, err = infer_in_process(cli, capsys, "--base", fair_tiny, "--input", src, "--embeddings", emb,
                                         "--per-residue", "--max-residues", "20", "--truncate")
    assert code == 0, err
    tensors, meta = read_embeddings(emb)
    assert "windows" not in meta and json.loads(meta["residues_scored"]) == {"p": 20}
    with torch.no_grad():
        plain = ours(fair_tokens(seq[:20])[None], repr_layers=[2], logits=False)["hidden_states"][2]
    assert torch.equal(tensors["per_residue/2/p"], plain[0, 1:-1])
    assert "cut to 20 residues" in stdout


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def encoder_only(tmp_path_factory, hf_tiny):
    return oracles.resave_as(hf_tiny, tmp_path_factory.mktemp("encoder_only"), "EsmModel")


def score_cases(tmp, fair_tiny, encoder_only):
    """(name, argv, substring of the one-line error); every case writes to tmp/out.csv."""
    dms = dms_file(tmp / "dms.csv", seed=6, n=6)
    lines = (tmp / "dms.csv").read_text().splitlines()
    first = lines[1].split(",")[0].split(":")[0]
    lines[3] = "X" + lines[3][1:] if not lines[3].startswith("X") else "A" + lines[3][1:]  # a wrong wild-type letter
    (tmp / "mismatch.csv").write_text("\n".join(lines) + "\n")
    oracles.write_rows(tmp / "bad_score.csv", ["mutant", "DMS_score"], [[first, "0.5"], [first, "high"]])
    oracles.write_rows(tmp / "plain.csv", ["sequence"], [["MKTAYIAKQR"]])
    oracles.write_rows(tmp / "clash.csv", ["mutant", "masked-marginal"], [[first, "1"]])
    (tmp / "two.fasta").write_text(f">a\n{WT}\n>b\n{WT}\n")
    base = ["--base", fair_tiny]
    score = [*base, "--input", dms, "--wildtype", WT, "--score", "masked-marginal"]
    return [
        ("wild-type mismatch", [*base, "--input", tmp / "mismatch.csv", "--wildtype", WT, "--score", "wt-marginal"],
         "mismatch.csv, row 4, column 'mutant':"),
        ("not a number", [*base, "--input", tmp / "bad_score.csv", "--wildtype", WT, "--score", "masked-marginal"],
         "bad_score.csv, row 3, column 'DMS_score': 'high' is not a number"),
        ("marginal of plain sequences", [*base, "--input", tmp / "plain.csv", "--score", "masked-marginal"],
         "no 'mutant' column"),
        ("wild type for plain sequences", [*base, "--input", tmp / "plain.csv", "--score", "pll", "--wildtype", WT],
         "--wildtype has no use"),
        ("column clash", [*base, "--input", tmp / "clash.csv", "--wildtype", WT, "--score", "masked-marginal"],
         "has a column 'masked-marginal'"),
        ("two wild types", [*base, "--input", dms, "--wildtype", tmp / "two.fasta", "--score", "pll"],
         "one record, it has 2"),
        ("missing wild-type file", [*base, "--input", dms, "--wildtype", tmp / "nope.fasta", "--score", "pll"],
         "no such file"),
        ("missing wild-type file name", [*base, "--input", dms, "--wildtype", "wt.txt", "--score", "pll"],
         "'wt.txt': no such file"),
        ("no wild type at all", [*base, "--input", tmp / "bad_score.csv", "--score", "masked-marginal"],
         "give the wild type"),
        ("no LM head", ["--base", encoder_only, "--input", dms, "--wildtype", WT, "--score", "pll"],
         "has no masked-LM head"),
        ("fine-tuned checkpoint", ["--checkpoint", tmp, "--input", dms, "--score", "pll"], "give --base"),
        ("embeddings with score", [*score, "--embeddings", tmp / "e.safetensors"], "--embeddings is not used"),
        ("truncate with score", [*score, "--truncate"], "--truncate is not used"),
        ("wild type without score", [*base, "--input", dms, "--wildtype", WT, "--embeddings", tmp / "e.st"],
         "--wildtype is only used with --score"),
        ("offset without score", [*base, "--input", dms, "--offset", "3", "--embeddings", tmp / "e.st"],
         "--offset is only used"),
        ("unknown method", [*base, "--input", dms, "--score", "masked"], "invalid choice"),
        ("output is the input", [*score, "--output", dms], "is also the input"),
    ]


def test_bad_scoring_input_gives_one_line_and_no_output(tmp_path, fair_tiny, encoder_only, cli, capsys):
    out = tmp_path / "out.csv"
    for name, argv, match in score_cases(tmp_path, fair_tiny, encoder_only):
        argv = argv if "--output" in argv else [*argv, "--output", out]
        code, _, err = infer_in_process(cli, capsys, *argv)
        assert code == 2, (name, err)
        assert_one_line_error(code, err, out, tmp_path / "out.metrics.json", tmp_path / "e.safetensors", match=match)


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_scores_and_summary_follow_the_umask(tmp_path, fair_tiny, cli, capsys, mask):
    src, out = dms_file(tmp_path / "dms.csv", seed=7, n=3), tmp_path / "s.csv"
    before = os.umask(mask)
    try:
        code, _, err = infer_in_process(cli, capsys, "--base", fair_tiny, "--input", src, "--wildtype", WT,
                                        "--score", "wt-marginal", "--output", out)
    finally:
        os.umask(before)
    assert code == 0, err
    for path in (out, tmp_path / "s.metrics.json"):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask, path
    assert sorted(os.listdir(tmp_path)) == ["dms.csv", "s.csv", "s.metrics.json"]  # no temporaries left


def test_help_names_every_new_option_and_each_default_once():
    from esm2lite.commands.infer import parser

    text = parser().format_help()
    for flag in ("--score", "--wildtype", "--mutant-column", "--dms-score-column", "--offset", "--residue-probs",
                 "--mask-column"):
        assert flag in text
    assert "(default: None)" not in text and "(default: False)" not in text
    helps = [a.help for a in parser()._actions]
    assert all(h is None or h.count("default") <= 1 for h in helps)


@pytest.mark.slow
def test_windowed_embeddings_under_torchrun_equal_one_process(tmp_path, fair_tiny):
    """Two ranks share the long proteins' windows and the short ones' batches; rank 0 writes the same
    tensors and metadata as one process."""
    seqs = [protein(n, seed=50 + n) for n in (90, 25, 140, 31, 75)]
    src = tmp_path / "in.fasta"
    src.write_text("".join(f">p{k}\n{s}\n" for k, s in enumerate(seqs)))
    args = ["--base", fair_tiny, "--input", str(src), "--max-residues", "30", "--per-residue"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(INFER), *args, "--embeddings", str(tmp_path / "one.st")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(INFER), *args, "--embeddings", str(tmp_path / "two.st")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    (a, meta_a), (b, meta_b) = read_embeddings(tmp_path / "one.st"), read_embeddings(tmp_path / "two.st")
    assert meta_a == meta_b and list(json.loads(meta_a["windows"])) == ["p0", "p2", "p3", "p4"]
    assert a.keys() == b.keys()
    for k in a:  # the same windows' forwards, batched otherwise on each rank: rounding only (equal here);
        # each within ~20 eps32 x max|h| of float64 (test_windows), 64 leaves room for other machines
        oracles.assert_fp32_close(b[k], a[k], 64, what=k)
