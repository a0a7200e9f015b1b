"""Every HF-format ESM-2 directory users have: EsmForMaskedLM, EsmModel, EsmFor*Classification
(saved by transformers itself) and BioNeMo's NVEsm layout (written as BioNeMo's converter does,
tests/oracles.py). Each loads equal to the same weights in the EsmForMaskedLM layout and agrees
with transformers on the same weights."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import oracles
from esm2lite import ESM2, CheckpointError, Esm2liteError, Tokenizer
from esm2lite import load_pretrained

NO_HEAD = ("EsmModel", "EsmForSequenceClassification", "EsmForTokenClassification")
# What each class's directory holds besides the encoder: reported as ignored, never loaded.
TASK_HEADS = {
    "EsmModel": ["contact_head.regression.bias", "contact_head.regression.weight",
                 "pooler.dense.bias", "pooler.dense.weight"],
    "EsmForSequenceClassification": ["classifier.dense.bias", "classifier.dense.weight", "classifier.out_proj.bias",
                                     "classifier.out_proj.weight", "esm.contact_head.regression.bias",
                                     "esm.contact_head.regression.weight"],
    "EsmForTokenClassification": ["classifier.bias", "classifier.weight", "esm.contact_head.regression.bias",
                                  "esm.contact_head.regression.weight"],
}


@pytest.fixture(scope="module")
def batch():
    return Tokenizer().batch_encode(oracles.random_sequences(5, 5, 40, seed=4))


@pytest.fixture(scope="module")
def resaved(hf_tiny, tmp_path_factory):
    """hf_tiny (EsmForMaskedLM, perturbed inv_freq) loaded into each class and saved again."""
    root = tmp_path_factory.mktemp("resaved")
    return {cls: oracles.resave_as(hf_tiny, root / cls, cls, seed=5) for cls in NO_HEAD}


def nonpad(t, tokens):
    return t[tokens != 1]


def hf_hidden(model, tokens):
    """transformers' final hidden states [B, T, d] and per-layer residual stream (0 = embeddings)."""
    with torch.no_grad():
        out = oracles.hf_encoder(model)(input_ids=tokens, attention_mask=tokens.ne(1).long(), output_hidden_states=True)
    return out.last_hidden_state, out.hidden_states


def agrees_with_hf(ours, model, tokens, what="last_hidden_state"):
    """ours [B, T, d] against transformers' final hidden state: within the fp32 error of transformers
    itself, both measured against its float64 run (no fixed fp32 tolerance: they do not travel)."""
    theirs, exact = (hf_hidden(m, tokens)[0] for m in (model, oracles.float64_copy(model)))
    oracles.assert_fp32_agrees(ours, theirs, exact, tokens.ne(1), what=what)


def file_keys(directory):
    return set(load_file(os.path.join(directory, "model.safetensors")))


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- transformers' own classes


def test_transformers_writes_the_layouts_we_expect(resaved):
    """The directories hold what the loader is written for (transformers 5.x save_pretrained)."""
    bare = file_keys(resaved["EsmModel"])
    assert "embeddings.word_embeddings.weight" in bare and not any(k.startswith(("esm.", "lm_head.")) for k in bare)
    assert {"pooler.dense.weight", "pooler.dense.bias"} <= bare
    for cls in NO_HEAD[1:]:
        keys = file_keys(resaved[cls])
        assert "esm.embeddings.word_embeddings.weight" in keys and not any(k.startswith("lm_head.") for k in keys)
        assert set(TASK_HEADS[cls]) <= keys


@pytest.mark.parametrize("cls", NO_HEAD)
def test_no_lm_head_layouts_load_the_same_encoder(cls, hf_tiny, resaved, capsys):
    """A trained classifier left out is named in one line; the contact head and pooler every hub
    file carries are left out without a word."""
    capsys.readouterr()
    ours = load_pretrained(resaved[cls])
    out, err = capsys.readouterr()
    named = [k for k in TASK_HEADS[cls] if k.startswith("classifier.")]
    assert not err  # stderr is for errors
    if named:
        assert out == f"warning: {resaved[cls]}: ignored {len(named)} task-head weights that are not part of the " \
                      f"encoder: {', '.join(named)}\n"
    else:
        assert out == ""
    assert ours.config.lm_head is False
    full = load_pretrained(hf_tiny).state_dict()
    assert_same_tensors(ours.state_dict(), {k: v for k, v in full.items() if not k.startswith("lm_head.")})


