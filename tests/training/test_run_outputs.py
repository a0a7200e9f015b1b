"""What a finished run leaves for a person to read: predictions_valid.csv / predictions_test.csv
(best/'s predictions next to the true values, in input order, with ids), per-class metrics and the
confusion matrix in summary.json, and the PNGs in plots/.

Every expected value is recomputed here from the input files and the CSVs, with plain Python,
numpy and scipy, or from best/ loaded and run one sequence at a time; never by the code that wrote
them. The plots are checked as images (decoded, sized, not blank) and by what they draw."""

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

import oracles
from esm2lite.training import plot
from esm2lite.checkpoints.loading import load_model
from esm2lite.model.lora import LoRAConfig
from esm2lite.model.tokenizer import Tokenizer
from esm2lite.training.loop import TrainConfig, train_model

matplotlib_image = pytest.importorskip("matplotlib.image")
ROOT = Path(__file__).resolve().parents[2]
SPLITS = ["train"] * 3 + ["valid", "test"]  # row i's split: SPLITS[i % 5]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_dir(tmp_path_factory, name, header, rows, **cfg):
    """Train on one CSV with an id and a split column; the run directory and the input rows."""
    d = tmp_path_factory.mktemp(name)
    with open(d / "data.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    base = dict(csv=str(d / "data.csv"), out=str(d / "run"), steps=8, eval_every=4, log_every=2, batch_tokens=600,
                lr=5e-3, seed=2, device="cpu", lora=LoRAConfig(rank=4, alpha=8))
    train_model(TrainConfig(**{**base, **cfg}))
    return d / "run", [dict(zip(header, r), number=str(i + 1)) for i, r in enumerate(rows)]  # 1 = first data row


@pytest.fixture(scope="module")
def regression(tmp_path_factory, hf_tiny):
    seqs = oracles.random_sequences(60, 15, 45, seed=31, with_mask=False)
    rows = [[f"v{i}", s, (s.count("K") + s.count("R")) / len(s), SPLITS[i % 5]] for i, s in enumerate(seqs)]
    return run_dir(tmp_path_factory, "regression", ["id", "sequence", "target", "split"], rows, checkpoint=hf_tiny)


@pytest.fixture(scope="module")
def per_residue(tmp_path_factory, hf_tiny):
    g = np.random.default_rng(5)
    rows = []
    for i, s in enumerate(oracles.random_sequences(60, 15, 45, seed=32, with_mask=False)):
        labels = "".join("H" if c in "AELMQKRH" else "E" if c in "VIYFWTC" else "C" for c in s)
        rows.append([s, labels, "".join("0" if g.random() < 0.2 else "1" for _ in s), SPLITS[i % 5], f"p{i}"])
    return run_dir(tmp_path_factory, "per_residue", ["sequence", "ss", "resolved", "split", "id"], rows,
                   checkpoint=hf_tiny, task="token-classification", target_columns=("ss",), mask_column="resolved")


@pytest.fixture(scope="module")
def classification(tmp_path_factory, hf_tiny):
    seqs = oracles.random_sequences(75, 15, 45, seed=33, with_mask=False)
    rows = [[s, "basic" if s.count("K") + s.count("R") > s.count("D") + s.count("E") else "acidic", SPLITS[i % 5]]
            for i, s in enumerate(seqs)]
    return run_dir(tmp_path_factory, "classification", ["sequence", "charge", "split"], rows, checkpoint=hf_tiny,
                   task="classification", target_columns=("charge",), mode="full", lora=LoRAConfig())


def best_outputs(run, seqs):
    """best/ loaded from disk and run on one sequence at a time: per-sequence head outputs."""
    model = load_model(str(run / "best"))
    with torch.no_grad():
        return model, [model(Tokenizer().batch_encode([s]))[0] for s in seqs]


# ---------------------------------------------------------------- predictions CSVs and summary


