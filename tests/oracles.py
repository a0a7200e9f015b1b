"""Reference models (HF transformers, fair-esm) with random weights, saved in their own
checkpoint layouts. No download: both libraries construct models from a config."""

import argparse
import copy
import csv
import json
import os
import tempfile

import torch

TINY = dict(layers=2, d=64, heads=4)
ESM2_8M = dict(layers=6, d=320, heads=20)
EPS32 = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------- fp32 tolerances that travel
# CPU kernels sum in a machine-dependent order (SIMD width, oneDNN/MKL path, threads), so an fp32
# result's rounding error differs between machines: no bare fp32 tolerance here.


def float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same reference model (same fp32 weights, exactly widened) computing in float64.
    Rotary tables cached by an earlier fp32 forward are dropped, so they are recomputed in float64
    (fair-esm caches them per length and does not check the dtype). Both references keep a few fp32
    steps inside (transformers' rotary casts q, k, cos and sin to fp32; fair-esm's softmax
    is in fp32): rounding of single values, far below what an fp32 forward accumulates."""
    ref = copy.deepcopy(model).double()
    for m in ref.modules():
        if hasattr(m, "_seq_len_cached"):
            m._seq_len_cached = None
    return ref


def _stats(ours, theirs32, ref64, keep):
    f64 = lambda t: torch.as_tensor(t, dtype=torch.float64).detach()
    ours, theirs32, ref64 = f64(ours), f64(theirs32), f64(ref64)
    if keep is not None:
        ours, theirs32, ref64 = ours[keep], theirs32[keep], ref64[keep]
    return ((ours - ref64).abs().max().item(), (theirs32 - ref64).abs().max().item(), ref64.abs().max().item())


def assert_fp32_agrees(ours, theirs32, ref64, keep=None, slack=4.0, what=""):
    """esm2lite's fp32 result is as close to the float64 run of an independent implementation as
    that implementation's own fp32 run is:

        max|ours - ref64| <= slack * max|theirs32 - ref64| + 16 * eps32 * max|ref64|

    Both errors come from this machine's summation order, so the bound travels between machines;
    a real bug does not fit under it (one weight matrix scaled by 1.001 trips every comparison it
    reaches, at 6 to 280 times the bound; a wrong mapping or a missing scale is off by far more).
    slack: our kernels may round a few times worse than theirs (measured: at most 3x, for 4 scores).
    keep: boolean mask of the compared positions (e.g. non-pad tokens). Tensors or lists of numbers.
    Returns (ours_err, theirs_err)."""
    ours_err, theirs_err, mag = _stats(ours, theirs32, ref64, keep)
    bound = slack * theirs_err + 16 * EPS32 * mag
    assert ours_err <= bound, (f"{what}: esm2lite is {ours_err:.3g} from the float64 reference, more than {slack} x "
                               f"the reference's own fp32 error {theirs_err:.3g} + 16 eps32 x {mag:.3g} (values' "
                               f"magnitude) = {bound:.3g}")
    return ours_err, theirs_err


def assert_fp32_close(got, want, ulps, keep=None, what=""):
    """Two fp32 computations of esm2lite itself that may differ only in rounding (batched vs alone,
    merged vs unmerged adapters, windows vs direct, two ranks vs one):
    max|got - want| <= ulps * eps32 * max|want|. ulps: the rounding budget, justified where it is
    called (depth and accumulation lengths of what differs between the two)."""
    f64 = lambda t: torch.as_tensor(t, dtype=torch.float64).detach()
    got, want = f64(got), f64(want)
    if keep is not None:
        got, want = got[keep], want[keep]
    err, mag = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= ulps * EPS32 * mag, (f"{what}: differ by {err:.3g}, more than {ulps} eps32 x {mag:.3g} (values' "
                                       f"magnitude) = {ulps * EPS32 * mag:.3g}")
    return err


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


def make_esmc_checkpoint(out_dir, layers, d, heads, ffn, seed=0):
    """transformers' EsmcForMaskedLM with random weights (oracles.randomize_), saved as an HF directory."""
    from transformers import EsmcConfig, EsmcForMaskedLM

    torch.manual_seed(seed)
    model = EsmcForMaskedLM(EsmcConfig(
        vocab_size=64, hidden_size=d, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads))
    randomize_(model, seed)
    model.save_pretrained(out_dir)
    return str(out_dir)