@pytest.mark.parametrize("cls", NO_HEAD)
def test_no_lm_head_layouts_match_transformers(cls, resaved, batch):
    """Hidden states (every layer and the final one) against transformers' class on the same directory."""
    ours = load_pretrained(resaved[cls])
    hf = oracles.load_hf(resaved[cls], cls)
    (last, layers), (last64, layers64) = hf_hidden(hf, batch), hf_hidden(oracles.float64_copy(hf), batch)
    with torch.no_grad():
        out = ours(batch, repr_layers=range(len(layers)), logits=False)
    keep = batch.ne(1)
    oracles.assert_fp32_agrees(out["last_hidden_state"], last, last64, keep, what="last_hidden_state")
    for i in range(len(layers) - 1):  # transformers' last entry is after the final LayerNorm
        oracles.assert_fp32_agrees(out["hidden_states"][i], layers[i], layers64[i], keep, what=f"hidden_states[{i}]")


def test_masked_lm_layout_says_nothing_of_its_contact_head(hf_tiny, capsys):
    """Every hub EsmForMaskedLM carries esm.contact_head.*: expected, left out silently."""
    assert {"esm.contact_head.regression.bias", "esm.contact_head.regression.weight"} <= file_keys(hf_tiny)
    capsys.readouterr()
    assert load_pretrained(hf_tiny).config.lm_head is True
    assert capsys.readouterr() == ("", "")


def test_ignored_weights_reported_by_rank_zero_only(resaved, capsys, monkeypatch):
    capsys.readouterr()
    load_pretrained(resaved["EsmForTokenClassification"])
    assert capsys.readouterr().out.startswith("warning: ")
    monkeypatch.setenv("RANK", "1")
    load_pretrained(resaved["EsmForTokenClassification"])
    assert capsys.readouterr() == ("", "")


def test_logits_without_lm_head_is_a_one_line_error(resaved, batch):
    model = load_pretrained(resaved["EsmForSequenceClassification"])
    with pytest.raises(Esm2liteError) as e:
        model(batch)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{resaved['EsmForSequenceClassification']}: this checkpoint has no LM head")
    with pytest.raises(Esm2liteError, match="has no LM head"):
        model.lm_head(None, None)
    assert not list(model.lm_head.parameters())


def test_missing_encoder_weight_still_an_error(resaved, tmp_path):
    d = shutil.copytree(resaved["EsmModel"], tmp_path / "m")
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    del tensors["encoder.layer.1.output.dense.weight"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(d)
    assert str(e.value) == f"{d}: weights do not fit the config (1 missing keys: layers.1.fc2.weight)"


def test_unexpected_key_named_as_in_the_file(resaved, tmp_path):
    """An unknown key in the prefix-less EsmModel layout is named with its own (unprefixed) name."""
    d = shutil.copytree(resaved["EsmModel"], tmp_path / "u")
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    tensors["encoder.layer.0.adapter.weight"] = torch.zeros(2)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"\(1 unexpected keys: encoder\.layer\.0\.adapter\.weight\)$"):
        load_pretrained(d)


def test_partial_lm_head_is_an_error(hf_tiny, tmp_path):
    """The LM head is optional, but all of it or none."""
    d = shutil.copytree(hf_tiny, tmp_path / "p")
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    del tensors["lm_head.dense.weight"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"1 missing keys: lm_head\.dense\.weight"):
        load_pretrained(d)


