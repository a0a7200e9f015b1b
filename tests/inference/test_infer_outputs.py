"""What infer.py writes for a biologist (issue 14's inference items), through the real command line
(cli.main in this process): the input's other columns kept, the task's metrics when the input holds
the labels (equal to what training reported on the same rows: summary.json's test metrics, or
training's own reading + evaluate() for truncated rows), per-residue class probabilities, and how
many residues --truncate left."""

import json
import math
import os

import pytest
import torch

from esm2lite.checkpoints.loading import load_model
from esm2lite.inference.evaluate import evaluate
from esm2lite import predict
from esm2lite.data.reading import load_splits
from esm2lite.data.records import DataSpec
from esm2lite.model.tokenizer import Tokenizer
from esm2lite.training.loop import TrainConfig, train_model
import oracles
from test_infer import assert_one_line_error, infer_in_process, load_cli, trained_run
from oracles import read_rows, write_rows
from test_tasks import charge_pairs, token_rows


@pytest.fixture(scope="module")
def cli():
    return load_cli()


@pytest.fixture(scope="module")
def regression(tmp_path_factory, hf_tiny):
    return trained_run(tmp_path_factory, hf_tiny)  # the LoRA run test_infer.py reads


def head_run(root, hf_tiny, task, rows, header, **cfg):
    """A short head-mode run on hf_tiny with train/valid/test files -> {"run", "test", "summary"}."""
    paths = {s: write_rows(root / f"{s}.csv", header, r) for s, r in rows.items()}
    train_model(TrainConfig(task=task, checkpoint=hf_tiny, train_csv=paths["train"], valid_csv=paths["valid"],
                            test_csv=paths["test"], out=str(root / "run"), mode="head", steps=6, batch_tokens=800,
                            lr=5e-3, seed=4, device="cpu", **cfg))
    with open(root / "run" / "summary.json") as f:
        return {"run": str(root / "run"), "test": paths["test"], "summary": json.load(f)}


@pytest.fixture(scope="module")
def per_residue(tmp_path_factory, hf_tiny):
    rows = {"train": token_rows(40, 41, "train"), "valid": token_rows(8, 42, "valid"), "test": token_rows(12, 43, "test")}
    rows = {s: [r[:3] for r in v] for s, v in rows.items()}  # sequence, ss, resolved
    return head_run(tmp_path_factory.mktemp("per_residue"), hf_tiny, "token-classification", rows,
                    ["sequence", "ss", "resolved"], target_columns=("ss",), mask_column="resolved")


@pytest.fixture(scope="module")
def classes(tmp_path_factory, hf_tiny):
    rows = {s: [[f"{s}{k}", seq, c] for k, (seq, c) in enumerate(charge_pairs(n, seed))]
            for s, n, seed in (("train", 60, 31), ("valid", 10, 32), ("test", 20, 33))}
    return head_run(tmp_path_factory.mktemp("classes"), hf_tiny, "classification", rows, ["id", "sequence", "charge"],
                    target_columns=("charge",))


@pytest.fixture(scope="module")
def two_targets(tmp_path_factory, hf_tiny):
    rows = {s: [[seq, seq.count("K") / len(seq), seq.count("D") / len(seq)] for seq, _ in charge_pairs(n, seed)]
            for s, n, seed in (("train", 40, 51), ("valid", 8, 52), ("test", 12, 53))}
    return head_run(tmp_path_factory.mktemp("two_targets"), hf_tiny, "regression", rows, ["sequence", "kr", "de"],
                    target_columns=("kr", "de"), standardize=True)


def metrics_file(output):
    with open(os.path.splitext(str(output))[0] + ".metrics.json") as f:
        return json.load(f)


def assert_training_metrics(got: dict, expected: dict, keys):
    """Each metric is a float64 function of outputs that differ from training's by fp32 rounding only
    (merged adapters, other batches; ~1 eps32 relative measured). 64 eps32 of the metric's scale: its value
    for loss / mse / rmse, 1 for correlations, r2, accuracy and F1 (bounded, and possibly near 0, where a
    relative bound means nothing); the room covers conditioning (r2 ~0.03 here magnifies relative changes)."""
    for k in keys:
        scale = abs(expected[k]) if k.startswith(("loss", "mse", "rmse")) else 1.0
        assert abs(got[k] - expected[k]) <= 64 * oracles.EPS32 * scale, (k, got[k], expected[k])


# ---------------------------------------------------------------- columns kept, metrics


