"""Window arithmetic and windowed embeddings, against hand computations, ProteinGym's
get_optimal_window (transcribed below) and fair-esm's model run on hand-cut slices."""

import pytest
import torch

import oracles
from esm2lite.errors import DataError
from esm2lite.inference.windows import embed_windowed, optimal_window, tile_windows, window_size
from esm2lite import load_pretrained

LETTERS = "LAGVSERTIDPKQNFYMHWC"


def protein(n, seed):
    g = torch.Generator().manual_seed(seed)
    return "".join(LETTERS[i] for i in torch.randint(0, 20, (n,), generator=g).tolist())


def proteingym_optimal_window(mutation_position_relative, seq_len_wo_special, model_window):
    """ProteinGym proteingym/utils/scoring_utils.py get_optimal_window, as published (the caller
    passes the token index and the token count with <cls>/<eos>, despite the names)."""
    half_model_window = model_window // 2
    if seq_len_wo_special <= model_window:
        return [0, seq_len_wo_special]
    elif mutation_position_relative < half_model_window:
        return [0, model_window]
    elif mutation_position_relative >= seq_len_wo_special - half_model_window:
        return [seq_len_wo_special - model_window, seq_len_wo_special]
    else:
        return [max(0, mutation_position_relative - half_model_window),
                min(seq_len_wo_special, mutation_position_relative + half_model_window)]


@pytest.fixture(scope="module")
def models(fair_tiny):
    """(ours, fair-esm, fair-esm in float64: the yardstick of every fp32 comparison below)."""
    ref = oracles.load_fair_esm(fair_tiny)
    return load_pretrained(fair_tiny).eval(), ref, oracles.float64_copy(ref)


def agrees(ours, expected, models, what, *args):
    """ours against expected(fair-esm model, *args), fair-esm's representations cut and averaged by hand:
    within fair-esm's own fp32 error, both measured against the same hand computation on fair-esm in
    float64 (no fixed fp32 tolerance: those do not travel between machines)."""
    oracles.assert_fp32_agrees(ours, expected(models[1], *args), expected(models[2], *args), what=what)


def fair_hidden(ref, tokens, layers):
    """fair-esm's representations of one token row [T] -> {layer: [T, d]}."""
    with torch.no_grad():
        out = ref(tokens[None], repr_layers=layers)["representations"]
    return {layer: out[layer][0] for layer in layers}


def fair_tokens(seq):
    import esm

    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    return alphabet.get_batch_converter()([("p", seq)])[2][0]  # [L + 2], <cls> .. <eos>


# ---------------------------------------------------------------- arithmetic


def test_optimal_window_by_hand():
    # 12 residues (14 tokens), windows of 12 tokens (max_residues 10): half = 6
    assert [optimal_window(i, 14, 12) for i in (0, 5, 6, 7, 8, 13)] == [
        (0, 12), (0, 12), (0, 12), (1, 13), (2, 14), (2, 14)]
    assert optimal_window(5, 14, 20) == (0, 14)  # fits: the whole row
    assert optimal_window(5, 14, None) == (0, 14)


@pytest.mark.parametrize("window", [12, 13, 102, 1024])
def test_optimal_window_is_proteingyms(window):
    for n_tokens in (3, window - 1, window, window + 1, window + 7, 2 * window + 5, 2002):
        for i in range(n_tokens):
            assert optimal_window(i, n_tokens, window) == tuple(
                proteingym_optimal_window(i, n_tokens, window)), (i, n_tokens, window)


def test_tile_windows_by_hand():
    assert tile_windows(14, 12) == [(0, 12), (2, 14)]  # overlap >= 6: two windows
    assert tile_windows(30, 12, 6) == [(0, 12), (6, 18), (12, 24), (18, 30)]
    assert tile_windows(31, 12, 6) == [(0, 12), (4, 16), (9, 21), (14, 26), (19, 31)]
    assert tile_windows(31, 12, 0) == [(0, 12), (9, 21), (19, 31)]
    assert tile_windows(2002, 1024) == [(0, 1024), (489, 1513), (978, 2002)]
    assert tile_windows(12, 12) == [(0, 12)] and tile_windows(5, 12) == [(0, 5)]


