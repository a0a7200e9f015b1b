"""train.py's command line, in-process (the same parser, main and error handling as `python
train.py`, without a torch import per case): mistakes that used to give a silent wrong result or an
unhelpful message, BioNeMo's LoRA options, and what a run tells its user.

Every refused input must give exit status 2, one line on stderr naming the file / row / column or
the option, the fix, and leave nothing behind (--out not created)."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

import oracles
from esm2lite.commands import export
from esm2lite.cli import run_main

ROOT = Path(__file__).resolve().parents[2]
SEQS = oracles.random_sequences(24, 15, 40, seed=21, with_mask=False)


@pytest.fixture(scope="module")
def train_main():
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def write(path, header, rows, sep=","):
    Path(path).write_text("\n".join([sep.join(header)] + [sep.join(map(str, r)) for r in rows]) + "\n")
    return str(path)


def regression_rows(split=None):
    return [[s, round(len(s) / 100, 2)] + ([split(i)] if split else []) for i, s in enumerate(SEQS)]


def run(train_main, capsys, *argv):
    """(exit status, stdout, stderr) of train.py with these arguments."""
    capsys.readouterr()
    try:
        code = run_main(train_main, [str(a) for a in argv])
    except SystemExit as e:  # usage errors: argparse exits itself
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def refused(train_main, capsys, tmp_path, argv, *fragments):
    """Exit 2, one line on stderr holding every fragment (in that order), no --out left."""
    out_dir = tmp_path / "out"
    code, _, err = run(train_main, capsys, *argv, "--out", out_dir, "--steps", "1", "--device", "cpu")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert re.search(".*".join(map(re.escape, fragments)), lines[0]), lines[0]
    assert not out_dir.exists()
    return lines[0]


# ---------------------------------------------------------------- silent wrong results, refused


def test_train_file_with_a_split_column_is_refused_with_the_fix(train_main, capsys, tmp_path, hf_tiny):
    data = write(tmp_path / "all.csv", ["sequence", "target", "split"],
                 regression_rows(lambda i: ["train", "valid", "test"][i % 3]))
    refused(train_main, capsys, tmp_path, ["--train-csv", data, "--checkpoint", hf_tiny],
            data, "row 3", "column 'split'", "'valid'", f"--csv {data}")
    refused(train_main, capsys, tmp_path, ["--train-csv", data, "--split-column", "fold", "--checkpoint", hf_tiny],
            "--split-column fold", "--csv FILE --split-column fold")
    renamed = write(tmp_path / "folds.csv", ["sequence", "target", "fold"],
                    regression_rows(lambda i: ["train", "test"][i % 2]))
    refused(train_main, capsys, tmp_path, ["--train-csv", renamed, "--split-column", "fold", "--checkpoint", hf_tiny],
            "--split-column fold", "--csv FILE")


def test_best_metric_without_a_validation_split_is_refused(train_main, capsys, tmp_path, hf_tiny):
    data = write(tmp_path / "train.csv", ["sequence", "target"], regression_rows())
    refused(train_main, capsys, tmp_path, ["--train-csv", data, "--checkpoint", hf_tiny, "--best-metric", "spearman"],
            "--best-metric spearman", "no validation split", "--valid-csv")


# ---------------------------------------------------------------- mistakes that name their fix


def test_text_in_a_regression_target_names_the_classification_tasks(train_main, capsys, tmp_path, hf_tiny):
    rows = [[s, "H" * len(s)] for s in SEQS]
    data = write(tmp_path / "ss.csv", ["sequence", "target"], rows)
    refused(train_main, capsys, tmp_path, ["--train-csv", data, "--checkpoint", hf_tiny],
            data, "row 2", "column 'target'", "is not a number", "--task classification",
            "--task token-classification")


def test_tab_separated_file_named_csv_says_rename_it(train_main, capsys, tmp_path, hf_tiny):
    data = write(tmp_path / "train.csv", ["sequence", "target"], regression_rows(), sep="\t")
    refused(train_main, capsys, tmp_path, ["--train-csv", data, "--checkpoint", hf_tiny],
            data, "row 1", "tab-separated", ".tsv")
    tsv = tmp_path / "train.tsv"
    shutil.copy(data, tsv)  # the fix it names works (read as tab-separated)
    from esm2lite.data.reading import load_splits
    from esm2lite.data.records import DataSpec
    assert [r.sequence for r in load_splits(DataSpec(), train=str(tsv))["train"]] == SEQS


def test_stop_codon_inside_a_sequence_says_where_it_is_accepted(train_main, capsys, tmp_path, hf_tiny):
    rows = regression_rows()
    rows[3][0] = rows[3][0][:5] + "*" + rows[3][0][5:]
    data = write(tmp_path / "train.csv", ["sequence", "target"], rows)
    refused(train_main, capsys, tmp_path, ["--train-csv", data, "--checkpoint", hf_tiny],
            data, "row 5", "column 'sequence'", "'*' at position 6", "only at the end")


def test_lora_options_that_cannot_apply_are_refused(train_main, capsys, tmp_path, hf_tiny):
    data = write(tmp_path / "train.csv", ["sequence", "target"], regression_rows())
    common = ["--train-csv", data, "--checkpoint", hf_tiny]
    refused(train_main, capsys, tmp_path, [*common, "--lora-layers", "0", "2"],  # the tiny model has blocks 0, 1
            "--lora-layers", "[2] out of range 0..1", "count from 0", "layer_selection counts from 1")
    refused(train_main, capsys, tmp_path, [*common, "--lora-init-a", "uniform"], "--lora-init-a", "'uniform'")
    refused(train_main, capsys, tmp_path, [*common, "--mode", "full", "--lora-rank", "4"],
            "--lora-* options only apply to --mode lora")


def option_blocks(help_text: str) -> list[str]:
    """argparse's help, one string per option: its flags, metavar and description."""
    blocks = []
    for line in help_text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            blocks.append(line.strip())
        elif line.startswith("    ") and blocks:
            blocks[-1] += " " + line.strip()
    return blocks