def hf_class(name):
    import transformers

    return getattr(transformers, name)


def resave_as(masked_lm_dir, out_dir, cls_name, seed=0, num_labels=3):
    """What users do: load an EsmForMaskedLM directory into another transformers class
    (AutoModel -> EsmModel, EsmForSequenceClassification, ...), then save_pretrained. The
    encoder keeps the directory's weights; task heads (pooler, classifier) are new, randomised."""
    kw = {} if cls_name == "EsmModel" else {"num_labels": num_labels}
    torch.manual_seed(seed)
    model = hf_class(cls_name).from_pretrained(masked_lm_dir, **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("pooler.", "classifier.")):
                p.copy_(torch.randn(p.shape) * 0.1)
    model.save_pretrained(out_dir)
    return str(out_dir)


def load_hf(path, cls_name="EsmForMaskedLM", **kw):
    return hf_class(cls_name).from_pretrained(path, **kw).eval()


def hf_encoder(model):
    """The EsmModel inside any transformers ESM class (EsmModel itself included)."""
    return getattr(model, "esm", model)


# ---------------------------------------------------------------- BioNeMo's layout
# Written independently of esm2lite's reader, from BioNeMo's converter (NVIDIA/bionemo-framework
# bionemo-recipes/models/esm2/convert.py: mapping, _pack_qkv_weight/_bias, _pad_weights, _pad_bias)
# and NVEsmConfig (modeling_esm_te.py beside it).

BIONEMO_MAPPING = {  # convert.py's `mapping`, with "{P}" for the base-model prefix
    "esm.encoder.layer.*.attention.output.dense.weight": "{P}encoder.layers.*.self_attention.proj.weight",
    "esm.encoder.layer.*.attention.output.dense.bias": "{P}encoder.layers.*.self_attention.proj.bias",
    "esm.encoder.layer.*.attention.LayerNorm.weight": "{P}encoder.layers.*.self_attention.layernorm_qkv.layer_norm_weight",
    "esm.encoder.layer.*.attention.LayerNorm.bias": "{P}encoder.layers.*.self_attention.layernorm_qkv.layer_norm_bias",
    "esm.encoder.layer.*.intermediate.dense.weight": "{P}encoder.layers.*.layernorm_mlp.fc1_weight",
    "esm.encoder.layer.*.intermediate.dense.bias": "{P}encoder.layers.*.layernorm_mlp.fc1_bias",
    "esm.encoder.layer.*.output.dense.weight": "{P}encoder.layers.*.layernorm_mlp.fc2_weight",
    "esm.encoder.layer.*.output.dense.bias": "{P}encoder.layers.*.layernorm_mlp.fc2_bias",
    "esm.encoder.layer.*.LayerNorm.weight": "{P}encoder.layers.*.layernorm_mlp.layer_norm_weight",
    "esm.encoder.layer.*.LayerNorm.bias": "{P}encoder.layers.*.layernorm_mlp.layer_norm_bias",
    "esm.encoder.emb_layer_norm_after.weight": "{P}encoder.emb_layer_norm_after.weight",
    "esm.encoder.emb_layer_norm_after.bias": "{P}encoder.emb_layer_norm_after.bias",
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layer_norm.weight": "lm_head.decoder.layer_norm_weight",
    "lm_head.layer_norm.bias": "lm_head.decoder.layer_norm_bias",
}


def bionemo_pack_qkv(q, k, v, num_heads, interleaved=True):
    """_pack_qkv_weight / _pack_qkv_bias: cat along rows, then [3, H, hd, ...] -> [H, 3, hd, ...]."""
    fused = torch.cat((q, k, v), dim=0)
    if not interleaved:  # TransformerEngine's qkv_weight_interleaved=False reading: plain concatenation
        return fused
    return fused.view(3, num_heads, -1, *q.shape[1:]).transpose(0, 1).contiguous().view(*fused.shape)


def bionemo_pad_rows(t, rows, fill=0.0):
    """_pad_weights (zeros) / _pad_bias (finfo.min) up to padded_vocab_size rows."""
    pad = torch.full((rows - t.shape[0], *t.shape[1:]), fill, dtype=t.dtype)
    return torch.cat((t, pad), dim=0)