def test_regression_keeps_the_input_columns_and_reports_trainings_test_metrics(regression, tmp_path, cli, capsys):
    truth = read_rows(regression["test"])  # sequence, target
    src = write_rows(tmp_path / "in.csv", ["note", "sequence", "name", "target"],
                     [[f"n,{k}", r["sequence"], f"v{k}", r["target"]] for k, r in enumerate(truth)])
    out = tmp_path / "preds.csv"
    code, stdout, err = infer_in_process(cli, capsys, "--run", regression["run"], "--input", src, "--id-column", "name",
                                         "--output", out)
    assert code == 0, err
    rows = read_rows(out)
    assert list(rows[0]) == ["id", "sequence", "note", "target", "prediction"]
    assert [(r["id"], r["note"], r["target"]) for r in rows] == [(f"v{k}", f"n,{k}", t["target"])
                                                                 for k, t in enumerate(truth)]
    library = predict(os.path.join(regression["run"], "best"), [t["sequence"] for t in truth])
    # infer.py runs predict()'s computation (same defaults, same batches) and writes repr(): equal
    assert [float(r["prediction"]) for r in rows] == [p["prediction"] for p in library]
    with open(os.path.join(regression["run"], "summary.json")) as f:
        expected = json.load(f)["test"]  # what training's evaluate() reported on these rows
    metrics = metrics_file(out)
    assert metrics["rows"] == len(truth)
    assert_training_metrics(metrics, expected, ("loss", "mse", "rmse", "pearson", "spearman", "r2"))
    assert "metrics vs the input's labels: loss" in stdout


def test_without_labels_no_metrics_and_an_id_column_gives_the_ids(regression, tmp_path, cli, capsys):
    truth = read_rows(regression["test"])[:5]
    src = write_rows(tmp_path / "in.csv", ["id", "sequence"], [[f"s{k}", r["sequence"]] for k, r in enumerate(truth)])
    out = tmp_path / "preds.csv"
    (tmp_path / "preds.metrics.json").write_text('{"mse": 0.0}')  # an earlier run's, with labels
    code, stdout, err = infer_in_process(cli, capsys, "--run", regression["run"], "--input", src, "--output", out)
    assert code == 0, err
    rows = read_rows(out)
    assert list(rows[0]) == ["id", "sequence", "prediction"] and [r["id"] for r in rows] == [f"s{k}" for k in range(5)]
    assert not os.path.exists(tmp_path / "preds.metrics.json") and "metrics vs" not in stdout, stdout
    assert "removed" in stdout


def test_classification_probabilities_and_metrics(classes, tmp_path, cli, capsys):
    out = tmp_path / "preds.csv"
    code, _, err = infer_in_process(cli, capsys, "--run", classes["run"], "--input", classes["test"], "--output", out)
    assert code == 0, err
    rows, truth = read_rows(out), read_rows(classes["test"])
    assert list(rows[0]) == ["id", "sequence", "charge", "prediction", "prob_acidic", "prob_basic", "prob_neutral"]
    assert [r["id"] for r in rows] == [t["id"] for t in truth] and [r["charge"] for r in rows] == [t["charge"] for t in truth]
    accuracy = sum(r["prediction"] == r["charge"] for r in rows) / len(rows)  # recomputed from the written rows
    metrics = metrics_file(out)
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert_training_metrics(metrics, classes["summary"]["test"], ("loss", "accuracy", "macro_f1"))


def test_two_targets_are_named_and_partial_labels_refused(two_targets, tmp_path, cli, capsys):
    out = tmp_path / "preds.csv"
    code, _, err = infer_in_process(cli, capsys, "--run", two_targets["run"], "--input", two_targets["test"],
                                    "--output", out)
    assert code == 0, err
    assert list(read_rows(out)[0]) == ["id", "sequence", "kr", "de", "prediction_kr", "prediction_de"]
    keys = [f"{m}_{t}" for m in ("mse", "pearson", "spearman", "r2") for t in ("kr", "de")]
    assert_training_metrics(metrics_file(out), two_targets["summary"]["test"], ["loss", "mse", *keys])
    partial = write_rows(tmp_path / "partial.csv", ["sequence", "kr"],
                         [[r["sequence"], r["kr"]] for r in read_rows(two_targets["test"])])
    out2 = tmp_path / "partial_preds.csv"
    code, _, err = infer_in_process(cli, capsys, "--run", two_targets["run"], "--input", partial, "--output", out2)
    assert_one_line_error(code, err, out2, tmp_path / "partial_preds.metrics.json", match="but not 'de'")


