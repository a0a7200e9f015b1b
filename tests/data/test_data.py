"""Reading labelled CSVs and FASTA files, encoding targets, batching.

Error tests check the message names the file, the spreadsheet row (header = 1) and the
column; expected values are written out by hand."""

import math
import re
from pathlib import Path

import pytest
import torch

from esm2lite.data.batching import collate, make_batches
from esm2lite.demo import make_data
from esm2lite.tasks.labels import LabelSpace
from esm2lite.data.reading import load_splits, read_fasta, read_sequences
from esm2lite.data.records import DataSpec, records_from_pairs
from esm2lite.errors import DataError

DEMO = Path(__file__).resolve().parents[2] / "esm2lite" / "demo"


def write(tmp_path, name, text, encoding="utf-8", newline="\n"):
    p = tmp_path / name
    p.write_bytes(text.replace("\n", newline).encode(encoding))
    return str(p)


def error(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------ regression CSV

def test_regression_csv_basic(tmp_path):
    p = write(tmp_path, "train.csv", "sequence,target\nMKV,1.5\nacdE,-2e-1\n")
    out = load_splits(DataSpec(), train=p)
    assert list(out) == ["train"]
    r = out["train"]
    assert [x.sequence for x in r] == ["MKV", "acdE"]
    assert r[0].tokens == [0, 20, 15, 7, 2]  # cls M K V eos (fair-esm ids)
    assert r[1].tokens == [0, 5, 23, 13, 9, 2]  # lowercase accepted
    assert r[0].target == (1.5,) and r[1].target == (-0.2,)
    assert (r[0].row, r[1].row) == (2, 3) and r[0].source == p and r[0].mask is None


def test_bom_and_crlf_accepted(tmp_path):
    text = "sequence,target\nMKV,1\nLLA,2\n"
    p = write(tmp_path, "train.csv", "\ufeff" + text, newline="\r\n")
    r = load_splits(DataSpec(), train=p)["train"]
    assert [x.sequence for x in r] == ["MKV", "LLA"] and [x.target for x in r] == [(1.0,), (2.0,)]


@pytest.mark.parametrize("value,fragment", [
    ("abc", "'abc' is not a number"), ("nan", "not a finite number"),
    ("inf", "not a finite number"), ("-Infinity", "not a finite number"),
    ("", "empty value")])
def test_bad_regression_target(tmp_path, value, fragment):
    p = write(tmp_path, "train.csv", f"sequence,target\nMKV,1\nMKV,2\nMKV,{value}\n")
    msg = error(load_splits, DataSpec(), train=p)
    assert msg.startswith(f"{p}, row 4, column 'target': ")
    assert fragment in msg


def test_several_regression_targets(tmp_path):
    p = write(tmp_path, "train.csv", "sequence,a,b\nMKV,1,2\nLL,3,x\n")
    spec = DataSpec(target_columns=("a", "b"))
    msg = error(load_splits, spec, train=p)
    assert msg.startswith(f"{p}, row 3, column 'b': 'x' is not a number; ") and "--task classification" in msg
    p = write(tmp_path, "ok.csv", "sequence,a,b\nMKV,1,2\nLL,3,4\n")
    assert [r.target for r in load_splits(spec, train=p)["train"]] == [(1.0, 2.0), (3.0, 4.0)]


def test_unknown_residue_names_file_row_column_position(tmp_path):
    p = write(tmp_path, "train.csv", "sequence,target\nMKV,1\nMKV,1\nMKV,1\nMKVJA,2\n")
    assert error(load_splits, DataSpec(), train=p) == \
        f"{p}, row 5, column 'sequence': unknown residue 'J' at position 4"


def test_empty_sequence(tmp_path):
    p = write(tmp_path, "train.csv", "sequence,target\n,1\n")
    msg = error(load_splits, DataSpec(), train=p)
    assert msg.startswith(f"{p}, row 2, column 'sequence': ") and "empty" in msg


def test_missing_column_lists_available(tmp_path):
    p = write(tmp_path, "train.csv", "seq,label,split\nMKV,1,train\n")
    msg = error(load_splits, DataSpec(), train=p)
    assert p in msg and "'sequence'" in msg
    for col in ("seq", "label", "split"):
        assert f"'{col}'" in msg


def test_duplicate_column_names(tmp_path):
    p = write(tmp_path, "train.csv", "sequence,target,target\nMKV,1,2\n")
    msg = error(load_splits, DataSpec(), train=p)
    assert p in msg and "row 1" in msg and "'target'" in msg and "more than once" in msg


@pytest.mark.parametrize("content,fragment", [
    (b"", "empty"), (b"\n\n  \n", "empty"), (b"sequence,target\n", "no data rows"),
    (b"sequence,target\r\n\r\n", "no data rows"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a text file"),
    (b"sequence,target\nMKV,1\nMK\xe9V,2\n", "not UTF-8")])
def test_unreadable_files(tmp_path, content, fragment):
    p = tmp_path / "train.csv"
    p.write_bytes(content)
    msg = error(load_splits, DataSpec(), train=str(p))
    assert msg.startswith(str(p)) and fragment in msg


def test_missing_file(tmp_path):
    p = str(tmp_path / "nope.csv")
    assert p in error(load_splits, DataSpec(), train=p)


def test_wrong_number_of_fields(tmp_path):
    p = write(tmp_path, "train.csv", "sequence,target\nMKV,1\nMKV\n")
    msg = error(load_splits, DataSpec(), train=p)
    assert msg.startswith(f"{p}, row 3") and "'target'" in msg


def test_blank_lines_keep_editor_row_numbers(tmp_path):
    p = write(tmp_path, "train.csv", "sequence,target\nMKV,1\n\nMKV,x\n")
    assert error(load_splits, DataSpec(), train=p).startswith(f"{p}, row 4, column 'target'")


def test_too_long_and_truncation(tmp_path):
    p = write(tmp_path, "train.csv", "sequence,target\nMKVLA,1\nMKVLAGG,2\n")
    msg = error(load_splits, DataSpec(max_residues=6), train=p)
    assert msg.startswith(f"{p}, row 3, column 'sequence': ") and "7 residues" in msg and "6" in msg
    r = load_splits(DataSpec(max_residues=6, truncate=True), train=p)["train"]
    assert r[1].tokens == [0, 20, 15, 7, 4, 5, 6, 2]  # cls M K V L A G eos
    assert r[0].tokens == [0, 20, 15, 7, 4, 5, 2]


# ------------------------------------------------------------------ splits

def test_split_column(tmp_path):
    p = write(tmp_path, "data.csv", "sequence,target,split\nMKV,1,train\nLLA,2,Validation\n"
                                    "AAA,3,test\nGGG,4,train\nCC,5,val\n")
    out = load_splits(DataSpec(split_column="split"), csv=p)
    assert {k: [r.sequence for r in v] for k, v in out.items()} == {
        "train": ["MKV", "GGG"], "valid": ["LLA", "CC"], "test": ["AAA"]}
    assert [r.row for r in out["valid"]] == [3, 6]


def test_split_column_bad_value_and_missing_train(tmp_path):
    p = write(tmp_path, "data.csv", "sequence,target,split\nMKV,1,train\nLLA,2,holdout\n")
    msg = error(load_splits, DataSpec(split_column="split"), csv=p)
    assert msg.startswith(f"{p}, row 3, column 'split': ") and "'holdout'" in msg
    p = write(tmp_path, "data2.csv", "sequence,target,split\nMKV,1,valid\n")
    assert error(load_splits, DataSpec(split_column="split"), csv=p) == \
        f"{p}: split 'train' has no rows"


def test_split_column_only_present_splits(tmp_path):
    p = write(tmp_path, "data.csv", "sequence,target,split\nMKV,1,train\nLLA,2,test\n")
    assert set(load_splits(DataSpec(split_column="split"), csv=p)) == {"train", "test"}


def test_every_split_is_validated(tmp_path):
    p = write(tmp_path, "data.csv", "sequence,target,split\nMKV,1,train\nLLA,2,test\nLLB,x,test\n")
    assert error(load_splits, DataSpec(split_column="split"), csv=p).startswith(
        f"{p}, row 4, column 'target'")


def test_per_split_files(tmp_path):
    tr = write(tmp_path, "train.csv", "sequence,target\nMKV,1\n")
    va = write(tmp_path, "valid.csv", "sequence,target\nLLA,2\nLLC,3\n")
    te = write(tmp_path, "test.csv", "sequence,target\n")
    out = load_splits(DataSpec(), train=tr, valid=va)
    assert list(out) == ["train", "valid"] and len(out["valid"]) == 2
    assert out["valid"][1].source == va and out["valid"][1].row == 3
    assert error(load_splits, DataSpec(), train=tr, valid=va, test=te) == f"{te}: no data rows"
    bad = write(tmp_path, "valid_bad.csv", "sequence,target\nLLA,2\nLLZJ,3\n")
    assert error(load_splits, DataSpec(), train=tr, valid=bad) == \
        f"{bad}, row 3, column 'sequence': unknown residue 'J' at position 4"
    with pytest.raises(DataError):
        load_splits(DataSpec(), valid=va)  # train is required


def test_demo_data(tmp_path):
    """demo.csv: 96 train and 24 held-out valid rows, each target the sequence's GRAVY, checked against
    the Kyte-Doolittle scale written out here (Kyte & Doolittle 1982, Table 2); predict.fasta: five
    sequences, their GRAVY in the description. make_data.py rewrites both files exactly."""
    kd = dict(zip("ARNDCQEGHILKMFPSTWYV", (1.8, -4.5, -3.5, -3.5, 2.5, -3.5, -3.5, -0.4, -3.2, 4.5, 3.8, -3.9, 1.9,
                                           2.8, -1.6, -0.8, -0.7, -0.9, -1.3, 4.2)))
    out = load_splits(DataSpec(split_column="split"), csv=str(DEMO / "demo.csv"))
    assert len(out["train"]) == 96 and len(out["valid"]) == 24 and "test" not in out
    assert not {r.sequence for r in out["train"]} & {r.sequence for r in out["valid"]}
    for r in out["train"] + out["valid"]:
        assert r.target[0] == pytest.approx(sum(kd[c] for c in r.sequence) / len(r.sequence), abs=5e-5)  # 4 decimals
    fasta = read_fasta(str(DEMO / "predict.fasta"))
    assert len(fasta) == 5 and len({len(s) for _, s in fasta}) == 5
    headers = [line for line in (DEMO / "predict.fasta").read_text().splitlines() if line.startswith(">")]
    for (_, seq), header in zip(fasta, headers):
        assert header.endswith(f"GRAVY {sum(kd[c] for c in seq) / len(seq):.2f}")
    make_data.main(str(tmp_path))
    for name in ("demo.csv", "predict.fasta"):
        assert (tmp_path / name).read_bytes() == (DEMO / name).read_bytes()


def test_bionemo_tutorial_data():
    """README Walkthrough 1: BioNeMo's ten sequences, target length / 100, validated on themselves."""
    out = load_splits(DataSpec(split_column="split"), csv=str(DEMO / "bionemo_tutorial.csv"))
    assert len(out["train"]) == len(out["valid"]) == 10 and "test" not in out
    for r in out["train"]:
        assert math.isclose(r.target[0], len(r.sequence) / 100)
    assert [r.sequence for r in out["train"]] == [r.sequence for r in out["valid"]]
    fasta = read_fasta(str(DEMO / "bionemo_tutorial.fasta"))
    assert len(fasta) == 4 and len({len(s) for _, s in fasta}) == 4


# ------------------------------------------------------------------ classification

def test_classification_labels(tmp_path):
    tr = write(tmp_path, "train.csv", "sequence,label\nMKV,soluble\nLLA,insoluble\nGG,soluble\n")
    va = write(tmp_path, "valid.csv", "sequence,label\nMKV,soluble\nAA,membrane\n")
    spec = DataSpec(task="classification", target_columns=("label",))
    out = load_splits(spec, train=tr, valid=va)
    ls = LabelSpace.fit("classification", out["train"], ["label"])
    assert ls.classes == ["insoluble", "soluble"] and ls.num_outputs == 2
    assert ls.encode(out["train"]).tolist() == [1, 0, 1]
    assert error(ls.check, out["valid"]) .startswith(f"{va}, row 3, column 'label': ")
    assert "'membrane'" in error(ls.check, out["valid"])
    assert ls.decode(torch.tensor([[0.1, 2.0], [3.0, -1.0]])) == ["soluble", "insoluble"]
    empty = write(tmp_path, "e.csv", "sequence,label\nMKV,\n")
    assert error(load_splits, spec, train=empty).startswith(f"{empty}, row 2, column 'label'")


# ------------------------------------------------------------------ token classification

def test_token_labels_and_mask_alignment(tmp_path):
    p = write(tmp_path, "train.csv", "sequence,ss,resolved\nMKVL,HHEC,1101\nAG,CE,11\n")
    spec = DataSpec(task="token-classification", target_columns=("ss",), mask_column="resolved")
    r = load_splits(spec, train=p)["train"]
    assert r[0].target == "HHEC" and r[0].mask == "1101"
    ls = LabelSpace.fit("token-classification", r, ["ss"])
    assert ls.classes == ["C", "E", "H"]
    y = ls.encode(r)
    # by hand: classes C=0 E=1 H=2; position 0 = cls; residue i at i+1; mask 0 and eos/pad -100
    assert y.tolist() == [[-100, 2, 2, -100, 0, -100],
                          [-100, 0, 1, -100, -100, -100]]
    batch = collate(r, ls)
    assert batch.tokens.tolist() == [[0, 20, 15, 7, 4, 2], [0, 5, 6, 2, 1, 1]]
    assert batch.lengths.tolist() == [6, 4] and batch.offsets.tolist() == [0, 6, 10]
    assert torch.equal(batch.target, y)
    logits = torch.nn.functional.one_hot(torch.tensor([[0, 2, 2, 1, 0, 0], [0, 0, 1, 0, 0, 0]]), 3).float()
    assert ls.decode(logits, tokens=batch.tokens) == ["HHEC", "CE"]
    assert ls.decode(logits, lengths=[4, 2]) == ["HHEC", "CE"]


def test_token_label_with_mask_token(tmp_path):
    recs = records_from_pairs([("MK<mask>L", "HHEC"), ("AG", "CE")], task="token-classification")
    assert recs[0].tokens == [0, 20, 15, 32, 4, 2]
    ls = LabelSpace.fit("token-classification", recs, ["target"])
    assert ls.encode(recs)[0].tolist() == [-100, 2, 2, 1, 0, -100]


def test_token_label_errors(tmp_path):
    spec = DataSpec(task="token-classification", target_columns=("ss",), mask_column="resolved")
    p = write(tmp_path, "a.csv", "sequence,ss,resolved\nMKVL,HHEC,1111\nMKVL,HHE,1111\n")
    msg = error(load_splits, spec, train=p)
    assert msg.startswith(f"{p}, row 3, column 'ss': ") and "3" in msg and "4" in msg
    p = write(tmp_path, "b.csv", "sequence,ss,resolved\nMKVL,HHEC,111\n")
    msg = error(load_splits, spec, train=p)
    assert msg.startswith(f"{p}, row 2, column 'resolved': ") and "3" in msg and "4" in msg
    p = write(tmp_path, "c.csv", "sequence,ss,resolved\nMKVL,HHEC,1121\n")
    msg = error(load_splits, spec, train=p)
    assert msg.startswith(f"{p}, row 2, column 'resolved': ") and "'2'" in msg and "position 3" in msg
    tr = write(tmp_path, "t.csv", "sequence,ss,resolved\nMKVL,HHEC,1111\nMKVL,HHQC,1101\n")
    va = write(tmp_path, "v.csv", "sequence,ss,resolved\nMKVL,HHEC,1111\nMKVL,HHQC,1111\n")
    out = load_splits(spec, train=tr, valid=va)
    ls = LabelSpace.fit("token-classification", out["train"], ["ss"])
    assert ls.classes == ["C", "E", "H"]  # Q only at a mask-0 position: not a class
    msg = error(ls.check, out["valid"])
    assert msg.startswith(f"{va}, row 3, column 'ss': ") and "'Q'" in msg and "position 3" in msg


def test_token_truncation_cuts_labels_and_mask(tmp_path):
    p = write(tmp_path, "a.csv", "sequence,ss,m\nMKVLAG,HHECCE,110111\n")
    spec = DataSpec(task="token-classification", target_columns=("ss",), mask_column="m",
                    max_residues=4, truncate=True)
    r = load_splits(spec, train=p)["train"][0]
    assert (r.tokens, r.target, r.mask) == ([0, 20, 15, 7, 4, 2], "HHEC", "1101")


# ------------------------------------------------------------------ label space

def test_regression_standardisation_roundtrip():
    recs = records_from_pairs([("MKV", (1.0, 10.0)), ("LL", (3.0, 10.0)), ("AA", (5.0, 10.0))])
    ls = LabelSpace.fit("regression", recs, ["a", "b"], standardize=True)
    sd = math.sqrt(8 / 3)  # population std of 1, 3, 5
    assert ls.mean == [3.0, 10.0] and math.isclose(ls.std[0], sd) and ls.std[1] == 1.0
    y = ls.encode(recs)
    assert y.dtype == torch.float32 and y.shape == (3, 2)
    assert torch.allclose(y[:, 0], torch.tensor([-2 / sd, 0.0, 2 / sd]))
    assert torch.allclose(ls.decode(y), torch.tensor([[1.0, 10.0], [3.0, 10.0], [5.0, 10.0]]))
    again = LabelSpace.from_dict(ls.to_dict())
    assert again == ls and again.num_outputs == 2
    import json
    json.dumps(ls.to_dict())


def test_records_from_pairs_errors():
    assert error(records_from_pairs, [("MKV", 1.0), ("MJ", 2.0)]) == \
        "<memory>, item 1, column 'sequence': unknown residue 'J' at position 2"
    assert "item 0, column 'target'" in error(records_from_pairs, [("MKV", float("nan"))])
    assert "item 1" in error(records_from_pairs, [("MKV", 1.0), ("MK", (1.0, 2.0))])
    r = records_from_pairs([("MKV", 1), ("LL", 2.5)])
    assert [x.target for x in r] == [(1.0,), (2.5,)] and [x.row for x in r] == [0, 1]


def test_fit_needs_two_classes():
    recs = records_from_pairs([("MKV", "a"), ("LL", "a")], task="classification")
    assert "at least two" in error(LabelSpace.fit, "classification", recs, ["label"])


# ------------------------------------------------------------------ FASTA / inference input

def test_fasta_multiline_lowercase_blank_crlf(tmp_path):
    text = ">seq1 first protein\nMKV\nlla\n\n>seq2\n\nGG\nC\n\n"
    for nl in ("\n", "\r\n"):
        p = write(tmp_path, "in.fasta", "\ufeff" + text, newline=nl)
        assert read_fasta(p) == [("seq1", "MKVlla"), ("seq2", "GGC")]
        assert read_sequences(p) == [("seq1", "MKVlla"), ("seq2", "GGC")]


def test_fasta_detected_by_content(tmp_path):
    p = write(tmp_path, "input.txt", ">a\nMKV\n")
    assert read_sequences(p) == [("a", "MKV")]


@pytest.mark.parametrize("text", [">s1 first\nMKTAYIAKQR\n>s2\nMKVLA\n", "name,sequence\na,MKTAYIAKQR\nb,MKVLA\n"],
                         ids=["fasta", "csv"])
def test_a_pipe_is_read_once(text):
    """`--input <(zcat x.gz)`: a pipe without a telling suffix is read once, its format told from that read."""
    import os
    import threading

    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, text.encode()), os.close(w)))
    writer.start()
    try:
        got = read_sequences(f"/dev/fd/{r}", id_column=None if text.startswith(">") else "name")
    finally:
        writer.join()
        os.close(r)
    assert got == ([("s1", "MKTAYIAKQR"), ("s2", "MKVLA")] if text.startswith(">") else [("a", "MKTAYIAKQR"), ("b", "MKVLA")])