def bionemo_state_dict(hf_model, prefix="model.", interleaved=True, padded=64, lm_head=True, tied_copy=False):
    """BioNeMo's HF -> TE transform of a transformers EsmForMaskedLM's weights."""
    sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    heads, out = hf_model.config.num_attention_heads, {}
    for src, dst in BIONEMO_MAPPING.items():
        if src.startswith("lm_head.") and not lm_head:
            continue
        for i in range(hf_model.config.num_hidden_layers) if "*" in src else [None]:
            key = src.replace("*", str(i))
            out[dst.replace("*", str(i)).replace("{P}", prefix)] = sd[key]
    for i in range(hf_model.config.num_hidden_layers):
        for p in ("weight", "bias"):
            q, k, v = (sd[f"esm.encoder.layer.{i}.attention.self.{n}.{p}"] for n in ("query", "key", "value"))
            out[f"{prefix}encoder.layers.{i}.self_attention.layernorm_qkv.{p}"] = bionemo_pack_qkv(q, k, v, heads, interleaved)
    out[f"{prefix}embeddings.word_embeddings.weight"] = bionemo_pad_rows(sd["esm.embeddings.word_embeddings.weight"], padded)
    if lm_head:
        out["lm_head.decoder.bias"] = bionemo_pad_rows(sd["lm_head.bias"], padded, torch.finfo(sd["lm_head.bias"].dtype).min)
        if tied_copy:  # transformers' save_pretrained drops tied weights; a copy may still be found
            out["lm_head.decoder.weight"] = out[f"{prefix}embeddings.word_embeddings.weight"].clone()
    return out


def bionemo_config(hf_model, architecture="NVEsmForMaskedLM", **te_fields):
    """config.json as BioNeMo's export writes it: NVEsmConfig(**EsmConfig.to_dict()) saved by
    save_pretrained, then auto_map added (esm/export.py: export_hf_checkpoint)."""
    from transformers import EsmConfig

    class NVEsmConfig(EsmConfig):  # BioNeMo's fields and defaults (modeling_esm_te.NVEsmConfig)
        model_type = "nv_esm"

        def __init__(self, qkv_weight_interleaved=True, encoder_activation="gelu", attn_input_format="bshd",
                     fuse_qkv_params=True, micro_batch_size=None, max_seq_length=None, padded_vocab_size=64,
                     attn_mask_type="padding", add_pooling_layer=True, **kwargs):
            super().__init__(**kwargs)
            self.qkv_weight_interleaved, self.encoder_activation = qkv_weight_interleaved, encoder_activation
            self.attn_input_format, self.fuse_qkv_params = attn_input_format, fuse_qkv_params
            self.micro_batch_size, self.max_seq_length = micro_batch_size, max_seq_length
            self.attn_mask_type, self.add_pooling_layer = attn_mask_type, add_pooling_layer
            self.padded_vocab_size = padded_vocab_size if padded_vocab_size is not None else self.vocab_size

    fields = {k: v for k, v in hf_model.config.to_dict().items() if k not in ("model_type", "architectures")}
    config = NVEsmConfig(**fields, **te_fields)
    config.architectures = [architecture]
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        out = json.load(open(os.path.join(tmp, "config.json")))
    out["auto_map"] = {"AutoConfig": "esm_nv.NVEsmConfig", "AutoModel": "esm_nv.NVEsmModel",
                       "AutoModelForMaskedLM": "esm_nv.NVEsmForMaskedLM"}
    return out


def make_bionemo_checkpoint(out_dir, masked_lm_dir, prefix="model.", architecture="NVEsmForMaskedLM",
                            extra=None, state_kw=None, **te_fields):
    """A BioNeMo-layout directory holding the weights of a transformers EsmForMaskedLM directory."""
    from safetensors.torch import save_file

    hf = load_hf(masked_lm_dir)
    os.makedirs(out_dir, exist_ok=True)
    config = bionemo_config(hf, architecture, **te_fields)
    interleaved = config["qkv_weight_interleaved"]
    state = bionemo_state_dict(hf, prefix, interleaved, config["padded_vocab_size"], **(state_kw or {}))
    state.update(extra or {})
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return str(out_dir)


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


def write_rows(path, header, rows) -> str:
    """A CSV file of `header` and `rows` (lists of values), as a user's spreadsheet writes it."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def read_rows(path) -> list[dict]:
    """A CSV file as dicts of strings, read by the csv module (not by esm2lite)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