def test_regression_predictions_sit_next_to_the_truth_in_input_order(regression):
    run, rows = regression
    summary = json.load(open(run / "summary.json"))
    for split in ("valid", "test"):
        want = [r for r in rows if r["split"] == split]
        got = read_csv(run / f"predictions_{split}.csv")
        assert list(got[0]) == ["id", "sequence", "target", "prediction"]
        assert [(g["id"], g["sequence"]) for g in got] == [(w["id"], w["sequence"]) for w in want]
        assert [float(g["target"]) for g in got] == [float(w["target"]) for w in want]
        model, outputs = best_outputs(run, [w["sequence"] for w in want])
        # training's batched evaluation vs best/ run alone: the same forward in other matrix shapes, rounding
        # only (two fp32 forwards of the tiny model, each a few eps32 x max|h| from float64: test_parity)
        oracles.assert_fp32_close([float(g["prediction"]) for g in got], [float(o[0]) for o in outputs], 64,
                                  what=f"predictions_{split}.csv vs best/ alone")
        pred, true = (np.array([float(g[k]) for g in got]) for k in ("prediction", "target"))
        metrics = summary[split]
        # summary.json's metrics are float64 functions of the fp32 outputs, the CSV holds them decoded in fp32:
        # one rounding of each prediction apart. Ranks: equal. pearson (scale 1), mse (relative): 64 eps32
        assert metrics["spearman"] == pytest.approx(scipy.stats.spearmanr(pred, true)[0], abs=1e-6)
        assert abs(metrics["pearson"] - scipy.stats.pearsonr(pred, true)[0]) <= 64 * oracles.EPS32
        assert abs(metrics["mse"] - np.mean((pred - true) ** 2)) <= 64 * oracles.EPS32 * metrics["mse"]
    assert summary["task"] == "regression" and summary["targets"] == ["target"] and "confusion_matrix" not in summary


def confusion(pairs, classes):
    counts = [[0] * len(classes) for _ in classes]
    for true, pred in pairs:
        counts[classes.index(true)][classes.index(pred)] += 1
    return counts


def per_class(counts, classes):
    out = {}
    for i, c in enumerate(classes):
        tp, predicted, support = counts[i][i], sum(row[i] for row in counts), sum(counts[i])
        out[c] = {"precision": tp / predicted if predicted else 0.0, "recall": tp / support if support else 0.0,
                  "f1": 2 * tp / (predicted + support) if predicted + support else 0.0, "support": support}
    return out


def assert_per_class(got, want):
    assert list(got) == list(want)
    for c in want:
        assert got[c] == pytest.approx(want[c]), c


def test_per_residue_predictions_confusion_matrix_and_per_class_metrics(per_residue):
    run, rows = per_residue
    summary = json.load(open(run / "summary.json"))
    classes = summary["confusion_matrix"]["classes"]
    assert classes == ["C", "E", "H"]
    for split in ("valid", "test"):
        want = [r for r in rows if r["split"] == split]
        got = read_csv(run / f"predictions_{split}.csv")
        assert list(got[0]) == ["id", "sequence", "ss", "mask", "prediction", "accuracy"]
        assert [(g["id"], g["ss"], g["mask"]) for g in got] == [(w["id"], w["ss"], w["resolved"]) for w in want]
        model, outputs = best_outputs(run, [w["sequence"] for w in want])
        assert [g["prediction"] for g in got] == ["".join(classes[int(c)] for c in o[1:-1].argmax(-1)) for o in outputs]
        pairs = [(t, p) for g in got for t, p, m in zip(g["ss"], g["prediction"], g["mask"]) if m == "1"]
        counts = confusion(pairs, classes)
        assert summary["confusion_matrix"][split] == counts
        assert counts != [list(col) for col in zip(*counts)]  # not symmetric: rows and columns are told apart
        assert_per_class(summary["per_class"][split], per_class(counts, classes))
        assert summary[split]["accuracy"] == pytest.approx(sum(t == p for t, p in pairs) / len(pairs))
        for g in got:
            labelled = [(t, p) for t, p, m in zip(g["ss"], g["prediction"], g["mask"]) if m == "1"]
            assert float(g["accuracy"]) == pytest.approx(sum(t == p for t, p in labelled) / len(labelled))