def test_fasta_errors(tmp_path):
    p = write(tmp_path, "a.fasta", ">x\nMKV\n>y desc\nLL\n>x\nAA\n")
    msg = error(read_fasta, p)
    assert p in msg and "'x'" in msg and "record 1" in msg and "record 3" in msg
    p = write(tmp_path, "b.fasta", "MKV\n>x\nLL\n")
    msg = error(read_fasta, p)
    assert msg.startswith(f"{p}, line 1") and "before" in msg
    p = write(tmp_path, "c.fasta", ">a\nMKV\n>b\nLL\n>c\n\n>d\nAA\n")
    msg = error(read_fasta, p)
    assert p in msg and "record 3 ('c'" in msg and "empty" in msg
    p = write(tmp_path, "d.fasta", ">a\nMKV\n>b\nLLLL\nAAJA\n")
    assert error(read_fasta, p) == f"{p}, record 2 ('b'), line 5: unknown residue 'J' at position 7"
    assert "empty" in error(read_fasta, write(tmp_path, "e.fasta", ""))


def test_read_sequences_csv(tmp_path):
    p = write(tmp_path, "in.csv", "name,sequence\nfoo,MKV\nbar,LLA\n")
    assert read_sequences(p) == [("1", "MKV"), ("2", "LLA")]  # the data rows' numbers
    assert read_sequences(p, id_column="name") == [("foo", "MKV"), ("bar", "LLA")]
    p = write(tmp_path, "bad.csv", "name,sequence\nfoo,MKV\nbar,LBJ\n")
    assert error(read_sequences, p) == f"{p}, row 3, column 'sequence': unknown residue 'J' at position 3"
    p = write(tmp_path, "dup.csv", "name,sequence\nfoo,MKV\nfoo,LL\n")
    msg = error(read_sequences, p, id_column="name")
    assert msg.startswith(f"{p}, row 3, column 'name'") and "duplicate" in msg
    msg = error(read_sequences, p, sequence_column="seq")
    assert p in msg and "'seq'" in msg and "'name'" in msg and "'sequence'" in msg


