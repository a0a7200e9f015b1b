import pytest
import torch

import oracles
from esm2lite import Tokenizer, TokenizerError


@pytest.fixture(scope="module")
def seqs():
    return oracles.random_sequences(20, 1, 60, seed=0)


def test_ids_equal_hf_tokenizer(seqs, tmp_path):
    from transformers import EsmTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(Tokenizer.vocab) + "\n")
    hf = EsmTokenizer(vocab_file=str(vocab))
    expected = hf(seqs, padding=True, return_tensors="pt")["input_ids"]
    assert torch.equal(Tokenizer().batch_encode(seqs), expected)


def test_ids_equal_fair_esm_alphabet(seqs):
    import esm

    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    _, _, expected = alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(seqs)])
    assert torch.equal(Tokenizer().batch_encode(seqs), expected)


def test_vocabulary_order_equals_fair_esm():
    import esm

    assert list(Tokenizer.vocab) == esm.data.Alphabet.from_architecture("ESM-1b").all_toks


def test_lowercase_and_whitespace():
    tok = Tokenizer()
    assert torch.equal(tok.batch_encode(["mk v\n<mask>a\t"]), tok.batch_encode(["MKV<mask>A"]))


def test_unknown_character_names_sequence_position_and_character():
    with pytest.raises(TokenizerError, match=r"sequence 1: unknown residue 'J' at position 4"):
        Tokenizer().batch_encode(["MKV", "ACDJK"])
    with pytest.raises(ValueError, match=r"sequence 0: unknown residue '<' at position 3"):
        Tokenizer().batch_encode(["AC<mas>"])
    with pytest.raises(ValueError, match=r"unknown residue 'é' at position 2"):
        Tokenizer().batch_encode(["Aé"])


def test_empty_sequence_raises():
    with pytest.raises(TokenizerError, match="sequence 2: empty sequence"):
        Tokenizer().batch_encode(["A", "C", "  "])
    with pytest.raises(TokenizerError, match="no sequences"):
        Tokenizer().batch_encode([])


def test_truncation_and_overlong():
    tok = Tokenizer()
    with pytest.raises(TokenizerError, match="sequence 0: 5 residues, more than the maximum 3"):
        tok.batch_encode(["MKVLA"], max_residues=3)
    out = tok.batch_encode(["MKVLA", "MK"], max_residues=3, truncate=True)
    assert out.tolist() == [[0, 20, 15, 7, 2], [0, 20, 15, 2, 1]]


def test_decode_round_trip(seqs):
    tok = Tokenizer()
    assert [tok.decode(row) for row in tok.batch_encode(seqs)] == seqs
