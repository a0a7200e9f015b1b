"""End to end, per task: train on a small learnable synthetic task, predict, and check the
output format the README promises and that the metrics recomputed here from the
predictions (plain Python / numpy, never our metrics module) equal the run's summary.

    classification         class from the K+R vs D+E balance (3 classes; in-memory records;
                           predict() and infer.py's CLI in-process)
    token-classification   one label per residue from the residue's letter, with a 0/1
                           `resolved` column (one CSV with a split column)
    regression, 2 targets  fraction of K+R and of D+E (train/valid/test CSVs, standardised)
    resume, head mode      exactly the weights of an uninterrupted run
"""

import csv
import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import oracles
from esm2lite.cli import run_main
from esm2lite import predict
from esm2lite.model.lora import LoRAConfig
from esm2lite.data.records import records_from_pairs
from esm2lite.training.loop import TrainConfig, train_model
from test_train import read_jsonl, small_config, synthetic, trained

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one torch thread is faster, and on a shared, busy machine far
    steadier, than several threads waiting on each other. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sequences(n, seed, min_len=20, max_len=45):
    return oracles.random_sequences(n, min_len, max_len, seed=seed, with_mask=False)


def summary_json(out):
    with open(Path(out) / "summary.json") as f:
        return json.load(f)


def macro_f1(pred, true):
    """Mean over the classes seen in either list of 2TP / (2TP + FP + FN)."""
    f1 = []
    for c in sorted(set(pred) | set(true)):
        tp = sum(p == c and t == c for p, t in zip(pred, true))
        fp = sum(p == c and t != c for p, t in zip(pred, true))
        fn = sum(p != c and t == c for p, t in zip(pred, true))
        f1.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1) / len(f1)


# ---------------------------------------------------------------- classification


def charge_class(seq):
    diff = seq.count("K") + seq.count("R") - seq.count("D") - seq.count("E")
    return "basic" if diff >= 3 else "acidic" if diff <= -3 else "neutral"