def test_classification_predictions_and_report(classification):
    run, rows = classification
    summary = json.load(open(run / "summary.json"))
    classes = summary["confusion_matrix"]["classes"]
    got = read_csv(run / "predictions_test.csv")
    want = [r for r in rows if r["split"] == "test"]
    assert list(got[0]) == ["id", "sequence", "charge", "prediction", "prob_acidic", "prob_basic"]
    assert [(g["id"], g["charge"]) for g in got] == [(w["number"], w["charge"]) for w in want]  # no id column
    _, outputs = best_outputs(run, [w["sequence"] for w in want])
    for g, o in zip(got, outputs):
        probs = o.softmax(-1)
        # training's batched evaluation vs best/ alone, both softmaxed in fp32 (probabilities <= 1): rounding only
        oracles.assert_fp32_close([float(g[f"prob_{c}"]) for c in classes], probs, 64, what="probabilities")
        assert g["prediction"] == classes[int(probs.argmax())]
    counts = confusion([(g["charge"], g["prediction"]) for g in got], classes)
    assert summary["confusion_matrix"]["test"] == counts
    assert_per_class(summary["per_class"]["test"], per_class(counts, classes))


# ---------------------------------------------------------------- plots


def decoded(png) -> np.ndarray:
    """A PNG file or bytes as an RGBA array; fails on anything that is not a PNG."""
    return matplotlib_image.imread(io.BytesIO(png) if isinstance(png, bytes) else png, format="png")


def assert_a_real_picture(path, width, height):
    image = decoded(path)
    assert image.shape[:2] == (height, width), image.shape
    rgb = image[..., :3].reshape(-1, 3)
    assert (rgb.min(1) < 0.9).mean() > 0.01  # more than a blank page: ink on at least 1% of it
    assert len(np.unique((rgb * 255).astype(int), axis=0)) > 20  # lines, text, colours


def assert_saved_is(path, fig):
    """The file holds exactly the figure inspected (rendered again here)."""
    buf = io.BytesIO()
    fig.savefig(buf)
    assert np.array_equal(decoded(path), decoded(buf.getvalue()))


def run_files(run):
    """metrics.jsonl, summary.json and the predictions CSVs, read here with json and csv."""
    log = [json.loads(line) for line in open(run / "metrics.jsonl")]
    preds = {s: read_csv(run / f"predictions_{s}.csv") for s in ("valid", "test")}
    return log, json.load(open(run / "summary.json")), preds


def test_regression_plots_draw_the_log_and_the_test_predictions(regression):
    run, _ = regression
    log, summary, preds = run_files(run)
    assert sorted(os.listdir(run / "plots")) == ["learning_curves.png", "predicted_vs_true.png"]
    figs = plot.figures(log, summary, preds)
    (loss, metric) = figs["learning_curves.png"].axes
    train = [(r["step"], r["loss"]) for r in log if r["split"] == "train"]
    valid = [r for r in log if r["split"] == "valid"]
    assert loss.lines[0].get_xydata().tolist() == [list(p) for p in train]
    assert loss.lines[1].get_xydata().tolist() == [[r["step"], r["loss"]] for r in valid]
    assert metric.lines[0].get_xydata().tolist() == [[r["step"], r["spearman"]] for r in valid]
    assert loss.lines[2].get_xdata()[0] == summary["best_step"]  # best/ marked
    (scatter,) = figs["predicted_vs_true.png"].axes
    points = [[float(r["target"]), float(r["prediction"])] for r in preds["test"]]
    assert scatter.collections[0].get_offsets().tolist() == points
    assert f"spearman {summary['test']['spearman']:.3f}" in scatter.get_title() and "test split" in scatter.get_title()
    assert_a_real_picture(run / "plots" / "learning_curves.png", 1000, 400)
    assert_a_real_picture(run / "plots" / "predicted_vs_true.png", 500, 500)
    for name, fig in figs.items():
        assert_saved_is(run / "plots" / name, fig)