def test_no_lm_head_model_saves_as_esm_model(resaved, tmp_path, batch):
    """save_hf_dir of a model without LM head writes transformers' EsmModel layout (no "esm."
    prefix, architectures EsmModel); transformers and esm2lite read it back unchanged."""
    from esm2lite.weights.pretrained import save_hf_dir

    ours = load_pretrained(resaved["EsmForTokenClassification"])
    save_hf_dir(ours, tmp_path / "out")
    assert json.load(open(tmp_path / "out" / "config.json"))["architectures"] == ["EsmModel"]
    keys = file_keys(tmp_path / "out")
    assert "embeddings.word_embeddings.weight" in keys and not any(k.startswith(("esm.", "lm_head.")) for k in keys)
    assert_same_tensors(load_pretrained(tmp_path / "out").state_dict(), ours.state_dict())
    hf = oracles.load_hf(tmp_path / "out", "EsmModel", add_pooling_layer=False)
    with torch.no_grad():
        agrees_with_hf(ours(batch, logits=False)["last_hidden_state"], hf, batch)


def test_no_lm_head_config_fields():
    from esm2lite import ESM2Config

    with_head, without = ESM2Config(), ESM2Config(lm_head=False)
    assert with_head.num_parameters() - without.num_parameters() == sum(
        p.numel() for p in ESM2(with_head).lm_head.parameters())
    assert without.to_hf_config()["architectures"] == ["EsmModel"]
    with pytest.raises(Esm2liteError, match="lm_head must be true or false"):
        ESM2Config(lm_head="no")


# ---------------------------------------------------------------- BioNeMo


@pytest.fixture(scope="module")
def hf_plain(tmp_path_factory):
    """EsmForMaskedLM with transformers' own inv_freq: BioNeMo's files store none (TE computes it)."""
    return oracles.make_hf_checkpoint(tmp_path_factory.mktemp("hf_plain"), **oracles.TINY, seed=8)


@pytest.fixture(scope="module")
def bionemo(hf_plain, tmp_path_factory):
    return oracles.make_bionemo_checkpoint(tmp_path_factory.mktemp("bionemo") / "nv", hf_plain)


def test_bionemo_file_is_in_bionemo_layout(bionemo):
    keys = file_keys(bionemo)
    assert "model.encoder.layers.0.self_attention.layernorm_qkv.weight" in keys
    assert not any("query" in k or "inv_freq" in k for k in keys)
    assert load_file(os.path.join(bionemo, "model.safetensors"))["model.embeddings.word_embeddings.weight"].shape == (64, 64)
    config = json.load(open(os.path.join(bionemo, "config.json")))
    assert config["model_type"] == "nv_esm" and config["architectures"] == ["NVEsmForMaskedLM"]
    assert config["qkv_weight_interleaved"] is True and config["padded_vocab_size"] == 64


@pytest.mark.parametrize("prefix", ["model.", "esm."])
def test_bionemo_loads_equal_to_hf_layout(hf_plain, tmp_path, batch, prefix, capsys):
    d = oracles.make_bionemo_checkpoint(tmp_path / "nv", hf_plain, prefix=prefix)  # interleaved QKV (refused if not)
    capsys.readouterr()
    got, want = load_pretrained(d), load_pretrained(hf_plain)
    assert capsys.readouterr().out.count(d) == 0  # nothing ignored: BioNeMo keeps no contact head
    assert_same_tensors(got.state_dict(), want.state_dict())
    with torch.no_grad():
        assert torch.equal(got(batch)["logits"], want(batch)["logits"])


def test_bionemo_matches_transformers(bionemo, hf_plain, batch):
    """esm2lite on the BioNeMo file against transformers EsmForMaskedLM on the same weights."""
    hf = oracles.load_hf(hf_plain)
    hf64 = oracles.float64_copy(hf)
    with torch.no_grad():
        logits, logits64 = (m(input_ids=batch, attention_mask=batch.ne(1).long()).logits for m in (hf, hf64))
        out = load_pretrained(bionemo)(batch)
    oracles.assert_fp32_agrees(out["logits"], logits, logits64, batch.ne(1), what="logits")
    agrees_with_hf(out["last_hidden_state"], hf, batch)