# ---------------------------------------------------------------- per-residue


def test_per_residue_metrics_with_the_mask_and_class_probabilities(per_residue, tmp_path, cli, capsys):
    out, probs = tmp_path / "preds.csv", tmp_path / "residues.csv"
    code, stdout, err = infer_in_process(cli, capsys, "--run", per_residue["run"], "--input", per_residue["test"],
                                         "--mask-column", "resolved", "--output", out, "--residue-probs", probs)
    assert code == 0, err
    assert "WARNING" not in stdout
    assert_training_metrics(metrics_file(out), per_residue["summary"]["test"], ("loss", "accuracy", "macro_f1"))
    rows, residues = read_rows(out), read_rows(probs)
    assert list(residues[0]) == ["id", "position", "residue", "prediction", "prob_C", "prob_E", "prob_H"]
    model = load_model(os.path.join(per_residue["run"], "best"))
    with torch.no_grad():  # the model on the same padded batch (every row fits in one), softmax here
        logits = model(Tokenizer().batch_encode([row["sequence"] for row in rows]))
    for k, row in enumerate(rows):
        mine = [r for r in residues if r["id"] == row["id"]]
        assert [r["residue"] for r in mine] == list(row["sequence"])
        assert [int(r["position"]) for r in mine] == list(range(1, len(row["sequence"]) + 1))
        assert "".join(r["prediction"] for r in mine) == row["prediction"]
        expected = logits[k, 1: len(mine) + 1].softmax(-1)
        got = torch.tensor([[float(r[f"prob_{c}"]) for c in "CEH"] for r in mine], dtype=torch.float64)
        # written to 6 decimals (0.5e-6 each); beyond that fp32 rounding of probabilities <= 1 computed from
        # logits of another batch (64 eps32, as the other two-forward comparisons)
        assert (got - expected).abs().max() <= 0.5e-6 + 64 * oracles.EPS32
        assert (got.sum(-1) - 1).abs().max() <= 3 * 0.5e-6 + 64 * oracles.EPS32  # three rounded values
    assert len(residues) == sum(len(r["sequence"]) for r in rows)


def test_per_residue_outputs_do_not_depend_on_padding(per_residue):
    """What infer.py writes for a sequence must not depend on the other sequences of its batch."""
    model = load_model(os.path.join(per_residue["run"], "best"))
    seqs = [row["sequence"] for row in read_rows(per_residue["test"])][:2]
    with torch.no_grad():
        alone = model(Tokenizer().batch_encode(seqs[:1]))[0]
        padded = model(Tokenizer().batch_encode([seqs[0], seqs[0] + "A" * 10]))[0, : alone.shape[0]]
    # the same forward in another matrix shape: rounding only (two fp32 forwards of the tiny model, each a few
    # eps32 x max|h| from float64, test_parity); padding that leaked would be of the values' size
    oracles.assert_fp32_close(padded, alone, 64, what="padded vs alone")


def test_per_residue_labels_without_the_mask_warn(per_residue, tmp_path, cli, capsys):
    """Without --mask-column a 'resolved' column draws a warning, and every residue is scored: here the
    unresolved residues' '-' labels, unseen in training, are then an error naming the row; once they
    are valid labels, the metrics are training's evaluate() over every residue."""
    out = tmp_path / "preds.csv"
    code, stdout, err = infer_in_process(cli, capsys, "--run", per_residue["run"], "--input", per_residue["test"],
                                         "--output", out)
    assert_one_line_error(code, err, out, match="test.csv, row 2, column 'ss': label '-'")
    assert "WARNING" in stdout and "--mask-column resolved" in stdout
    rows = read_rows(per_residue["test"])
    src = write_rows(tmp_path / "filled.csv", ["sequence", "ss", "resolved"],
                     [[r["sequence"], r["ss"].replace("-", "C"), r["resolved"]] for r in rows])
    code, stdout, err = infer_in_process(cli, capsys, "--run", per_residue["run"], "--input", src, "--output", out)
    assert code == 0, err
    assert "WARNING" in stdout and "--mask-column resolved" in stdout
    records = load_splits(DataSpec(task="token-classification", target_columns=("ss",)), train=src)["train"]
    expected = evaluate(load_model(os.path.join(per_residue["run"], "best")), records, 8192, "fp32", "test")
    assert_training_metrics(metrics_file(out), expected, ("loss", "accuracy", "macro_f1"))


