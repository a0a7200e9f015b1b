"""Fuzzing the tokenizer and the CSV / FASTA readers: any input ends in a result or in
esm2lite.errors.Esm2liteError, never in another exception."""

import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esm2lite.data.batching import collate
from esm2lite.tasks import TASKS
from esm2lite.tasks.labels import LabelSpace
from esm2lite.data.reading import load_splits, read_fasta, read_sequences
from esm2lite.data.records import DataSpec
from esm2lite.errors import Esm2liteError
from esm2lite.model.tokenizer import RESIDUES, Tokenizer

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 200)), deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text that is often almost valid: residues, separators, quotes, line ends, odd characters.
ALPHABET = RESIDUES + RESIDUES.lower() + ",;\t\"' \r\n\x0b\x0c\x1c\u2028\u00a0<>mask0123456789.eE+-naif\ufeff\u00e9\x00"
near_text = st.text(alphabet=st.sampled_from(ALPHABET), max_size=300)
any_text = st.one_of(near_text, st.text(max_size=200))
SUFFIXES = [".csv", ".tsv", ".fasta", ".txt", ""]


def _write(data: bytes, suffix: str) -> str:
    fd, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.utime(path, (1, 1))  # an old file: a last line without a line end is complete, not still being written
    return path


def _expect_result_or_own_error(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except Esm2liteError as e:
        assert "\n" not in str(e), f"error message is not one line: {e!r}"
        return None


# ---------------------------------------------------------------------------- tokenizer

@FUZZ
@given(st.lists(any_text, max_size=4), st.one_of(st.none(), st.integers(1, 50)), st.booleans())
def test_tokenizer_batch_encode(seqs, max_residues, truncate):
    tokens = _expect_result_or_own_error(Tokenizer().batch_encode, seqs, max_residues, truncate)
    if tokens is not None:
        assert tokens.dtype == torch.long and tokens.shape[0] == len(seqs)
        assert int(tokens.min()) >= 0 and int(tokens.max()) < len(Tokenizer.vocab)
        assert (tokens[:, 0] == Tokenizer.cls_id).all()
        if max_residues is not None:
            assert tokens.shape[1] <= max_residues + 2


@FUZZ
@given(st.lists(st.text(alphabet=st.sampled_from(RESIDUES + RESIDUES.lower() + " \n"), max_size=40)
                .filter(lambda s: s.strip()), min_size=1, max_size=4))
def test_tokenizer_valid_text_round_trips(seqs):
    tokens = Tokenizer().batch_encode(seqs)
    for row, s in zip(tokens, seqs):
        assert Tokenizer().decode(row) == "".join(s.split()).upper()


# ---------------------------------------------------------------------------- files

def _csv_from_cells(header, rows, eol, bom):
    lines = [",".join(header)] + [",".join(r) for r in rows]
    return (("\ufeff" if bom else "") + eol.join(lines) + eol).encode("utf-8", "surrogatepass")


cell = st.one_of(st.sampled_from(["MKV", "mkvla", "", "nan", "inf", "1.5", "-2", "x", "a", "b", "HHE", "101",
                                  "train", "valid", "test", "dev", "\"q\"", " MK V ", "<mask>K", "J"]),
                 st.text(alphabet=st.sampled_from(ALPHABET), max_size=12))
column = st.sampled_from(["sequence", "target", "t2", "mask", "split", "id", "", "sequence "])
structured_csv = st.builds(
    _csv_from_cells,
    st.lists(column, min_size=1, max_size=5),
    st.lists(st.lists(cell, max_size=6), max_size=6),
    st.sampled_from(["\n", "\r\n", "\r"]), st.booleans())
file_bytes = st.one_of(structured_csv, st.binary(max_size=300), near_text.map(lambda t: t.encode("utf-8")))


@FUZZ
@given(file_bytes, st.sampled_from(SUFFIXES), st.sampled_from(list(TASKS)), st.booleans(), st.booleans(),
       st.one_of(st.none(), st.integers(1, 8)), st.booleans())
def test_load_splits(data, suffix, task, use_mask, one_csv, max_residues, truncate):
    spec = DataSpec(task=task, mask_column="mask" if use_mask and task == "token-classification" else None,
                    split_column="split" if one_csv else None, max_residues=max_residues, truncate=truncate)
    path = _write(data, suffix)
    try:
        kw = {"csv": path} if one_csv else {"train": path, "valid": path}
        splits = _expect_result_or_own_error(load_splits, spec, **kw)
        if splits is None:
            return
        assert splits["train"]
        labels = _expect_result_or_own_error(LabelSpace.fit, task, splits["train"], ["target"])
        if labels is not None:
            for records in splits.values():
                batch = _expect_result_or_own_error(collate, records, labels)  # checks labels, encodes
                if batch is not None:
                    assert batch.tokens.shape[0] == batch.target.shape[0] == len(records)
    finally:
        os.remove(path)


@FUZZ
@given(file_bytes, st.sampled_from(SUFFIXES), st.sampled_from([None, "id"]))
def test_read_sequences(data, suffix, id_column):
    path = _write(data, suffix)
    try:
        pairs = _expect_result_or_own_error(read_sequences, path, "sequence", id_column)
        if pairs is not None:
            assert pairs and len({sid for sid, _ in pairs}) == len(pairs)
            Tokenizer().batch_encode([s for _, s in pairs])  # every returned sequence encodes
    finally:
        os.remove(path)


fasta_line = st.one_of(st.sampled_from([">s1", ">s2 desc", ">", "> ", ";comment", "", "MKV", "mk vla", "J", "<mask>",
                                        ">s1", "\ufeff>x"]),
                       st.text(alphabet=st.sampled_from(ALPHABET), max_size=20))
fasta_bytes = st.one_of(
    st.builds(lambda lines, eol: eol.join(lines).encode("utf-8", "surrogatepass"),
              st.lists(fasta_line, max_size=10), st.sampled_from(["\n", "\r\n"])),
    st.binary(max_size=200))


@FUZZ
@given(fasta_bytes)
def test_read_fasta(data):
    path = _write(data, ".fasta")
    try:
        pairs = _expect_result_or_own_error(read_fasta, path)
        if pairs is not None:
            assert pairs and len({sid for sid, _ in pairs}) == len(pairs)
            Tokenizer().batch_encode([s for _, s in pairs])
    finally:
        os.remove(path)


@pytest.mark.parametrize("reader", [read_fasta, read_sequences])
def test_directory_and_missing_path(tmp_path, reader):
    for path in (tmp_path, tmp_path / "missing.fa"):
        with pytest.raises(Esm2liteError):
            reader(path)


# ---------------------------------------------------------------------------- checkpoint files

json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10, 10**13), st.floats(allow_nan=True), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)
HF_FIELDS = ["num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size",
             "layer_norm_eps", "token_dropout", "position_embedding_type", "emb_layer_norm_before", "hidden_act",
             "is_folding_model"]