def charge_pairs(n, seed):
    """Random sequences, a third enriched in K/R, a third in D/E; the label is the rule above
    applied to the final sequence (so it is exact, whatever the enrichment did)."""
    g = np.random.default_rng(seed)
    out = []
    for i, s in enumerate(sequences(n, seed)):
        chars = list(s)
        extra = {0: "KR", 1: "DE", 2: ""}[i % 3]
        if extra:
            for j in g.choice(len(chars), size=len(chars) // 4, replace=False):
                chars[j] = extra[g.integers(2)]
        s = "".join(chars)
        out.append((s, charge_class(s)))
    return out


def load_cli():
    spec = importlib.util.spec_from_file_location("infer_cli", ROOT / "infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_classification_end_to_end(hf_tiny, tmp_path, capsys):
    data = {"train": charge_pairs(150, 31), "valid": charge_pairs(30, 32), "test": charge_pairs(45, 33)}
    classes = sorted({c for _, c in data["train"]})
    assert classes == ["acidic", "basic", "neutral"]
    out = tmp_path / "run"
    cfg = TrainConfig(task="classification", checkpoint=hf_tiny, out=str(out), mode="full", steps=25,
                      batch_tokens=800, lr=3e-3, eval_every=10, seed=5, device="cpu")
    result = train_model(cfg, records={k: records_from_pairs(v, task="classification") for k, v in data.items()})
    summary = summary_json(out)
    assert summary["test"] == result["summary"]["test"]

    seqs = [s for s, _ in data["test"]]
    truth = [c for _, c in data["test"]]
    ids = [f"t{i}" for i in range(len(seqs))]
    rows = predict(result["checkpoint"], seqs, ids=ids, batch_tokens=300, device="cpu")
    prob_cols = [f"prob_{c}" for c in classes]
    assert [r["id"] for r in rows] == ids and [r["sequence"] for r in rows] == seqs
    for r in rows:
        assert list(r)[:3] == ["id", "sequence", "prediction"] and sorted(list(r)[3:]) == prob_cols
        probs = [r[c] for c in prob_cols]
        assert all(0.0 <= p <= 1.0 for p in probs)
        assert math.fsum(probs) == pytest.approx(1.0, abs=1e-5)  # an fp32 softmax: a few eps32 per class
        assert r["prediction"] == classes[int(np.argmax(probs))]  # the class of the largest probability

    pred = [r["prediction"] for r in rows]
    correct = sum(p == t for p, t in zip(pred, truth))
    accuracy = correct / len(truth)
    assert accuracy == pytest.approx(summary["test"]["accuracy"], abs=1e-9)
    assert macro_f1(pred, truth) == pytest.approx(summary["test"]["macro_f1"], abs=1e-9)
    chance = max(truth.count(c) for c in classes) / len(truth)  # always guessing the commonest class
    assert accuracy >= chance + 0.2, (accuracy, chance)

    # infer.py on a CSV: the same rows, as text, in input order
    inp = oracles.write_rows(tmp_path / "test.csv", ["name", "sequence"], [[i, s] for i, s in zip(ids, seqs)])
    preds_csv = tmp_path / "preds.csv"
    capsys.readouterr()
    code = run_main(load_cli().main, ["--run", str(out), "--input", inp, "--id-column", "name",
                                      "--output", str(preds_csv), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    with open(preds_csv, newline="") as f:
        header = next(csv.reader(f))
    assert header[:3] == ["id", "sequence", "prediction"] and sorted(header[3:]) == prob_cols
    cli_rows = oracles.read_rows(preds_csv)
    assert [r["id"] for r in cli_rows] == ids and [r["prediction"] for r in cli_rows] == pred
    for a, b in zip(cli_rows, rows):
        for c in prob_cols:
            assert float(a[c]) == pytest.approx(b[c], abs=1e-5)  # the same model on the same rows; the CSV's rounding


# ---------------------------------------------------------------- per-residue


HELIX, STRAND = set("AELMQKRH"), set("VIYFWTC")


def residue_label(aa):
    return "H" if aa in HELIX else "E" if aa in STRAND else "C"


def token_rows(n, seed, split):
    """(sequence, labels, resolved, split): labels follow the rule on resolved residues; an
    unresolved residue (about 1 in 5) carries a WRONG label, or '-', which must be ignored."""
    g = np.random.default_rng(seed)
    rows = []
    for s in sequences(n, seed):
        resolved = "".join("0" if g.random() < 0.2 else "1" for _ in s)
        labels = "".join(residue_label(a) if m == "1" else "-" if g.random() < 0.3
                         else {"H": "E", "E": "C", "C": "H"}[residue_label(a)] for a, m in zip(s, resolved))
        rows.append([s, labels, resolved, split])
    return rows


def test_token_classification_end_to_end(hf_tiny, tmp_path):
    rows = token_rows(60, 41, "train") + token_rows(15, 42, "valid") + token_rows(20, 43, "test")
    data = oracles.write_rows(tmp_path / "ss.csv", ["sequence", "ss", "resolved", "split"], rows)
    out = tmp_path / "run"
    cfg = TrainConfig(task="token-classification", csv=data, target_columns=("ss",), mask_column="resolved",
                      checkpoint=hf_tiny, out=str(out), mode="lora", steps=45, batch_tokens=800, lr=5e-3,
                      eval_every=15, seed=6, lora=LoRAConfig(rank=4, alpha=8, dropout=0.1), device="cpu")
    result = train_model(cfg)
    summary = summary_json(out)
    assert summary["test"] == result["summary"]["test"]
    with open(Path(result["checkpoint"]) / "config.json") as f:
        saved = json.load(f)["labels"]
    assert saved["classes"] == ["C", "E", "H"]  # from resolved residues only: no '-'
    test = [r for r in rows if r[3] == "test"]
    seqs = [r[0] for r in test]
    preds = predict(result["checkpoint"], seqs, batch_tokens=300, device="cpu")
    assert [p["sequence"] for p in preds] == seqs
    pred_all, true_all = [], []
    for p, (s, labels, resolved, _) in zip(preds, test):
        assert list(p) == ["id", "sequence", "prediction"]
        assert isinstance(p["prediction"], str) and len(p["prediction"]) == len(s)
        assert set(p["prediction"]) <= {"C", "E", "H"}
        for a, b, m in zip(p["prediction"], labels, resolved):
            if m == "1":
                pred_all.append(a)
                true_all.append(b)
    accuracy = sum(a == b for a, b in zip(pred_all, true_all)) / len(true_all)
    assert accuracy == pytest.approx(summary["test"]["accuracy"], abs=1e-9)
    assert macro_f1(pred_all, true_all) == pytest.approx(summary["test"]["macro_f1"], abs=1e-9)
    chance = max(true_all.count(c) for c in "CEH") / len(true_all)
    assert accuracy >= chance + 0.2, (accuracy, chance)
    per_residue_metrics_do_not_depend_on_batching(result["checkpoint"], data, summary["test"])


def per_residue_metrics_do_not_depend_on_batching(checkpoint, data, summary_test):
    """The per-residue loss is summed over the labelled residues of the whole split and divided once
    (it used to be a mean of per-batch means weighted by sequences: 0.7616 vs 0.7635 at two
    --batch-tokens): the same for any batching, equal to summary.json's and to the loss of the model
    run one sequence at a time (cross-entropy summed over labelled residues / their number)."""
    import torch.nn.functional as F

    from esm2lite.checkpoints.loading import load_model
    from esm2lite.data.reading import load_splits
    from esm2lite.data.records import DataSpec
    from esm2lite.inference.evaluate import score

    model = load_model(checkpoint)
    spec = DataSpec(task="token-classification", target_columns=("ss",), mask_column="resolved", split_column="split")
    records = load_splits(spec, csv=data)["test"]
    by_batch = {tokens: score(model, records, tokens, "fp32", "test")[0] for tokens in (60, 300, 100_000)}
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:
            logits = model(torch.tensor([r.tokens]))[0]  # [T, C], the sequence alone
            keep = [i + 1 for i, m in enumerate(r.mask) if m == "1"]
            target = torch.tensor([model.labels.index[r.target[i - 1]] for i in keep])
            total += float(F.cross_entropy(logits[keep], target, reduction="sum"))
            count += len(keep)
    for metrics in (*by_batch.values(), summary_test):
        # the same forward in other batch shapes: fp32 rounding of ~1e-6 relative; the old weighting was off by 2e-3
        oracles.assert_fp32_close(metrics["loss"], total / count, ulps=64, what="per-residue loss")
        assert metrics["accuracy"] == by_batch[300]["accuracy"] and metrics["macro_f1"] == by_batch[300]["macro_f1"]


# ---------------------------------------------------------------- regression, two targets


def test_two_target_regression_end_to_end(hf_tiny, tmp_path):
    def pairs(n, seed):
        return [(s, (s.count("K") + s.count("R")) / len(s), (s.count("D") + s.count("E")) / len(s))
                for s in sequences(n, seed)]

    data = {"train": pairs(60, 51), "valid": pairs(15, 52), "test": pairs(25, 53)}
    paths = {k: oracles.write_rows(tmp_path / f"{k}.csv", ["sequence", "kr", "de"], v) for k, v in data.items()}
    out = tmp_path / "run"
    cfg = TrainConfig(checkpoint=hf_tiny, train_csv=paths["train"], valid_csv=paths["valid"],
                      test_csv=paths["test"], target_columns=("kr", "de"), standardize=True, out=str(out),
                      mode="head", steps=8, batch_tokens=800, lr=3e-3, eval_every=4, seed=7, device="cpu")
    result = train_model(cfg)
    summary = summary_json(out)["test"]
    assert summary == result["summary"]["test"]
    rows = predict(result["checkpoint"], [s for s, _, _ in data["test"]], device="cpu")
    # the columns infer.py writes (esm2lite.predict and the command line share one pipeline)
    assert all(list(r) == ["id", "sequence", "prediction_kr", "prediction_de"] for r in rows)
    per_target = {}
    for j, name in enumerate(("kr", "de")):
        p = np.array([r[f"prediction_{name}"] for r in rows], dtype=np.float64)
        t = np.array([x[1 + j] for x in data["test"]], dtype=np.float64)
        mse = float(np.mean((p - t) ** 2))
        per_target[name] = mse
        # predict() batches the rows otherwise than training's evaluation: predictions agree to fp32 rounding
        # (~1e-6 relative), the metrics to far less than these bounds
        assert mse == pytest.approx(summary[f"mse_{name}"], rel=1e-4)
        assert float(np.corrcoef(p, t)[0, 1]) == pytest.approx(summary[f"pearson_{name}"], abs=1e-5)
        assert 1 - np.sum((t - p) ** 2) / np.sum((t - t.mean()) ** 2) == pytest.approx(summary[f"r2_{name}"],
                                                                                         abs=1e-5)
    assert (per_target["kr"] + per_target["de"]) / 2 == pytest.approx(summary["mse"], rel=1e-4)
    assert per_target["kr"] != pytest.approx(per_target["de"], rel=1e-3)  # two columns, not one twice


# ---------------------------------------------------------------- resume, head mode


def test_head_mode_resume_gives_exactly_the_uninterrupted_weights(hf_tiny, tmp_path):
    splits = {"train": records_from_pairs(synthetic(60, 1)), "valid": records_from_pairs(synthetic(20, 2)),
              "test": records_from_pairs(synthetic(20, 3))}
    full = tmp_path / "full"
    train_model(small_config(hf_tiny, full, save_every=4, mode="head", device="cpu"), records=splits)
    part = tmp_path / "part"
    os.makedirs(part / "checkpoints")
    shutil.copy(full / "config.json", part / "config.json")
    shutil.copytree(full / "checkpoints" / "step_4", part / "checkpoints" / "step_4")
    shutil.copytree(full / "checkpoints" / "step_4", part / "best")  # step 4 was the first eval: best so far
    (part / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text())  # a log past the checkpoint
    train_model(small_config(hf_tiny, part, save_every=4, mode="head", device="cpu"), records=splits, resume=True)
    a, b = trained(full / "checkpoints" / "step_12"), trained(part / "checkpoints" / "step_12")
    assert a.keys() == b.keys() and a and all(k.startswith("head.") for k in a)  # head mode stores the head only
    first = trained(full / "checkpoints" / "step_4")
    assert any(not torch.equal(first[k], a[k]) for k in a)  # training went on after the checkpoint
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [(r["step"], r["split"]) for r in read_jsonl(part / "metrics.jsonl")]
    assert steps == [(r["step"], r["split"]) for r in read_jsonl(full / "metrics.jsonl")]
    assert summary_json(part)["test"] == summary_json(full)["test"]
