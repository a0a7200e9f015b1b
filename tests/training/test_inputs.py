"""The identity of what a run reads (esm2lite/training/inputs.py) and the one-line errors of lost ranks
(distributed.lost_rank), as pure functions. The commands that use them are tested through the real
train.py / infer.py / export in test_bad_input.py, test_interrupt.py and test_distributed.py."""

import os

import pytest

from esm2lite.model.config import ESM2Config
from esm2lite.runtime.distributed import lost_rank
from esm2lite.errors import DataError
from esm2lite.training.inputs import DataFiles, data_changes, rank_disagreement

SHA_A, SHA_B = "a" * 64, "b" * 64


def split(file, sha, rows):
    return {"file": file, "sha256": sha, "rows": rows}


def test_data_changes_name_the_file_and_what_changed():
    was = {"train": split("all.csv", SHA_A, 30), "valid": split("all.csv", SHA_A, 10)}
    assert data_changes(was, dict(was)) == []
    now = {"train": split("all.csv", SHA_B, 29), "valid": split("all.csv", SHA_B, 10)}
    assert data_changes(was, now) == [("all.csv", "sha256 aaaaaaaaaaaa..., train 30 rows, valid 10 rows",
                                       "sha256 bbbbbbbbbbbb..., train 29 rows, valid 10 rows")]
    # a file that holds one split: its rows alone
    assert data_changes({"train": split("t.csv", SHA_A, 5)}, {"train": split("t.csv", SHA_B, 4)}) == [
        ("t.csv", "sha256 aaaaaaaaaaaa..., 5 rows", "sha256 bbbbbbbbbbbb..., 4 rows")]


def test_what_cannot_be_hashed_is_compared_by_its_rows():
    """A pipe (or records in memory) has no sha256: the same rows are the same input, other rows are not."""
    assert data_changes({"train": split("/dev/fd/63", None, 5)}, {"train": split("/dev/fd/63", None, 5)}) == []
    assert data_changes({"train": split(None, None, 5)}, {"train": split(None, None, 6)}) == [
        ("the train records (in memory)", "5 rows", "6 rows")]


def identity(lr=4e-4, sha=SHA_A, rows=30, token_dropout=True):
    return {"options": {"lr": lr, "out": "runs/x"}, "data": {"train": split("d.csv", SHA_A, rows)},
            "base": {"sha256": sha, "config": ESM2Config(num_layers=2, d_model=64, num_heads=4, ffn_dim=256,
                                                         token_dropout=token_dropout)}}


def test_ranks_that_disagree_are_named_with_what_differs():
    assert rank_disagreement([identity(), identity(), identity()]) is None
    line = rank_disagreement([identity(), identity(rows=29), identity(lr=1e-3, sha=SHA_B, token_dropout=False)])
    assert "\n" not in line and line.startswith("the ranks did not read the same inputs: ")
    assert "rank 1's d.csv differs from rank 0's (rank 0: sha256 aaaaaaaaaaaa..., 30 rows; rank 1: " \
           "sha256 aaaaaaaaaaaa..., 29 rows)" in line
    assert "rank 2's setting lr differs from rank 0's (rank 0: 0.0004; rank 2: 0.001)" in line
    assert "rank 2's base model differs from rank 0's (rank 0: encoder weights sha256 aaaaaaaaaaaa...; " \
           "rank 2: encoder weights sha256 bbbbbbbbbbbb...)" in line
    assert "rank 2's base model differs from rank 0's (rank 0: config token_dropout True; rank 2: config " \
           "token_dropout False)" in line
    five = rank_disagreement([identity(), identity(rows=29), identity(lr=1e-3, sha=SHA_B, token_dropout=False, rows=1)])
    assert five.count("differs from rank 0's") == 4 and "; ... (1 more);" in five  # at most four shown


def test_a_data_file_touched_passes_and_one_edited_or_removed_is_named(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("sequence,target\nMKV,1\n")
    files = DataFiles({"train": str(path), "valid": None})
    assert files.identify({"train": [object()]}) == {"train": split(str(path), files.sums[str(path)], 1)}
    os.utime(path, ns=(1, 1))  # touched: the stat moved, the bytes did not
    files.check()
    path.write_text("sequence,target\nMKV,2\n")
    with pytest.raises(DataError, match=rf"^{path}: changed while this run was using it \(sha256 .* when read, "):
        files.check()
    path.unlink()
    with pytest.raises(DataError, match="gone or no longer a regular file now"):
        files.check()


def test_a_lost_rank_is_one_line_naming_it(monkeypatch):
    closed = RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [::1]:4")
    silent = RuntimeError("[third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms "
                          "for recv operation to complete")
    assert lost_rank(closed, 60) is None  # one process: not ours to explain
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert str(lost_rank(closed, 60)).startswith("rank 0: rank 1 ended (its connection closed)")
    assert str(lost_rank(silent, 60)).startswith("rank 0: rank 1 stopped responding (no message from it within "
                                                 "--dist-timeout 60 s")
    assert lost_rank(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), 60) is None  # a bug stays a bug
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert str(lost_rank(closed, 60)).startswith("rank 0: another rank ended")