def test_truncate_says_how_many_residues_and_scores_like_training(per_residue, tmp_path, cli, capsys):
    out = tmp_path / "preds.csv"
    code, stdout, err = infer_in_process(cli, capsys, "--run", per_residue["run"], "--input", per_residue["test"],
                                         "--mask-column", "resolved", "--max-residues", "20", "--truncate",
                                         "--output", out)
    assert code == 0, err
    rows = read_rows(out)
    assert [int(r["residues_scored"]) for r in rows] == [min(len(r["sequence"]), 20) for r in rows]
    assert [len(r["prediction"]) for r in rows] == [int(r["residues_scored"]) for r in rows]
    cut = sum(len(r["sequence"]) > 20 for r in rows)
    assert cut > 0 and f"--truncate: {cut} sequences cut to 20 residues" in stdout
    spec = DataSpec(task="token-classification", target_columns=("ss",), mask_column="resolved", max_residues=20,
                    truncate=True)
    records = load_splits(spec, train=per_residue["test"])["train"]  # training's reading of these rows
    expected = evaluate(load_model(os.path.join(per_residue["run"], "best")), records, 800, "fp32", "test")
    assert_training_metrics(metrics_file(out), expected, ("loss", "accuracy", "macro_f1"))


def test_truncated_regression_predictions_equal_the_library(regression, tmp_path, cli, capsys):
    out = tmp_path / "preds.csv"
    code, _, err = infer_in_process(cli, capsys, "--run", regression["run"], "--input", regression["test"],
                                    "--max-residues", "20", "--truncate", "--output", out)
    assert code == 0, err
    rows = read_rows(out)
    library = predict(os.path.join(regression["run"], "best"), [r["sequence"] for r in rows], max_residues=20,
                      truncate=True)
    # infer.py runs predict()'s computation (same defaults, same batches) and writes repr(): equal
    assert [float(r["prediction"]) for r in rows] == [p["prediction"] for p in library]
    assert [int(r["residues_scored"]) for r in rows] == [min(len(r["sequence"]), 20) for r in rows]
    assert math.isfinite(metrics_file(out)["mse"])


# ---------------------------------------------------------------- bad input


def output_cases(tmp, regression, per_residue, classes):
    r, test = regression["run"], regression["test"]
    seqs = [row["sequence"] for row in read_rows(test)]
    clash = write_rows(tmp / "clash.csv", ["sequence", "prediction"], [[seqs[0], "x"]])
    unseen = write_rows(tmp / "unseen.csv", ["sequence", "charge"], [[seqs[0], "acidic"], [seqs[1], "zzz"]])
    long = write_rows(tmp / "long.csv", ["sequence"], [[seqs[0]], ["A" * 60]])
    return [
        ("column clash", ["--run", r, "--input", clash], "has a column 'prediction'"),
        ("unseen class", ["--run", classes["run"], "--input", unseen], "unseen.csv, row 3, column 'charge'"),
        ("residue probs of regression", ["--run", r, "--input", test, "--residue-probs", tmp / "p.csv"],
         "--residue-probs"),
        ("mask column of regression", ["--run", r, "--input", test, "--mask-column", "target"], "--mask-column"),
        ("missing mask column", ["--run", per_residue["run"], "--input", per_residue["test"], "--mask-column", "m"],
         "no column 'm'"),
        ("too long for the head", ["--run", r, "--input", long, "--max-residues", "50"],
         "long.csv, row 3, column 'sequence': 60 residues, more than the maximum 50"),
        ("per-residue without embeddings", ["--run", r, "--input", test, "--per-residue"], "--per-residue is for"),
        ("no-merge with base", ["--base", regression["base"], "--input", test, "--no-merge"], "--no-merge is for"),
        ("same file twice", ["--run", per_residue["run"], "--input", per_residue["test"],
                             "--residue-probs", tmp / "out.csv"], "two outputs"),
        ("id column of a fasta", ["--run", r, "--input", tmp / "in.fasta", "--id-column", "x"], "FASTA"),
    ]


def test_bad_input_gives_one_line_and_no_output(tmp_path, regression, per_residue, classes, cli, capsys):
    (tmp_path / "in.fasta").write_text(">a\nMKTAYIAKQR\n")
    out = tmp_path / "out.csv"
    for name, argv, match in output_cases(tmp_path, regression, per_residue, classes):
        code, _, err = infer_in_process(cli, capsys, *argv, "--output", out)
        assert code == 2, (name, err)
        assert_one_line_error(code, err, out, tmp_path / "out.metrics.json", tmp_path / "p.csv", match=match)