def test_per_residue_confusion_plot_shows_the_counts(per_residue):
    run, _ = per_residue
    log, summary, preds = run_files(run)
    assert sorted(os.listdir(run / "plots")) == ["confusion_matrix.png", "learning_curves.png"]
    figs = plot.figures(log, summary, preds)
    (ax,) = figs["confusion_matrix.png"].axes
    classes = summary["confusion_matrix"]["classes"]
    pairs = [(t, p) for g in preds["test"] for t, p, m in zip(g["ss"], g["prediction"], g["mask"]) if m == "1"]
    assert ax.images[0].get_array().tolist() == confusion(pairs, classes)  # rows true, columns predicted
    assert [t.get_text() for t in ax.get_xticklabels()] == classes and ax.get_xlabel() == "predicted"
    texts = [int(t.get_text()) for t in ax.texts]
    assert texts == [n for row in confusion(pairs, classes) for n in row]
    assert_a_real_picture(run / "plots" / "confusion_matrix.png", 450, 400)
    for name, fig in figs.items():
        assert_saved_is(run / "plots" / name, fig)


@pytest.mark.slow
def test_plot_cli_and_a_run_without_matplotlib(regression, tmp_path, forkrun):
    """esm2lite-plot RUN draws the same files again; without matplotlib (an import that
    fails) train.py ends normally and names the extra to install, and the plot CLI says it in one line."""
    run, _ = regression
    before = {n: decoded(run / "plots" / n) for n in os.listdir(run / "plots")}
    r = forkrun.run(["-m", "esm2lite.commands.plot", run])
    assert r.returncode == 0 and "predicted_vs_true.png" in r.stdout, r.stderr
    assert all(np.array_equal(decoded(run / "plots" / n), a) for n, a in before.items())

    # a fresh interpreter (not forkrun's, which has matplotlib imported), with an import that fails
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named matplotlib (test shim)')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "shim")}
    data = Path(run).parent / "data.csv"
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--csv", str(data), "--checkpoint",
                        json.load(open(run / "config.json"))["checkpoint"], "--steps", "1", "--batch-tokens", "600",
                        "--device", "cpu", "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'pip install "esm2lite[plot]"' in r.stdout and f"esm2lite-plot {out}" in r.stdout
    assert not (out / "plots").exists() and (out / "predictions_test.csv").exists() and (out / "summary.json").exists()
    r = subprocess.run([sys.executable, "-m", "esm2lite.commands.plot", str(out)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and 'pip install "esm2lite[plot]"' in r.stderr


def test_per_residue_head_gives_a_sequence_the_same_logits_in_any_batch():
    """Padding after a sequence changes none of its logits: its last residues' conv window reaches
    past the end, where the padded batch must look like the sequence alone (zeros)."""
    from esm2lite.tasks import TASKS
    from esm2lite.model.tokenizer import pad_tokens

    torch.manual_seed(0)
    head = TASKS["token-classification"].head(8, 3, hidden=5).eval()
    for p in head.parameters():
        torch.nn.init.normal_(p)  # biases too: a bias alone at padding is what used to leak
    seqs = [Tokenizer().encode(s) for s in ("MKTAYIAKQR", "MKV", "MKTAYIAKQRQISFV")]
    tokens = pad_tokens(seqs)  # [3, 17]
    hidden = torch.randn(*tokens.shape, 8)
    batched = head(hidden, tokens)
    for i, ids in enumerate(seqs):
        alone = head(hidden[i: i + 1, : len(ids)], torch.tensor([ids]))
        # the same two convolutions (sums of 7 x 8 and 7 x 5 terms) in another batch shape: rounding only,
        # measured <= 2.2 eps32 x max|logit|; padding that leaked (a bias) would be of the values' size
        oracles.assert_fp32_close(batched[i, : len(ids)], alone[0], 16, what=f"sequence {i}")
