"""infer.py on a file with a split column (issue 21): metrics for each split and for all rows; each
split's equal to its rows scored alone from a file of their own; every metrics JSON carries the
per-class scores and confusion matrix summary.json has, and agrees with it on the splits training
scored."""

import csv
import json
from pathlib import Path

import pytest

import oracles

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TRAIN, INFER = str(ROOT / "train.py"), str(ROOT / "infer.py")
SPLITS = ["train", "train", "valid", "test", "validation"]  # an alias: grouped as training groups it


@pytest.fixture(scope="module")
def classified(tmp_path_factory, hf_tiny, forkrun):
    d = tmp_path_factory.mktemp("splits")
    seqs = oracles.random_sequences(40, 12, 35, seed=41, with_mask=False)
    charge = lambda s: "basic" if s.count("K") + s.count("R") > s.count("D") + s.count("E") else "acidic"  # noqa: E731
    rows = [{"sequence": s, "charge": charge(s), "split": SPLITS[i % 5]} for i, s in enumerate(seqs)]
    with open(d / "all.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["sequence", "charge", "split"])
        w.writeheader()
        w.writerows(rows)
    r = forkrun.run([TRAIN, "--checkpoint", hf_tiny, "--csv", str(d / "all.csv"), "--task", "classification",
                     "--target-column", "charge", "--steps", "3", "--batch-tokens", "300", "--lr", "3e-3",
                     "--device", "cpu", "--out", str(d / "run")])
    assert r.returncode == 0, r.stderr[-2000:]
    return d, rows


def infer(forkrun, run, data, out):
    r = forkrun.run([INFER, "--run", str(run), "--input", str(data), "--output", str(out), "--batch-tokens", "150"])
    assert r.returncode == 0, r.stderr[-2000:]
    return r, json.loads(Path(str(out).replace(".csv", ".metrics.json")).read_text())


def test_per_split_metrics_equal_the_splits_scored_alone(classified, tmp_path, forkrun):
    d, rows = classified
    r, together = infer(forkrun, d / "run", d / "all.csv", tmp_path / "all.csv")
    groups = {"train": [x for x in rows if x["split"] == "train"],
              "valid": [x for x in rows if x["split"] in ("valid", "validation")],
              "test": [x for x in rows if x["split"] == "test"]}
    assert list(together["splits"]) == ["train", "valid", "test"]
    assert together["rows"] == len(rows) and "valid (16 rows): loss " in r.stdout
    for name, part in groups.items():
        path = tmp_path / f"{name}.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, ["sequence", "charge"], extrasaction="ignore")
            w.writeheader()
            w.writerows(part)
        _, alone = infer(forkrun, d / "run", path, tmp_path / f"{name}_out.csv")
        got = together["splits"][name]
        assert got.pop("rows") == alone["rows"] == len(part)
        want = {k: v for k, v in alone.items() if k not in ("input", "rows", "per_class", "confusion_matrix")}
        assert got == want, name  # the same rows batched the same way: the same numbers
        assert together["per_class"][name] == alone["per_class"]["all"]
        assert together["confusion_matrix"][name] == alone["confusion_matrix"]["all"]
    matrix = together["confusion_matrix"]
    assert matrix["all"] == [[sum(matrix[s][i][j] for s in groups) for j in range(2)] for i in range(2)]
    # the loss of all rows: every split's loss sum over all the sequences (one unit each)
    pooled = sum(together["splits"][s]["loss"] * len(groups[s]) for s in groups) / len(rows)
    assert together["loss"] == pytest.approx(pooled, rel=1e-12)
    summary = json.loads((d / "run" / "summary.json").read_text())  # training scored valid and test with best/
    for name in ("valid", "test"):
        assert together["confusion_matrix"][name] == summary["confusion_matrix"][name]
        for c, scores in summary["per_class"][name].items():
            assert together["per_class"][name][c] == pytest.approx(scores), (name, c)


def test_without_a_split_column_the_report_is_of_all_rows(classified, tmp_path, forkrun):
    d, rows = classified
    path = tmp_path / "plain.csv"
    path.write_text("sequence,charge\n" + "".join(f"{x['sequence']},{x['charge']}\n" for x in rows[:7]))
    r, m = infer(forkrun, d / "run", path, tmp_path / "out.csv")
    assert "splits" not in m and set(m["per_class"]) == {"all"} and sum(map(sum, m["confusion_matrix"]["all"])) == 7
    assert "wrote 7 predictions" in r.stdout
    bad = forkrun.run([INFER, "--run", str(d / "run"), "--input", str(path), "--output", str(tmp_path / "x.csv"),
                       "--split-column", "fold"])
    assert bad.returncode != 0 and "no column 'fold' (--split-column)" in bad.stderr
    assert not (tmp_path / "x.csv").exists()
