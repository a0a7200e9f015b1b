"""Inference: infer.py / esm2lite.inference.embed against the training loop, the model itself and bad input.

One small LoRA run on the tiny HF checkpoint is trained once per session (shared with
test_export.py through `trained_run`) and every test reads it."""

import csv
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import oracles
from esm2lite.cli import run_main
from esm2lite.checkpoints.loading import load_model
from esm2lite.model.heads import mean_pool
from esm2lite import predict
from esm2lite.model.lora import LoRAConfig, lora_modules
from esm2lite.data.reading import read_sequences
from esm2lite.model.tokenizer import Tokenizer
from esm2lite.training.loop import TrainConfig, train_model

ROOT = Path(__file__).resolve().parents[2]
INFER = ROOT / "infer.py"


# ---------------------------------------------------------------- shared fixtures


def synthetic(n, seed, min_len=15, max_len=50):
    """Sequences whose target is their fraction of K+R."""
    seqs = oracles.random_sequences(n, min_len, max_len, seed=seed, with_mask=False)
    return [(s, (s.count("K") + s.count("R")) / len(s)) for s in seqs]


def write_csv(path, pairs):
    with open(path, "w") as f:
        f.write("sequence,target\n")
        f.writelines(f"{s},{t}\n" for s, t in pairs)
    return str(path)


def trained_run(tmp_path_factory, hf_tiny) -> dict:
    """A LoRA regression run (standardised targets, LoRA dropout) on hf_tiny, trained once per
    session: later calls (from this module or test_export.py) find it on disk."""
    root = tmp_path_factory.getbasetemp() / "shared_lora_run"
    paths = {"root": root, "run": root / "run", "train": root / "train.csv", "valid": root / "valid.csv",
             "test": root / "test.csv", "base": hf_tiny}
    if not (paths["run"] / "summary.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        write_csv(paths["train"], synthetic(60, 1))
        write_csv(paths["valid"], synthetic(20, 2))
        write_csv(paths["test"], synthetic(30, 3))
        train_model(TrainConfig(
            checkpoint=hf_tiny, train_csv=str(paths["train"]), valid_csv=str(paths["valid"]),
            test_csv=str(paths["test"]), out=str(paths["run"]), steps=6, batch_tokens=800, lr=3e-3,
            eval_every=3, seed=3, standardize=True, lora=LoRAConfig(rank=4, alpha=8, dropout=0.1)))
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory, hf_tiny):
    return trained_run(tmp_path_factory, hf_tiny)


@pytest.fixture(scope="module")
def ckpt(run):
    return os.path.join(run["run"], "best")


@pytest.fixture(scope="module")
def tuned(ckpt):
    """The run's best checkpoint, adapters NOT merged (as the training loop scored it)."""
    return load_model(ckpt)


