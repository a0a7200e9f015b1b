"""Packed batches in inference (issue 22): embeddings (mean and per residue, windows included) and zero-shot
scores (masked marginals, wt marginals, pseudo-log-likelihood) are the padded layout's, and the packed
runs did run packed. The padded layout is held to fair-esm / transformers by test_windows.py,
test_scoring.py and test_parity.py (which, on a CPU, now run packed as well: the rule's default).

Tolerance: as tests/model/test_packed.py (the same arithmetic per token in other matrix shapes: rounding
only), 64 eps32 of the largest magnitude compared."""

import pytest
import torch

import oracles
from esm2lite.inference.embed import embed_any
from esm2lite.inference.scoring import score_mutants, score_sequences
from esm2lite.model.batch import Batch
from esm2lite.weights.pretrained import load_pretrained
from test_windows import protein

ULPS = 64


@pytest.fixture(scope="module", params=["esm2", "esmc"])
def model(request, hf_tiny, esmc_tiny):
    return load_pretrained(hf_tiny if request.param == "esm2" else esmc_tiny)


def layouts_seen(model, monkeypatch):
    """Wraps the model's forward to record whether each batch it ran was packed."""
    seen, forward = [], model.forward

    def wrapped(batch, *args, **kwargs):
        seen.append(Batch.of(batch).packed)
        return forward(batch, *args, **kwargs)

    monkeypatch.setattr(model, "forward", wrapped)
    return seen


def test_embeddings_packed_equal_padded(model, monkeypatch):
    """Lengths 1 to 120 residues and one of 150 over a 60-residue context (embedded in windows), mean and
    per-residue states of the embeddings layer, a middle block and the last."""
    seqs = [protein(n, seed=n) for n in (1, 7, 60, 33, 2, 120, 150, 15)]
    ids = [f"p{k}" for k in range(len(seqs))]
    layers = [0, 1, model.config.num_layers]
    seen = layouts_seen(model, monkeypatch)
    results = {}
    for layout in ("padded", "packed"):
        seen.clear()
        results[layout] = embed_any(model, ids, seqs, max_residues=60, batch_tokens=200, layers=layers,
                                    per_residue=True, layout=layout)
        assert set(seen) == {layout == "packed"} and len(seen) > 2
    (a, info_a), (b, info_b) = results["padded"], results["packed"]
    assert a.keys() == b.keys() and info_a == info_b and info_a["windows"]  # 120 and 150 residues are windowed
    for key in a:
        oracles.assert_fp32_close(b[key], a[key], ULPS, what=key)


@pytest.mark.parametrize("method", ["masked-marginal", "wt-marginal"])
def test_mutant_scores_packed_equal_padded(model, method, monkeypatch):
    """Mutants of a 90-residue protein scored in a 40-residue context (optimal windows of several lengths
    at the ends), in batches of mixed row lengths."""
    wt = protein(90, seed=4)
    mutants = [f"{wt[p - 1]}{p}{'A' if wt[p - 1] != 'A' else 'G'}" for p in (1, 2, 17, 45, 46, 80, 89, 90)]
    mutants += [f"{mutants[0]}:{mutants[4]}"]
    seen = layouts_seen(model, monkeypatch)
    a = score_mutants(model, wt, mutants, method, batch_tokens=150, max_residues=40, layout="padded")
    assert not any(seen)
    seen.clear()
    b = score_mutants(model, wt, mutants, method, batch_tokens=150, max_residues=40, layout="packed")
    assert all(seen) and seen
    assert a.forwards == b.forwards
    oracles.assert_fp32_close(b.scores, a.scores, ULPS, what=f"{method} scores")


def test_pseudo_log_likelihood_packed_equals_padded(model):
    seqs = [protein(n, seed=n) for n in (1, 5, 23, 70)]
    a = score_sequences(model, seqs, batch_tokens=300, max_residues=40, layout="padded")
    b = score_sequences(model, seqs, batch_tokens=300, max_residues=40, layout="packed")
    assert b.forwards == a.forwards
    oracles.assert_fp32_close(b.scores, a.scores, ULPS, what="pll")


def test_a_residue_embeds_the_same_alone_and_packed_with_others(model):
    """A sequence's embedding does not depend on its batch mates (packed: no cross-sequence attention)."""
    seqs = [protein(n, seed=n + 1) for n in (40, 3, 25)]
    alone = embed_any(model, ["x"], seqs[:1], layout="packed")[0]
    together = embed_any(model, ["x", "y", "z"], seqs, layout="packed")[0]
    for key in alone:
        oracles.assert_fp32_close(together[key], alone[key], ULPS, what=key)
    assert not torch.equal(together["mean/%d/y" % model.config.num_layers], together["mean/%d/x" % model.config.num_layers])