def test_bionemo_esm_model_and_token_classification(hf_plain, tmp_path, batch, capsys):
    """NVEsmModel (no prefix, pooler, no LM head) and NVEsmForTokenClassification (classifier)."""
    want = {k: v for k, v in load_pretrained(hf_plain).state_dict().items() if not k.startswith("lm_head.")}
    pooler = {"pooler.dense.weight": torch.randn(64, 64), "pooler.dense.bias": torch.randn(64)}
    classifier = {"classifier.weight": torch.randn(3, 64), "classifier.bias": torch.randn(3)}
    for name, prefix, extra in (("NVEsmModel", "", pooler), ("NVEsmForTokenClassification", "model.", classifier)):
        d = oracles.make_bionemo_checkpoint(tmp_path / name, hf_plain, prefix=prefix, architecture=name, extra=extra,
                                            state_kw={"lm_head": False})
        capsys.readouterr()
        model = load_pretrained(d)
        out = capsys.readouterr().out
        if "pooler.dense.bias" in extra:  # every EsmModel file carries a pooler: expected, no word of it
            assert out == ""
        else:
            assert out.startswith("warning: ") and out.rstrip().endswith(", ".join(sorted(extra)))
        assert model.config.lm_head is False
        assert_same_tensors(model.state_dict(), want)
        with torch.no_grad():
            agrees_with_hf(model(batch, logits=False)["last_hidden_state"], oracles.load_hf(hf_plain), batch, name)


def test_bionemo_tied_decoder_copy_checked(hf_plain, tmp_path):
    d = oracles.make_bionemo_checkpoint(tmp_path / "tied", hf_plain, state_kw={"tied_copy": True})
    load_pretrained(d)  # an equal (padded) copy of the embedding is fine
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    tensors["lm_head.decoder.weight"][3] += 1
    save_file(tensors, path)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(d)
    assert str(e.value) == f"{d}: lm_head.decoder.weight differs from the token embedding; ESM-2's LM head is tied"


def test_bionemo_extra_state_ignored_and_old_inv_freq_used(hf_plain, tmp_path):
    """TransformerEngine's _extra_state entries are not weights; an inv_freq saved by older
    exports is used (it is TE's formula, as transformers' here)."""
    inv = load_pretrained(hf_plain).layers[0].attn.inv_freq
    extra = {"model.encoder.layers.0.self_attention.core_attention._extra_state": torch.zeros(4, dtype=torch.uint8),
             "model.encoder.layers.1.layernorm_mlp._extra_state": torch.zeros(2, dtype=torch.uint8),
             "model.encoder.rotary_embeddings.inv_freq": inv * 2}
    d = oracles.make_bionemo_checkpoint(tmp_path / "x", hf_plain, extra=extra)
    model = load_pretrained(d)
    assert all(torch.equal(b.attn.inv_freq, inv * 2) for b in model.layers)


def test_bionemo_errors(hf_plain, tmp_path):
    d = oracles.make_bionemo_checkpoint(tmp_path / "unfused", hf_plain, fuse_qkv_params=False)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(d)
    assert str(e.value) == (f"{d}: config.json field fuse_qkv_params is False; esm2lite reads BioNeMo checkpoints "
                            "with fuse_qkv_params True (NVEsmConfig's default)")
    d = oracles.make_bionemo_checkpoint(tmp_path / "relu", hf_plain, encoder_activation="relu")
    with pytest.raises(CheckpointError, match="field encoder_activation is 'relu'"):
        load_pretrained(d)

    d = oracles.make_bionemo_checkpoint(tmp_path / "bad", hf_plain)
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    key = "model.encoder.layers.1.self_attention.layernorm_qkv.weight"
    tensors[key] = tensors[key][:-1]
    del tensors["model.encoder.layers.0.layernorm_mlp.fc1_bias"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(d)
    assert str(e.value) == f"{d}: {key} has 191 rows, not 3 x 4 heads x head size"
    tensors[key] = torch.zeros(3 * 4 * 8, 64)  # divisible, but the wrong size: a shape error
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"1 missing keys: layers\.0\.fc1\.bias; .*shape mismatches: "
                                              r"layers\.1\.attn\.key\.weight file \(32, 64\) vs model \(64, 64\)"):
        load_pretrained(d)