def test_help_describes_every_option_once_with_one_default(train_main, capsys):
    with pytest.raises(SystemExit):
        run_main(train_main, ["--help"])
    text = capsys.readouterr().out
    blocks = option_blocks(text)
    assert len(blocks) > 40
    for block in blocks:
        description = [w for w in block.split() if not (w.startswith("-") or w.isupper() or w.startswith("{"))]
        assert any(re.fullmatch(r"[a-z]{3,}\W*", w) for w in description), f"no description: {block!r}"
        assert block.count("(default") <= 1, block
    flags = {block.split()[0].rstrip(","): block for block in blocks}
    for flag in ("--lora-layers", "--lora-init-a", "--lora-init-b", "--lora-tie-weights", "--resume"):
        assert flag in flags, flag
    assert "(default: 0.0)" in flags["--lora-dropout"]  # a default of 0 is shown too
    assert "counted from 0" in flags["--lora-layers"] and "layer_selection counts from 1" in flags["--lora-layers"]
    assert "xavier" in flags["--lora-init-a"] and "column_init_method" in flags["--lora-init-a"]


# ---------------------------------------------------------------- runs that go through


def test_bionemo_lora_options_reach_the_checkpoint(train_main, capsys, tmp_path, hf_tiny):
    """--lora-layers 0 1 --lora-init-a xavier --lora-init-b normal --lora-tie-weights: the run's
    adapters follow them; a split column that says 'train' on every row of the train file is fine;
    a trailing '*' is dropped; --resume on an empty --out says it starts at step 0; no validation
    split: the last step is kept, and said."""
    rows = regression_rows(lambda i: "train")
    rows[0][0] += "*"
    data = write(tmp_path / "train.csv", ["sequence", "target", "split"], rows)
    base = tmp_path / "base"
    shutil.copytree(hf_tiny, base)
    out = tmp_path / "run"
    code, stdout, err = run(train_main, capsys, "--train-csv", data, "--checkpoint", base, "--steps", "2",
                            "--batch-tokens", "400", "--lora-rank", "2", "--lora-layers", "0", "1",
                            "--lora-init-a", "xavier", "--lora-init-b", "normal", "--lora-tie-weights",
                            "--device", "cpu", "--out", out, "--resume")
    assert code == 0, err
    assert f"--resume: {out} holds no checkpoint to continue from; starting at step 0" in stdout
    assert "no validation split, so best/ will hold the last step" in stdout
    assert "best step 2 (the last step: no validation split)" in stdout
    lora = json.load(open(out / "best" / "config.json"))["lora"]
    assert (lora["layers"], lora["init_a"], lora["init_b"], lora["tie_weights"]) == ([0, 1], "xavier", "normal", True)
    adapters = [k for k in load_file(out / "best" / "model.safetensors") if k.startswith("encoder.")]
    assert len(adapters) == 12 and all(k.startswith("encoder.layers.0.") for k in adapters)  # tied: one pair
    assert json.load(open(out / "summary.json"))["best_step"] == 2

    # the base model moved: loading the run names --base-path (through esm2lite-export)
    base.rename(tmp_path / "moved")
    capsys.readouterr()
    assert run_main(export.main, ["--run", str(out), "--merged", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert str(base) in err and "--base-path" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "merged").exists()
    assert run_main(export.main, ["--run", str(out), "--merged", str(tmp_path / "merged"),
                                  "--base-path", str(tmp_path / "moved")]) == 0


def test_token_classification_warns_of_an_unused_mask_column(train_main, capsys, tmp_path, hf_tiny):
    rows = [[s, "".join("H" if c in "AELK" else "C" for c in s), "1" * (len(s) - 2) + "00"] for s in SEQS]
    data = write(tmp_path / "ss.csv", ["sequence", "labels", "resolved"], rows)
    common = ["--train-csv", data, "--task", "token-classification", "--target-column", "labels",
              "--checkpoint", hf_tiny, "--steps", "1", "--batch-tokens", "400", "--device", "cpu"]
    code, stdout, err = run(train_main, capsys, *common, "--out", tmp_path / "a")
    assert code == 0, err
    warning = [line for line in stdout.splitlines() if "WARNING" in line]
    assert len(warning) == 1 and data in warning[0] and "'resolved'" in warning[0], stdout
    assert "pass --mask-column resolved" in warning[0]
    code, stdout, err = run(train_main, capsys, *common, "--mask-column", "resolved", "--out", tmp_path / "b")
    assert code == 0 and "mask" not in stdout.lower(), stdout


def test_infer_run_and_checkpoint_mixed_up_name_the_fix(train_main, capsys, tmp_path, hf_tiny):
    """infer.py --run RUN/best and --checkpoint RUN: one line each that says what to write."""
    spec = importlib.util.spec_from_file_location("infer_cli", ROOT / "infer.py")
    infer_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer_cli)
    data = write(tmp_path / "train.csv", ["sequence", "target"], regression_rows())
    run_dir = tmp_path / "run"
    code, _, err = run(train_main, capsys, "--train-csv", data, "--checkpoint", hf_tiny, "--steps", "1",
                       "--batch-tokens", "400", "--device", "cpu", "--out", run_dir)
    assert code == 0, err
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">a\nMKTAYIAKQR\n")
    for source, fix in ((["--run", run_dir / "best"], f"write --checkpoint {run_dir / 'best'}"),
                        (["--checkpoint", run_dir], f"write --run {run_dir} (or --checkpoint {run_dir / 'best'})")):
        code, _, err = run(infer_cli.main, capsys, *source, "--input", fasta, "--output", tmp_path / "p.csv")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and fix in lines[0], err
        assert not (tmp_path / "p.csv").exists()
    code, _, err = run(infer_cli.main, capsys, "--checkpoint", run_dir / "best", "--input", fasta,
                       "--output", tmp_path / "p.csv", "--device", "cpu")
    assert code == 0 and (tmp_path / "p.csv").exists(), err
