"""esm2lite's ESM-2 against the two reference implementations (never our own code)."""


import pytest
import torch

import oracles
from esm2lite import ESM2Config, Tokenizer
from esm2lite.weights.pretrained import load_pretrained

# fp32 comparisons: oracles.assert_fp32_agrees, against a float64 run of the reference (no bare tolerance).


def nonpad(t, tokens):
    return t[tokens != 1]  # [n_real_tokens, ...]: padding rows are garbage in every implementation


def max_diff(a, b, tokens):
    return (nonpad(a, tokens) - nonpad(b, tokens)).abs().max().item()


def agrees(ours, theirs32, ref64, tokens, what):
    oracles.assert_fp32_agrees(ours, theirs32, ref64, tokens != 1, what=what)


@pytest.fixture(scope="module")
def batch():
    # A padded batch of different lengths, every residue letter, <mask> inside.
    return Tokenizer().batch_encode(oracles.random_sequences(5, 5, 40, seed=3))


def hf_outputs(hf_model, tokens):
    with torch.no_grad():
        out = hf_model(input_ids=tokens, attention_mask=(tokens != 1).long(), output_hidden_states=True)
        hidden = hf_model.esm(input_ids=tokens, attention_mask=(tokens != 1).long()).last_hidden_state
    return out.logits, hidden


def test_batch_has_padding_and_masks(batch):
    assert (batch == 1).any() and (batch == 32).any()


def test_logits_match_transformers(hf_tiny, batch):
    ours = load_pretrained(hf_tiny)
    hf = oracles.load_hf(hf_tiny)
    (logits, hidden), (logits64, hidden64) = hf_outputs(hf, batch), hf_outputs(oracles.float64_copy(hf), batch)
    with torch.no_grad():
        out = ours(batch)
    agrees(out["logits"], logits, logits64, batch, "logits")
    agrees(out["last_hidden_state"], hidden, hidden64, batch, "last_hidden_state")


def test_logits_match_fair_esm(fair_tiny, batch):
    ours = load_pretrained(fair_tiny)
    ref = oracles.load_fair_esm(fair_tiny)
    layers = list(range(ref.num_layers + 1))
    with torch.no_grad():
        expected = ref(batch, repr_layers=layers)
        exact = oracles.float64_copy(ref)(batch, repr_layers=layers)
        out = ours(batch, repr_layers=layers)
    agrees(out["logits"], expected["logits"], exact["logits"], batch, "logits")
    for i in layers:  # 0 = embeddings (token dropout), L = after the final LayerNorm
        agrees(out["hidden_states"][i], expected["representations"][i], exact["representations"][i], batch,
               f"hidden_states[{i}]")
    agrees(out["last_hidden_state"], expected["representations"][ref.num_layers],
           exact["representations"][ref.num_layers], batch, "last_hidden_state")


def test_references_agree_on_masked_padded_batch(fair_tiny, tmp_path, batch, forkrun):
    """The pinned transformers must match fair-esm on padded batches containing <mask>
    (transformers PR #40370 broke this; #44163 fixed it)."""
    assert forkrun.run(["-m", "esm2lite.commands.convert", fair_tiny, tmp_path / "hf"]).returncode == 0
    logits, _ = hf_outputs(oracles.load_hf(tmp_path / "hf"), batch)
    ref = oracles.load_fair_esm(fair_tiny)
    with torch.no_grad():
        expected, exact = ref(batch)["logits"], oracles.float64_copy(ref)(batch)["logits"]
    agrees(logits, expected, exact, batch, "transformers vs fair-esm logits")  # transformers in the "ours" seat


def test_convert_round_trip(fair_tiny, tmp_path, batch, forkrun):
    out_dir = tmp_path / "converted"
    r = forkrun.run(["-m", "esm2lite.commands.convert", fair_tiny, out_dir])
    assert r.returncode == 0, r.stderr
    from_pt, from_dir = load_pretrained(fair_tiny), load_pretrained(out_dir)
    with torch.no_grad():
        assert torch.equal(from_pt(batch)["logits"], from_dir(batch)["logits"])
    # transformers reads the converted directory and agrees with fair-esm on the original file.
    hf_logits, _ = hf_outputs(oracles.load_hf(out_dir), batch)
    ref = oracles.load_fair_esm(fair_tiny)
    with torch.no_grad():
        expected, exact = ref(batch)["logits"], oracles.float64_copy(ref)(batch)["logits"]
    agrees(hf_logits, expected, exact, batch, "transformers on the converted directory vs fair-esm")