def load_cli():
    spec = importlib.util.spec_from_file_location("infer_cli", INFER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cli():
    return load_cli()


def infer_in_process(cli, capsys, *argv) -> tuple[int, str, str]:
    """Run `python infer.py ARGV` in this process -> (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = run_main(cli.main, [str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def read_preds(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_one_line_error(code, err, *outputs, match=None):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    if match:
        assert match.lower() in lines[0].lower(), lines[0]
    for path in outputs:
        assert not os.path.exists(path), path


# ---------------------------------------------------------------- predictions


def test_predictions_recompute_the_summary_test_metrics(run, tmp_path, forkrun):
    """infer.py (a separate process, merged adapters) reproduces what the training loop scored."""
    from scipy.stats import spearmanr

    out = tmp_path / "preds.csv"
    r = forkrun.run([INFER, "--run", run["run"], "--input", run["test"], "--output", out])
    assert r.returncode == 0, r.stderr[-2000:]
    preds = read_preds(out)
    truth = list(csv.DictReader(open(run["test"])))
    assert [p["sequence"] for p in preds] == [t["sequence"] for t in truth]  # input order
    assert [p["id"] for p in preds] == [str(i + 1) for i in range(len(truth))]  # no id column: data row numbers
    y_hat = [float(p["prediction"]) for p in preds]
    y = [float(t["target"]) for t in truth]
    summary = json.load(open(os.path.join(run["run"], "summary.json")))["test"]
    assert spearmanr(y_hat, y).statistic == pytest.approx(summary["spearman"], abs=1e-6)  # ranks: equal
    mse = sum((a - b) ** 2 for a, b in zip(y_hat, y)) / len(y)
    # each prediction is off training's by fp32 rounding only (merged adapters, other batches, fp32 decoding):
    # delta = 64 eps32 x max|prediction|, as test_merged_and_unmerged_predictions_agree. The mse (float64)
    # then moves by at most 2 mean|residual| delta + delta^2.
    delta = 64 * oracles.EPS32 * max(map(abs, y_hat))
    mean_residual = sum(abs(a - b) for a, b in zip(y_hat, y)) / len(y)
    assert abs(mse - summary["mse"]) <= 2 * mean_residual * delta + delta ** 2, (mse, summary["mse"])


def test_merged_and_unmerged_predictions_agree(ckpt, tuned):
    assert any(m.lora_b.abs().max() > 0 for m in lora_modules(tuned.encoder).values())  # adapters matter
    seqs = [s for s, _ in synthetic(12, 9)]
    unmerged = torch.tensor([p["prediction"] for p in predict(tuned, seqs)])  # a loaded model is used as is
    merged = torch.tensor([p["prediction"] for p in predict(ckpt, seqs)])  # loads, then merges
    again = torch.tensor([p["prediction"] for p in predict(ckpt, seqs, merge=False)])
    assert not any(m.merged for m in lora_modules(tuned.encoder).values())
    # W + s B A rounded once into W, and summed in another order: two fp32 forwards of the tiny model, each a
    # few eps32 x max|h| from float64 (test_parity), through the head
    oracles.assert_fp32_close(merged, unmerged, 64, what="merged vs unmerged predictions")
    assert torch.equal(again, unmerged)


def test_input_order_kept_for_shuffled_lengths(tuned):
    """Lengths 3..120 in random order, several length-bucketed batches: row i is sequence i,
    and equals scoring that sequence alone (batch_tokens=1: every sequence is its own batch)."""
    seqs = oracles.random_sequences(16, 3, 120, seed=21, with_mask=False)
    ids = [f"s{i}_{len(s)}" for i, s in enumerate(seqs)]
    rows = predict(tuned, seqs, ids=ids, batch_tokens=300)
    assert [r["id"] for r in rows] == ids and [r["sequence"] for r in rows] == seqs
    alone = [r["prediction"] for r in predict(tuned, seqs, batch_tokens=1)]
    # the same forward, padded into a batch or alone: rounding only (other matrix shapes)
    oracles.assert_fp32_close([r["prediction"] for r in rows], alone, 64, what="batched vs alone")
    assert len(set(alone)) == len(alone)  # distinct values: a permutation would show


def test_cli_no_merge_matches_merged(run, cli, capsys, tmp_path):
    a, b = tmp_path / "merged.csv", tmp_path / "unmerged.csv"
    assert infer_in_process(cli, capsys, "--run", run["run"], "--input", run["valid"], "--output", a)[0] == 0
    assert infer_in_process(cli, capsys, "--run", run["run"], "--input", run["valid"], "--output", b,
                            "--no-merge", "--batch-tokens", "100")[0] == 0
    pa, pb = read_preds(a), read_preds(b)
    assert [p["id"] for p in pa] == [p["id"] for p in pb]
    # merged vs unmerged adapters, in other batches: rounding only (as test_merged_and_unmerged_predictions_agree)
    oracles.assert_fp32_close([float(x["prediction"]) for x in pa], [float(y["prediction"]) for y in pb], 64,
                              what="merged vs --no-merge")


# ---------------------------------------------------------------- FASTA input


CLEAN = ">a first record\nMKTAYIAKQRQISFVKSHFSRQ\n>b\nGSHMLEDPVDAFQ\n>c\nACDEFGHIKLMNPQRSTVWY\n"
MESSY = ("\ufeff; a comment line\r\n\r\n>a first record\r\nmktayiakqr\r\n\r\nQISFVKSHFSRQ\r\n"
         ">b\r\n  gshmledpv  \r\nDAFQ\r\n\r\n\r\n>c\r\nACDEFGHIKL\r\nmnpqrstvwy\r\n")


def test_fasta_edge_cases_read_like_the_clean_file(tmp_path, ckpt, cli, capsys):
    """Multi-line records, lowercase, blank lines, CRLF, a BOM and comments: same ids, same
    residues, same predictions as the clean file."""
    clean, messy = tmp_path / "clean.fasta", tmp_path / "messy.fa"
    clean.write_text(CLEAN)
    messy.write_bytes(MESSY.encode("utf-8"))
    ref, got = read_sequences(str(clean)), read_sequences(str(messy))
    assert [i for i, _ in got] == [i for i, _ in ref] == ["a", "b", "c"]
    assert [Tokenizer().encode(s) for _, s in got] == [Tokenizer().encode(s) for _, s in ref]
    outputs = []
    for src in (clean, messy):
        outputs.append(tmp_path / f"{src.stem}.csv")
        code, _, err = infer_in_process(cli, capsys, "--checkpoint", ckpt, "--input", src, "--output", outputs[-1])
        assert code == 0, err
    a, b = read_preds(outputs[0]), read_preds(outputs[1])
    assert [r["id"] for r in a] == [r["id"] for r in b] == ["a", "b", "c"]
    assert [r["prediction"] for r in a] == [r["prediction"] for r in b]


@pytest.mark.parametrize("text, match", [
    (">a\nMKT\n>b\nGSH\n>a\nACD\n", "duplicate id 'a'"),
    ("MKTAYIAKQR\n>a\nGSH\n", "before the first '>'"),
])
def test_fasta_errors(tmp_path, run, cli, capsys, text, match):
    src, out = tmp_path / "bad.fasta", tmp_path / "out.csv"
    src.write_text(text)
    code, _, err = infer_in_process(cli, capsys, "--run", run["run"], "--input", src, "--output", out)
    assert_one_line_error(code, err, out, match=match)


# ---------------------------------------------------------------- embeddings


def pooled_reference(encoder, seq, layers):
    """One sequence alone (no padding) through the encoder -> {layer: (mean [d], per-residue [n, d])}."""
    tokens = Tokenizer().batch_encode([seq])
    with torch.no_grad():
        hidden = encoder(tokens, repr_layers=layers, logits=False)["hidden_states"]
    return {layer: (mean_pool(hidden[layer], tokens)[0], hidden[layer][0, 1:-1]) for layer in layers}


def read_embeddings(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_embeddings_equal_the_models_pooled_hidden_states(tmp_path, ckpt, tuned, cli, capsys):
    src, emb = tmp_path / "in.fasta", tmp_path / "emb.safetensors"
    src.write_text(CLEAN)
    code, _, err = infer_in_process(cli, capsys, "--checkpoint", ckpt, "--input", src, "--embeddings", emb,
                                    "--layers", "0", "2", "--per-residue", "--batch-tokens", "50")
    assert code == 0, err
    tensors, meta = read_embeddings(emb)
    assert meta["ids"].split("\n") == ["a", "b", "c"]
    assert len(tensors) == 3 * 2 * 2
    for sid, seq in read_sequences(str(src)):
        for layer, (mean, per_residue) in pooled_reference(tuned.encoder, seq, [0, 2]).items():
            # merged adapters (infer.py) in batches of 50 tokens vs unmerged alone: rounding only, two fp32
            # forwards of the tiny model each a few eps32 x max|h| from float64 (test_parity)
            oracles.assert_fp32_close(tensors[f"mean/{layer}/{sid}"], mean, 64, what=f"mean/{layer}/{sid}")
            oracles.assert_fp32_close(tensors[f"per_residue/{layer}/{sid}"], per_residue, 64,
                                      what=f"per_residue/{layer}/{sid}")


def test_base_embeddings_equal_transformers_pooled_hidden_states(tmp_path, hf_tiny, cli, capsys):
    """--base: the plain pretrained model; the oracle is transformers' EsmModel."""
    from transformers import EsmModel

    src, emb = tmp_path / "in.fasta", tmp_path / "emb.safetensors"
    src.write_text(CLEAN)
    code, _, err = infer_in_process(cli, capsys, "--base", hf_tiny, "--input", src, "--embeddings", emb)
    assert code == 0, err
    tensors, _ = read_embeddings(emb)
    hf = EsmModel.from_pretrained(hf_tiny, add_pooling_layer=False).eval()
    pairs = read_sequences(str(src))
    tokens = Tokenizer().batch_encode([s for _, s in pairs])
    with torch.no_grad():  # transformers as it runs, and in float64: the yardstick of the fp32 comparison
        pooled = [mean_pool(m(input_ids=tokens, attention_mask=tokens.ne(1)).last_hidden_state, tokens)
                  for m in (hf, oracles.float64_copy(hf))]
    for row, (sid, _) in enumerate(pairs):
        oracles.assert_fp32_agrees(tensors[f"mean/2/{sid}"], pooled[0][row], pooled[1][row], what=f"mean/2/{sid}")
    assert set(tensors) == {f"mean/2/{sid}" for sid, _ in pairs}


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """Another random tiny HF checkpoint: same architecture, other weights."""
    return oracles.make_hf_checkpoint(tmp_path_factory.mktemp("hf_other"), **oracles.TINY, seed=5)


@pytest.fixture(scope="module")
def corrupt_checkpoints(tmp_path_factory, ckpt):
    root = tmp_path_factory.mktemp("corrupt")
    truncated, bad_json = root / "truncated", root / "bad_json"
    shutil.copytree(ckpt, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copytree(ckpt, bad_json)
    (bad_json / "config.json").write_text('{"format": "esm2lite-finetuned", ')
    return {"truncated": str(truncated), "bad_json": str(bad_json)}


def bad_cases(tmp, run, corrupt):
    """(name, argv, substring of the one-line error)."""
    (tmp / "empty.csv").write_text("")
    (tmp / "header_only.csv").write_text("sequence\n")
    (tmp / "bad_residue.fasta").write_text(">a\nMKT\n>b\nGSH\n>c\nMKJLA\n")
    (tmp / "no_header.fasta").write_text("MKTAYIAKQR\n")
    (tmp / "outdir").mkdir()
    r, test = run["run"], run["test"]
    return [
        ("missing input", ["--run", r, "--input", tmp / "nope.csv"], "no such file"),
        ("empty input", ["--run", r, "--input", tmp / "empty.csv"], "empty file"),
        ("header only", ["--run", r, "--input", tmp / "header_only.csv"], "no data rows"),
        ("bad residue", ["--run", r, "--input", tmp / "bad_residue.fasta"], "record 3 ('c'), line 6: unknown residue 'J'"),
        ("bad residue in csv", ["--run", r, "--input", run["train"], "--sequence-column", "target"],
         "row 2, column 'target'"),
        ("missing column", ["--run", r, "--input", test, "--sequence-column", "seq"], "no column 'seq'"),
        ("missing checkpoint", ["--checkpoint", tmp / "nope", "--input", test], "not found"),
        ("run without best", ["--run", tmp, "--input", test], "no best/"),
        ("truncated weights", ["--checkpoint", corrupt["truncated"], "--input", test], "corrupt or truncated"),
        ("corrupt config", ["--checkpoint", corrupt["bad_json"], "--input", test], "not valid JSON"),
        ("base path missing", ["--run", r, "--base-path", tmp / "gone", "--input", test], "/gone"),
        ("too long", ["--run", r, "--input", test, "--max-residues", "10"], "more than the maximum 10"),
        ("no model", ["--input", test], "exactly one of --run"),
        ("two models", ["--run", r, "--checkpoint", r, "--input", test], "exactly one of --run"),
        ("no input", ["--run", r], "--input is required"),
        ("unknown option", ["--run", r, "--input", test, "--frobnicate"], "unrecognized arguments"),
        ("base with head output", ["--base", run["base"], "--input", test], "--base has no task head"),
    ]


def test_bad_input_gives_one_line_and_no_output(tmp_path, run, corrupt_checkpoints, cli, capsys):
    for name, argv, match in bad_cases(tmp_path, run, corrupt_checkpoints):
        out, emb = tmp_path / f"{name}.csv", tmp_path / f"{name}.safetensors"
        code, _, err = infer_in_process(cli, capsys, *argv, "--output", out, "--embeddings", emb)
        assert code == 2, (name, err)
        assert_one_line_error(code, err, out, emb, match=match)


def test_output_that_is_a_directory_is_refused_before_any_work(tmp_path, run, cli, capsys):
    code, _, err = infer_in_process(cli, capsys, "--run", run["run"], "--input", run["test"], "--output", tmp_path)
    assert_one_line_error(code, err, match="is a directory")


def test_checkpoint_for_another_base_model(run, other_base, tmp_path, forkrun):
    """A separate process: exit code 2, one line naming the sha256 mismatch, nothing written."""
    out = tmp_path / "preds.csv"
    r = forkrun.run([INFER, "--run", run["run"], "--base-path", other_base, "--input", run["test"], "--output", out])
    assert_one_line_error(r.returncode, r.stderr, out, match="sha256")
    assert "another base model" in r.stderr
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- the demo


@pytest.mark.slow
def test_demo_trains_if_needed_then_predicts(tmp_path, forkrun):
    """`python infer.py` in an empty directory: trains runs/demo (python train.py, whose loss
    falls), then predicts the demo FASTA with runs/demo/best, prints a table and writes
    runs/demo/predictions.csv."""
    r = forkrun.run([INFER], cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training the demo first" in r.stdout and "demo run written to runs/demo/" in r.stdout
    demo = tmp_path / "runs" / "demo"
    losses = [x["loss"] for x in map(json.loads, open(demo / "metrics.jsonl")) if x["split"] == "train"]
    assert losses[-1] < 0.5 * losses[0], losses
    assert json.load(open(demo / "summary.json"))["best_step"] is not None
    assert (demo / "best" / "model.safetensors").exists()
    ids = [sid for sid, _ in read_sequences(str(ROOT / "esm2lite" / "demo" / "predict.fasta"))]
    rows = read_preds(demo / "predictions.csv")
    assert [row["id"] for row in rows] == ids
    truth = [float(line.rsplit(" ", 1)[1]) for line in (ROOT / "esm2lite" / "demo" / "predict.fasta").read_text()
             .splitlines() if line.startswith(">")]  # each description ends with the sequence's true GRAVY
    predicted = [float(row["prediction"]) for row in rows]
    order = lambda values: sorted(range(len(values)), key=values.__getitem__)  # noqa: E731
    assert order(predicted) == order(truth), (predicted, truth)  # it learned: the new sequences rank as GRAVY does
    table = [line for line in r.stdout.splitlines() if line.strip().split(" ")[0] in ids]
    assert len(table) == len(ids) and "the predictions rank the sequences as their true GRAVY does" in r.stdout
    valid = [x for x in map(json.loads, open(demo / "metrics.jsonl")) if x["split"] == "valid"]
    assert valid[-1]["loss"] < 0.2 * valid[0]["loss"] and valid[-1]["r2"] > 0.9, valid  # on held-out sequences
    # a second run reuses the trained model
    r2 = forkrun.run([INFER], cwd=tmp_path)
    assert r2.returncode == 0 and "training the demo first" not in r2.stdout
    assert read_preds(demo / "predictions.csv") == rows