GOOD_HF = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256,
           "position_embedding_type": "rotary"}
hf_config = st.one_of(
    json_value,
    st.builds(lambda base, extra: {**base, **extra}, st.just(GOOD_HF),
              st.dictionaries(st.sampled_from(HF_FIELDS), json_value, max_size=3)))


@FUZZ
@given(hf_config)
def test_config_json(value):
    import json

    from esm2lite.model.config import ESM2Config

    path = _write(json.dumps(value).encode(), ".json")
    try:
        config = _expect_result_or_own_error(ESM2Config.from_json_file, path)
        if config is not None:  # a config that passes can be built without asking for too much memory
            assert config.num_parameters() <= 50e9
    finally:
        os.remove(path)


small_tensor = st.builds(lambda shape: torch.zeros(shape), st.lists(st.integers(0, 3), max_size=2))
pt_value = st.one_of(small_tensor, st.integers(), st.text(max_size=4), st.none(), st.lists(st.integers(), max_size=2))
GOOD_FAIR = {"encoder_layers": 2, "encoder_embed_dim": 64, "encoder_attention_heads": 4}
fair_cfg = st.one_of(
    st.just(GOOD_FAIR), st.just(GOOD_FAIR),  # often valid, so that the weights are looked at
    st.dictionaries(st.sampled_from([*GOOD_FAIR, "token_dropout"]), st.one_of(st.integers(-2, 10**6), pt_value),
                    max_size=4),
    pt_value)
fair_model = st.dictionaries(
    st.one_of(st.sampled_from(["encoder.embed_tokens.weight", "encoder.sentence_encoder.layers.0.fc1.weight",
                               "lm_head.weight", "contact_head.x", "encoder.layers.9.fc2.bias"]),
              st.text(max_size=6), st.integers()),
    pt_value, max_size=4)


fair_file = st.one_of(
    st.fixed_dictionaries({"model": fair_model, "cfg": st.fixed_dictionaries({"model": fair_cfg})}),
    st.fixed_dictionaries({"model": fair_model, "cfg": st.fixed_dictionaries({"model": fair_cfg})}),
    st.dictionaries(st.sampled_from(["model", "cfg", "args"]), pt_value, max_size=3))


@settings(FUZZ, max_examples=min(FUZZ.max_examples, 100))
@given(fair_file, st.booleans())
def test_fair_esm_file(obj, legacy_format):
    from esm2lite.weights.pretrained import load_pretrained

    path = _write(b"", ".pt")
    try:
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy_format)
        _expect_result_or_own_error(load_pretrained, path)
    finally:
        os.remove(path)


@FUZZ
@given(st.one_of(st.binary(max_size=200),
                 st.builds(lambda n, header, tail: n.to_bytes(8, "little") + header + tail,
                           st.integers(0, 300), st.text(max_size=120).map(str.encode), st.binary(max_size=64))))
def test_safetensors_file(data):
    from esm2lite.weights.pretrained import read_safetensors
    from esm2lite.checkpoints.checkpoint_dir import read_tensors

    d = tempfile.mkdtemp()
    path = os.path.join(d, "model.safetensors")
    try:
        with open(path, "wb") as f:
            f.write(data)
        _expect_result_or_own_error(read_safetensors, path)
        _expect_result_or_own_error(read_tensors, d)
    finally:
        os.remove(path)
        os.rmdir(d)