def test_inv_freq_comes_from_the_file(hf_tiny, batch, tiny_inv_freq):
    ours = load_pretrained(hf_tiny)
    for block in ours.layers:
        assert torch.equal(block.attn.inv_freq, tiny_inv_freq)
    # The perturbation matters: recomputing inv_freq from the formula moves the logits.
    recomputed = load_pretrained(hf_tiny)
    hd = recomputed.config.head_dim
    for block in recomputed.layers:
        block.attn.inv_freq.copy_(1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd)))
    with torch.no_grad():
        logits = ours(batch)["logits"]
        drift = max_diff(logits, recomputed(batch)["logits"], batch)
    # far beyond fp32 rounding (the comparisons above are within ~100 eps32 of the values' magnitude)
    assert drift > 1e4 * oracles.EPS32 * nonpad(logits, batch).abs().max()


@pytest.mark.slow
def test_8m_architecture_matches_both_references(tmp_path):
    """The real 8M shape (6 layers, d=320, 20 heads of 16) with random weights."""
    tokens = Tokenizer().batch_encode(oracles.random_sequences(4, 20, 120, seed=5))
    hf_dir = oracles.make_hf_checkpoint(tmp_path / "hf8m", **oracles.ESM2_8M, seed=11)
    hf = oracles.load_hf(hf_dir)
    (logits, hidden), (logits64, hidden64) = hf_outputs(hf, tokens), hf_outputs(oracles.float64_copy(hf), tokens)
    ours = load_pretrained(hf_dir)
    assert ours.config == ESM2Config.from_name("esm2_t6_8M_UR50D")
    with torch.no_grad():
        out = ours(tokens)
    agrees(out["logits"], logits, logits64, tokens, "8M logits vs transformers")
    agrees(out["last_hidden_state"], hidden, hidden64, tokens, "8M last_hidden_state vs transformers")

    pt = oracles.make_fair_esm_checkpoint(tmp_path / "fair8m.pt", **oracles.ESM2_8M, seed=12, prefix="encoder.")
    last = oracles.ESM2_8M["layers"]  # fair-esm's final representation: after the final LayerNorm
    ref = oracles.load_fair_esm(pt)
    with torch.no_grad():
        expected = ref(tokens, repr_layers=[last])
        exact = oracles.float64_copy(ref)(tokens, repr_layers=[last])
        got = load_pretrained(pt)(tokens, repr_layers=[last])
    agrees(got["logits"], expected["logits"], exact["logits"], tokens, "8M logits vs fair-esm")
    agrees(got["hidden_states"][last], expected["representations"][last], exact["representations"][last], tokens,
           "8M hidden_states[last] vs fair-esm")
    agrees(got["last_hidden_state"], expected["representations"][last], exact["representations"][last], tokens,
           "8M last_hidden_state vs fair-esm")


def test_bf16_close_to_fp32(hf_tiny, batch):
    fp32 = load_pretrained(hf_tiny)
    bf16 = load_pretrained(hf_tiny, dtype=torch.bfloat16)
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16
    assert bf16.layers[0].attn.inv_freq.dtype == torch.float32  # rotary stays fp32
    with torch.no_grad():
        a = nonpad(fp32(batch)["logits"], batch)
        b = nonpad(bf16(batch)["logits"], batch).float()
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 2e-2
    assert rel > 0  # it really ran in bf16


def test_unmasked_sequence_still_scaled_by_token_dropout(fair_tiny):
    """With no <mask> in the input every embedding is scaled by 0.88 (checked vs fair-esm)."""
    tokens = Tokenizer().batch_encode(["MKTAYIAK"])
    ref = oracles.load_fair_esm(fair_tiny)
    ours = load_pretrained(fair_tiny)
    with torch.no_grad():
        expected = ref(tokens, repr_layers=[0])["representations"][0]
        exact = oracles.float64_copy(ref)(tokens, repr_layers=[0])["representations"][0]
        got = ours(tokens, repr_layers=[0])["hidden_states"][0]
    oracles.assert_fp32_agrees(got, expected, exact, what="embeddings after token dropout")
    # one product per value (x 0.88, then / 1): a rounding or two of each
    oracles.assert_fp32_close(got, ours.embed_tokens.weight[tokens] * 0.88, 2, what="0.88 x embedding")


def test_activation_checkpointing_gives_the_same_gradients(hf_tiny, batch):
    saved = {}

    def grads(checkpointing):
        model = load_pretrained(hf_tiny).train()
        model.activation_checkpointing = checkpointing
        saved[checkpointing] = 0

        def count(t):
            saved[checkpointing] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            out = model(batch)["last_hidden_state"]
        (out[batch != 1] ** 2).mean().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    plain, recomputed = grads(False), grads(True)
    assert saved[True] < 0.5 * saved[False]  # block activations really are dropped
    assert plain.keys() == recomputed.keys() and len(plain) > 10
    for k in plain:  # the same arithmetic recomputed (bitwise equal here); 16 eps32 admits another kernel path only
        oracles.assert_fp32_close(recomputed[k], plain[k], 16, what=k)