def test_tile_windows_cover_with_overlap():
    for W in (5, 12, 33):
        for overlap in (0, 1, W // 2, W - 1):
            for T in range(W + 1, 4 * W):
                ws = tile_windows(T, W, overlap)
                assert ws[0][0] == 0 and ws[-1][1] == T
                assert all(e - s == W for s, e in ws)
                assert all(e1 - s2 >= overlap for (_, e1), (s2, _) in zip(ws, ws[1:]))
                fewer = len(ws) - 1  # one window fewer cannot cover T with that overlap
                assert fewer * W - (fewer - 1) * overlap < T


def test_window_options_are_checked():
    with pytest.raises(DataError, match="max_residues must be at least 1"):
        window_size(0)
    with pytest.raises(DataError, match="overlap must be in 0..11"):
        tile_windows(20, 12, 12)


# ---------------------------------------------------------------- embeddings


def test_embedding_a_little_over_the_limit_by_hand(models):
    ours = models[0]
    seq = protein(12, seed=1)  # 14 tokens, max_residues 10 -> windows [0, 12) and [2, 14)
    tokens, layers = fair_tokens(seq), [0, 1, 2]
    emb = embed_windowed(ours, [seq], layers=layers, max_residues=10, precision="fp32")
    assert emb.windows == [[(0, 12), (2, 14)]] and emb.forwards == 2

    def expected(ref, layer):
        left, right = fair_hidden(ref, tokens[0:12], [layer])[layer], fair_hidden(ref, tokens[2:14], [layer])[layer]
        return torch.cat([left[0:2],  # <cls>, residue 1: first window only
                          (left[2:12] + right[0:10]) / 2,  # both windows
                          right[10:12]])  # residue 12, <eos>: second window only

    for layer in layers:
        agrees(emb.hidden[0][layer], expected, models, f"layer {layer}", layer)
        agrees(emb.mean(0, layer), lambda ref, i: expected(ref, i)[1:13].mean(0), models, f"mean, layer {layer}", layer)


def test_under_the_limit_is_the_plain_forward(models):
    ours = models[0]
    seq = protein(30, seed=2)
    tokens = fair_tokens(seq)
    emb = embed_windowed(ours, [seq], layers=[1, 2], max_residues=30, precision="fp32")
    with torch.no_grad():
        plain = ours(tokens[None], repr_layers=[1, 2], logits=False)["hidden_states"]
    assert emb.windows == [[(0, 32)]]
    for layer in (1, 2):
        assert torch.equal(emb.hidden[0][layer], plain[layer][0])  # exactly, not approximately
        agrees(emb.hidden[0][layer], lambda ref, i: fair_hidden(ref, tokens, [i])[i], models, f"layer {layer}", layer)


def test_short_and_long_in_one_call(models):
    ours = models[0]
    seqs = [protein(25, seed=3), protein(9, seed=4), protein(70, seed=5)]
    emb = embed_windowed(ours, seqs, max_residues=30, batch_tokens=64, precision="fp32")
    assert [len(w) for w in emb.windows] == [1, 1, 4] and emb.forwards == 6 and emb.batches > 1
    for k in (0, 1):  # padded into batches with other rows: the plain forward to rounding
        agrees(emb.hidden[k][2], lambda ref, seq: fair_hidden(ref, fair_tokens(seq), [2])[2], models, f"sequence {k}",
               seqs[k])
    assert emb.per_residue(2, 2).shape == (70, 64)


def test_2000_residue_protein_embeds(models):
    ours = models[0]
    seq = protein(2000, seed=6)
    tokens = fair_tokens(seq)
    emb = embed_windowed(ours, [seq], max_residues=100, batch_tokens=1024, precision="fp32")
    (windows,) = emb.windows
    assert windows == tile_windows(2002, 102) and len(windows) == 39
    h = emb.hidden[0][2]
    assert h.shape == (2002, 64) and torch.isfinite(h).all()

    def expected(ref, t):  # the mean over the windows holding t
        holding = [(s, e) for s, e in windows if s <= t < e]
        return sum(fair_hidden(ref, tokens[s:e], [2])[2][t - s] for s, e in holding) / len(holding)

    for t in (0, 1, 50, 51, 1000, 1977, 2001):  # spot checks
        agrees(h[t], expected, models, f"token {t}", t)


def test_at_the_real_limit(models):
    ours = models[0]
    seq = protein(2000, seed=7)
    tokens = fair_tokens(seq)
    emb = embed_windowed(ours, [seq], precision="fp32")  # max_residues 1022: 1024-token windows
    assert emb.windows == [[(0, 1024), (489, 1513), (978, 2002)]]
    parts = {r: [fair_hidden(r, tokens[s:e], [2])[2] for s, e in emb.windows[0]] for r in models[1:]}
    h = emb.hidden[0][2]
    agrees(h[0:489], lambda r: parts[r][0][0:489], models, "tokens 0..488: first window only")
    agrees(h[600], lambda r: (parts[r][0][600] + parts[r][1][600 - 489]) / 2, models, "token 600")
    agrees(h[1000], lambda r: (parts[r][0][1000] + parts[r][1][1000 - 489] + parts[r][2][1000 - 978]) / 3, models,
           "token 1000")
    agrees(h[1513:], lambda r: parts[r][2][1513 - 978:], models, "tokens 1513..: last window only")


def test_bad_sequences(models):
    ours = models[0]
    with pytest.raises(DataError, match=r"^sequence 1: unknown residue 'J' at position 3$"):
        embed_windowed(ours, ["MKT", "MKJ"])
    with pytest.raises(DataError, match="no sequences"):
        embed_windowed(ours, [])
    with pytest.raises(DataError, match="<mask> is not allowed"):
        embed_windowed(ours, ["MK<mask>T"])
