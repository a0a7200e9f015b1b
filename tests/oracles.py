"""Reference models (HF transformers, fair-esm) with random weights, saved in their own
checkpoint layouts. No download: both libraries construct models from a config."""

import argparse

import torch

TINY = dict(layers=2, d=64, heads=4)
ESM2_8M = dict(layers=6, d=320, heads=20)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights far from their defaults, so any mapping mistake shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
            elif "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def perturbed_inv_freq(head_dim: int, seed: int) -> torch.Tensor:
    """fp16-rounded rotary frequencies, then nudged: a checkpoint whose inv_freq cannot be
    recomputed from the formula (as the released ESM-2 files)."""
    g = torch.Generator().manual_seed(seed)
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return inv.half().float() * (1 + 0.2 * torch.rand(head_dim // 2, generator=g))


def hf_config(layers, d, heads, token_dropout=True):
    from transformers import EsmConfig

    return EsmConfig(
        vocab_size=33, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * d, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, max_position_embeddings=1026, layer_norm_eps=1e-5,
        position_embedding_type="rotary", emb_layer_norm_before=False, token_dropout=token_dropout,
        pad_token_id=1, mask_token_id=32)


def make_hf_checkpoint(out_dir, layers, d, heads, seed=0, inv_freq=None):
    """Random EsmForMaskedLM saved with save_pretrained. Returns the directory."""
    from transformers import EsmForMaskedLM

    torch.manual_seed(seed)
    model = EsmForMaskedLM(hf_config(layers, d, heads))
    randomize_(model, seed)
    if inv_freq is not None:
        model.esm.rotary_embeddings.inv_freq.copy_(inv_freq)
    model.save_pretrained(out_dir)
    return str(out_dir)


def load_hf(path, **kw):
    from transformers import EsmForMaskedLM

    return EsmForMaskedLM.from_pretrained(path, **kw).eval()


def make_fair_esm_checkpoint(path, layers, d, heads, seed=0, inv_freq=None, prefix="encoder.sentence_encoder."):
    """Random fair-esm ESM2 saved in the released files' layout: {"model": prefixed state
    dict, "cfg": {"model": argparse.Namespace(...)}}. Returns the path."""
    import esm
    from esm.model.esm2 import ESM2

    torch.manual_seed(seed)
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    model = ESM2(num_layers=layers, embed_dim=d, attention_heads=heads, alphabet=alphabet, token_dropout=True)
    randomize_(model, seed)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("contact_head")}
    if inv_freq is not None:
        for k in state:
            if k.endswith("rot_emb.inv_freq"):
                state[k] = inv_freq.clone()
    cfg = argparse.Namespace(encoder_layers=layers, encoder_embed_dim=d, encoder_attention_heads=heads,
                             token_dropout=True)
    torch.save({"model": {prefix + k: v for k, v in state.items()}, "cfg": {"model": cfg}}, path)
    return str(path)


def load_fair_esm(path):
    """The oracle loads the file through fair-esm's own loading code."""
    import esm

    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(path, map_location="cpu", weights_only=True)
    model, _ = esm.pretrained.load_model_and_alphabet_core("esm2_random", data)
    return model.eval()


def random_sequences(n, min_len, max_len, seed, with_mask=True):
    """Residue strings over all 25 letters; some with <mask> tokens inside."""
    g = torch.Generator().manual_seed(seed)
    letters = "LAGVSERTIDPKQNFYMHWCXBUZO"
    seqs = []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        chars = [letters[int(j)] for j in torch.randint(0, 25, (length,), generator=g)]
        if with_mask and i % 2 == 0:
            for j in torch.randint(0, length, (max(1, length // 7),), generator=g).tolist():
                chars[j] = "<mask>"
        seqs.append("".join(chars))
    return seqs