def test_bionemo_converts_to_an_hf_directory(bionemo, hf_plain, tmp_path, batch, forkrun):
    """esm2lite-convert BIONEMO_DIR OUT: transformers reads OUT as EsmForMaskedLM."""
    r = forkrun.run(["-m", "esm2lite.commands.convert", bionemo, tmp_path / "hf"])
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        got = oracles.load_hf(tmp_path / "hf")(input_ids=batch, attention_mask=batch.ne(1).long()).logits
        want = oracles.load_hf(hf_plain)(input_ids=batch, attention_mask=batch.ne(1).long()).logits
    assert torch.equal(nonpad(got, batch), nonpad(want, batch))


# ---------------------------------------------------------------- fine-tuning from each layout

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_csv(path, n, seed):
    seqs = oracles.random_sequences(n, 10, 30, seed=seed, with_mask=False)
    with open(path, "w") as f:
        f.write("sequence,target\n" + "".join(f"{s},{s.count('K') / len(s)}\n" for s in seqs))
    return str(path)


def train_cli(forkrun, checkpoint, out, mode, tmp_path):
    """python train.py --checkpoint DIR ... as a user runs it; the finished run's best/ checkpoint."""
    from esm2lite.checkpoints.loading import load_model

    args = [os.path.join(ROOT, "train.py"), "--checkpoint", checkpoint, "--mode", mode,
            "--train-csv", write_csv(tmp_path / "train.csv", 24, 1), "--valid-csv", write_csv(tmp_path / "valid.csv", 8, 2),
            "--steps", "2", "--eval-every", "2", "--batch-tokens", "400", "--out", str(out), "--device", "cpu"]
    r = forkrun.run(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout, load_model(str(out / "best"))


@pytest.mark.slow
def test_fine_tune_esm_model_directory(resaved, tmp_path, batch, forkrun):
    """Full fine-tune from an EsmModel directory (no LM head): trains, saves, loads back."""
    out, tuned = train_cli(forkrun, resaved["EsmModel"], tmp_path / "run", "full", tmp_path)
    assert "warning" not in out  # its contact head and pooler are expected
    assert tuned.encoder.config.lm_head is False
    assert not any(k.startswith("lm_head.") for k in tuned.encoder.state_dict())
    before = load_pretrained(resaved["EsmModel"]).state_dict()
    after = tuned.encoder.state_dict()
    assert not torch.equal(before["layers.0.fc1.weight"], after["layers.0.fc1.weight"])  # it trained
    with torch.no_grad():
        assert torch.isfinite(tuned(batch)).all()
        want = tuned.encoder(batch, logits=False)["last_hidden_state"]
    # Its export is an EsmModel directory that transformers reads with the fine-tuned encoder.
    r = forkrun.run(["-m", "esm2lite.commands.export", "--run", tmp_path / "run", "--merged", tmp_path / "merged"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.load(open(tmp_path / "merged" / "config.json"))["architectures"] == ["EsmModel"]
    agrees_with_hf(want, oracles.load_hf(tmp_path / "merged", "EsmModel", add_pooling_layer=False), batch)


@pytest.mark.slow
def test_fine_tune_bionemo_directory(bionemo, hf_plain, tmp_path, batch, forkrun):
    """Head-only fine-tune from a BioNeMo directory: the frozen encoder it trained on is
    transformers' EsmForMaskedLM on the same weights."""
    _, tuned = train_cli(forkrun, bionemo, tmp_path / "run", "head", tmp_path)
    with torch.no_grad():
        agrees_with_hf(tuned.encoder(batch, logits=False)["last_hidden_state"], oracles.load_hf(hf_plain), batch)
    _, tuned = train_cli(forkrun, bionemo, tmp_path / "lora", "lora", tmp_path)  # reloads the base from the BioNeMo file
    assert tuned.encoder.config.lm_head is True
