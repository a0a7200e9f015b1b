"""One id rule (issue 21; esm2lite.data.reading.ID_RULE) across training's predictions_*.csv,
infer.py and esm2lite.predict: the id column, else the FASTA id (its description in its own column),
else the data row's number from 1. Written out here by hand, from the input files."""

import csv
from pathlib import Path

import pytest

import oracles
from esm2lite import predict

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TRAIN, INFER = str(ROOT / "train.py"), str(ROOT / "infer.py")


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ids")
    seqs = oracles.random_sequences(24, 12, 30, seed=21, with_mask=False)
    splits = ["train", "train", "valid"] * 8
    with open(d / "plain.csv", "w") as f:  # no id column
        f.write("sequence,target,split\n")
        f.writelines(f"{s},{s.count('K') / len(s)},{sp}\n" for s, sp in zip(seqs, splits))
    with open(d / "named.csv", "w") as f:  # an id column, not first
        f.write("sequence,target,split,id\n")
        f.writelines(f"{s},{s.count('K') / len(s)},{sp},P{900 - i}\n" for i, (s, sp) in enumerate(zip(seqs, splits)))
    with open(d / "in.fasta", "w") as f:
        for i, s in enumerate(seqs[:5]):
            f.write(f">sp|Q{i}|X_HUMAN Protein {i} OS=Homo sapiens\n{s}\n" if i % 2 == 0 else f">bare{i}\n{s}\n")
    return d, seqs, splits


def trained(forkrun, hf_tiny, data, out):
    r = forkrun.run([TRAIN, "--checkpoint", hf_tiny, "--csv", str(data), "--steps", "1", "--batch-tokens", "400",
                     "--device", "cpu", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def inferred(forkrun, run, data, out):
    r = forkrun.run([INFER, "--run", str(run), "--input", str(data), "--output", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    return rows_of(out)


@pytest.mark.parametrize("name", ["plain.csv", "named.csv"])
def test_ids_agree_for_csv(name, files, hf_tiny, tmp_path, forkrun):
    d, seqs, splits = files
    want = ([str(i + 1) for i in range(len(seqs))] if name == "plain.csv"
            else [f"P{900 - i}" for i in range(len(seqs))])  # the data row's number, or the id column
    run = trained(forkrun, hf_tiny, d / name, tmp_path / "run")
    training = rows_of(run / "predictions_valid.csv")
    assert [r["id"] for r in training] == [w for w, sp in zip(want, splits) if sp == "valid"]
    infer = inferred(forkrun, run, d / name, tmp_path / "p.csv")
    assert [r["id"] for r in infer] == want
    python = predict(str(run / "best"), str(d / name))
    assert [r["id"] for r in python] == want
    for a, b in zip(infer, python):  # the same row, the same prediction as infer.py writes it
        assert a["sequence"] == b["sequence"] and float(a["prediction"]) == pytest.approx(b["prediction"], rel=1e-6)
    if name == "plain.csv":  # a list in Python numbers its sequences the same way
        assert [r["id"] for r in predict(str(run / "best"), seqs)] == want


def test_fasta_ids_and_descriptions(files, hf_tiny, tmp_path, forkrun):
    d, seqs, _ = files
    run = trained(forkrun, hf_tiny, d / "plain.csv", tmp_path / "run")
    infer = inferred(forkrun, run, d / "in.fasta", tmp_path / "p.csv")
    ids = [f"sp|Q{i}|X_HUMAN" if i % 2 == 0 else f"bare{i}" for i in range(5)]
    descriptions = [f"Protein {i} OS=Homo sapiens" if i % 2 == 0 else "" for i in range(5)]
    assert list(infer[0])[:3] == ["id", "sequence", "description"]
    assert [(r["id"], r["description"], r["sequence"]) for r in infer] == list(zip(ids, descriptions, seqs[:5]))
    python = predict(str(run / "best"), d / "in.fasta")
    assert [(r["id"], r["description"]) for r in python] == list(zip(ids, descriptions))