# ------------------------------------------------------------------ batching

LENGTHS = [5, 40, 7, 7, 7, 12, 3, 90, 33, 33, 8, 8, 61, 5, 14, 14, 14, 20, 9, 300, 11]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("budget", [1, 64, 100, 512])
def test_batches_cover_every_index_once_within_budget(shuffle, budget):
    batches = make_batches(LENGTHS, budget, shuffle=shuffle, seed=3, epoch=1)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(LENGTHS)))
    for b in batches:
        assert b
        padded = max(LENGTHS[i] for i in b) * len(b)
        assert padded <= budget or len(b) == 1  # an over-long sequence goes alone


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("budget", [1, 64, 100, 512])
def test_packed_batches_are_cut_by_real_tokens(shuffle, budget):
    """Packed: sum(len) <= budget (no padding to pay for); every index once, the same seed rule."""
    batches = make_batches(LENGTHS, budget, shuffle=shuffle, seed=3, epoch=1, packed=True)
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
    for b in batches:
        assert sum(LENGTHS[i] for i in b) <= budget or len(b) == 1
    if budget == 512:  # a budget of real tokens holds more sequences than one that counts padding
        assert len(batches) < len(make_batches(LENGTHS, budget, shuffle=shuffle, seed=3, epoch=1))


def test_sorted_packed_batches_fill_the_budget():
    """Longest first, each batch full before the next starts: all but the last hold more than
    budget - the longest sequence left (a greedy cut by sum)."""
    lengths = [10 + (i * 37) % 200 for i in range(300)]
    batches = make_batches(lengths, 1000, shuffle=False, packed=True)
    for b, nxt in zip(batches, batches[1:]):
        assert sum(lengths[i] for i in b) + lengths[nxt[0]] > 1000


def test_batches_are_length_bucketed():
    batches = make_batches(LENGTHS, 100, shuffle=False)
    padded = sum(max(LENGTHS[i] for i in b) * len(b) for b in batches)
    assert padded <= 1.25 * sum(LENGTHS)
    assert make_batches(LENGTHS, 100, shuffle=False) == batches  # deterministic


def test_shuffled_batches_depend_on_seed_and_epoch():
    lengths = [10 + (i * 7) % 50 for i in range(400)]
    a = make_batches(lengths, 256, shuffle=True, seed=1, epoch=0)
    assert a == make_batches(lengths, 256, shuffle=True, seed=1, epoch=0)
    assert a != make_batches(lengths, 256, shuffle=True, seed=1, epoch=1)
    assert a != make_batches(lengths, 256, shuffle=True, seed=2, epoch=0)


def test_batches_of_equal_lengths_are_random():
    a = make_batches([10] * 100, 50, shuffle=True, seed=0, epoch=0)
    b = make_batches([10] * 100, 50, shuffle=True, seed=0, epoch=1)
    assert {tuple(sorted(x)) for x in a} != {tuple(sorted(x)) for x in b}
    assert all(len(x) == 5 for x in a)


def test_collate_pads_with_one():
    recs = records_from_pairs([("MKV", 1.0), ("L", 2.0)])
    batch = collate(recs, None)
    assert batch.tokens.tolist() == [[0, 20, 15, 7, 2], [0, 4, 2, 1, 1]]
    assert batch.target is None
    ls = LabelSpace.fit("regression", recs, ["target"])
    assert collate(recs, ls).target.tolist() == [[1.0], [2.0]]


def test_error_messages_are_one_line_with_file_first(tmp_path):
    p = write(tmp_path, "train.csv", "sequence,target\nMKV,abc\n")
    assert re.fullmatch(r".*train\.csv, row 2, column 'target': 'abc' is not a number; .*--task classification.*",
                        error(load_splits, DataSpec(), train=p))
