"""Export: the merged encoder as an HF directory transformers loads, and the adapters as a peft
directory peft loads, both computing what the esm2lite fine-tuned encoder computes."""

import os

import pytest
import torch

import oracles
from esm2lite.cli import run_main
from esm2lite.commands.export import main as export_main
from esm2lite.checkpoints.loading import load_model
from esm2lite.model.tokenizer import Tokenizer
from esm2lite.training.loop import TrainConfig, train_model
from test_infer import assert_one_line_error, trained_run
from esm2lite import load_pretrained


@pytest.fixture(scope="module")
def run(tmp_path_factory, hf_tiny):
    return trained_run(tmp_path_factory, hf_tiny)  # the same run test_infer.py uses


@pytest.fixture(scope="module")
def tuned(run):
    return load_model(os.path.join(run["run"], "best"))


@pytest.fixture(scope="module")
def batch():
    """Padded tokens [B, T] with <mask> inside some sequences."""
    return Tokenizer().batch_encode(oracles.random_sequences(5, 4, 60, seed=4))


def ours(tuned, tokens):
    with torch.no_grad():
        return tuned.encoder(tokens, logits=False)["last_hidden_state"]


@torch.no_grad()
def agrees_on_residues(ours_out, model, call, tokens, what="last_hidden_state"):
    """esm2lite's output against call(model), an independent implementation (transformers, peft): within
    that implementation's own fp32 error, both measured against call(its float64 copy). No fixed fp32
    tolerance: those do not travel between machines."""
    keep = tokens.ne(1)  # every non-pad position (cls and eos included)
    oracles.assert_fp32_agrees(ours_out, call(model), call(oracles.float64_copy(model)), keep, what=what)


def export(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = run_main(export_main, [str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_merged_directory_loads_in_transformers(run, tuned, batch, tmp_path, capsys):
    from transformers import EsmForMaskedLM, EsmModel

    out = tmp_path / "merged"
    code, err = export(capsys, "--run", run["run"], "--merged", out)
    assert code == 0, err
    hf, info = EsmModel.from_pretrained(out, add_pooling_layer=False, output_loading_info=True)
    assert not info["mismatched_keys"], info
    assert all(k.startswith("contact_head.") for k in info["missing_keys"]), info  # out of scope, not exported
    want = ours(tuned, batch)  # adapters not merged
    agrees_on_residues(want, hf.eval(), lambda m: m(input_ids=batch, attention_mask=batch.ne(1)).last_hidden_state, batch)
    mlm, info = EsmForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["mismatched_keys"] and not info["unexpected_keys"], info
    assert all(k.startswith("esm.contact_head.") for k in info["missing_keys"]), info
    merged = load_pretrained(str(out))  # esm2lite reads it back too
    with torch.no_grad():
        out_merged = merged(batch)
    agrees_on_residues(out_merged["logits"], mlm.eval(), lambda m: m(input_ids=batch, attention_mask=batch.ne(1)).logits,
                       batch, "logits")
    # merged vs unmerged adapters in esm2lite: W + s B A rounded once into W, and the sums in another order;
    # two fp32 forwards of the tiny model, each a few eps32 x max|h| from float64 (test_parity)
    oracles.assert_fp32_close(out_merged["last_hidden_state"], want, 64, batch.ne(1), what="merged vs unmerged")
    # the merge is not a no-op: the base model computes something else, far beyond rounding
    base = load_pretrained(run["base"])(batch, logits=False)["last_hidden_state"].detach()
    assert (base - want)[batch.ne(1)].abs().max() > 1e4 * oracles.EPS32 * want[batch.ne(1)].abs().max()


# ---------------------------------------------------------------- --peft onto each transformers class

CLASSES = ("EsmModel", "EsmForMaskedLM", "EsmForSequenceClassification", "EsmForTokenClassification")


@pytest.fixture(scope="module")
def em_base(hf_tiny, tmp_path_factory):
    """hf_tiny's encoder as transformers' EsmModel saves it (no "esm." prefix, no LM head)."""
    return oracles.resave_as(hf_tiny, tmp_path_factory.mktemp("em_base") / "base", "EsmModel")


def peft_onto(cls, base, adapter):
    """What a user runs: PeftModel.from_pretrained(cls.from_pretrained(base), adapter), with peft's
    warnings collected (a missing adapter key is only a warning there)."""
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(oracles.load_hf(base, cls), str(adapter)).eval()
    return model, [str(w.message) for w in caught if "adapter keys" in str(w.message)]


def peft_hidden(model, cls, tokens):
    encoder = model if cls == "EsmModel" else model.esm  # PeftModel hands attributes on to the wrapped model
    with torch.no_grad():
        return encoder(input_ids=tokens, attention_mask=tokens.ne(1)).last_hidden_state


def peft_agrees(model, cls, tokens, want):
    """want (esm2lite's hidden states) against peft + transformers' `model` and its float64 copy."""
    agrees_on_residues(want, model, lambda m: peft_hidden(m, cls, tokens), tokens)


def assert_every_adapter_landed(model, tuned, prefix):
    """Each lora_A / lora_B peft holds equals ours, by the oracle's own map of module paths (a dropped
    key leaves B at zero, which could hide in a tolerance)."""
    from test_lora import HF_PATH, OUR_PATH

    named = dict(model.named_parameters())
    config = tuned.encoder.lora_config
    layers = range(len(tuned.encoder.layers)) if config.layers is None else config.layers
    for t in config.targets:
        for i in layers:
            ours = tuned.encoder.get_submodule(OUR_PATH[t].format(i=i))
            theirs = f"base_model.model.{prefix}{HF_PATH[t].format(i=i)}"
            assert torch.equal(named[f"{theirs}.lora_A.default.weight"], ours.lora_a), theirs
            assert torch.equal(named[f"{theirs}.lora_B.default.weight"], ours.lora_b), theirs
            assert ours.lora_b.abs().max() > 0


@pytest.mark.parametrize("cls", CLASSES)
def test_peft_export_loads_onto_each_class(run, tuned, batch, tmp_path, capsys, cls):
    out = tmp_path / "peft"
    code, err = export(capsys, "--run", run["run"], "--peft", out, "--peft-for", cls)
    assert code == 0 and err == "", err
    model, warned = peft_onto(cls, run["base"], out)
    assert not warned, warned
    assert_every_adapter_landed(model, tuned, "" if cls == "EsmModel" else "esm.")
    peft_agrees(model, cls, batch, ours(tuned, batch))
    if cls == "EsmForMaskedLM":  # the base model's LM head on the tuned encoder, as esm2lite computes it
        with torch.no_grad():
            want = tuned.encoder(batch)["logits"]
        agrees_on_residues(want, model, lambda m: m(input_ids=batch, attention_mask=batch.ne(1)).logits, batch, "logits")
    readme = (out / "README.md").read_text()
    assert f"from transformers import {cls}" in readme
    assert "- Does not reproduce: esm2lite's regression head" in readme  # the run's head: not in the adapter
    if cls.endswith("Classification"):
        assert f"{cls}'s logits come from transformers' own classifier" in readme


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # raised inside transformers
def test_peft_export_loads_where_peft_and_transformers_load_it(run, tuned, batch, tmp_path, capsys):
    """AutoPeftModel builds the chosen class from the recorded base path; transformers' own
    load_adapter reads the directory too."""
    from peft import AutoPeftModel

    out = tmp_path / "peft"
    code, err = export(capsys, "--run", run["run"], "--peft", out, "--peft-for", "EsmForTokenClassification")
    assert code == 0, err
    auto = AutoPeftModel.from_pretrained(str(out)).eval()
    assert type(auto.get_base_model()).__name__ == "EsmForTokenClassification"
    peft_agrees(auto, "EsmForTokenClassification", batch, ours(tuned, batch))
    hf = oracles.load_hf(run["base"], "EsmForSequenceClassification")  # same module paths as token classification
    hf.load_adapter(str(out))
    peft_agrees(hf.eval(), "EsmForSequenceClassification", batch, ours(tuned, batch))  # hf.esm: its encoder


@pytest.mark.parametrize("made_for, loaded_onto", [("EsmForMaskedLM", "EsmModel"),
                                                   ("EsmModel", "EsmForSequenceClassification")])
def test_peft_export_onto_another_layout_fails_loudly(run, tmp_path, capsys, made_for, loaded_onto):
    """Not a warning and zero adapters: peft stops, and the error names the module paths."""
    from peft.utils.error import NoMatchingPeftModuleError

    out = tmp_path / "peft"
    code, err = export(capsys, "--run", run["run"], "--peft", out, "--peft-for", made_for)
    assert code == 0, err
    with pytest.raises(NoMatchingPeftModuleError, match="not found in the base model"):
        peft_onto(loaded_onto, run["base"], out)


def test_peft_export_default_follows_the_base_models_lm_head(run, tuned, batch, em_base, tmp_path, capsys):
    """Default: EsmForMaskedLM for a base with an LM head; EsmModel for one without (the same
    encoder saved by transformers' EsmModel, given with --base-path); EsmForMaskedLM is then refused."""
    import json

    code, _ = export(capsys, "--run", run["run"], "--peft", tmp_path / "a")
    assert code == 0
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["auto_mapping"]["base_model_class"] \
        == "EsmForMaskedLM"
    capsys.readouterr()
    code = run_main(export_main, ["--run", run["run"], "--base-path", em_base, "--peft", str(tmp_path / "b")])
    printed = capsys.readouterr().out
    assert code == 0
    assert "for transformers' EsmModel (checked with peft" in printed and "takes all 24 adapter tensors" in printed, printed
    model, warned = peft_onto("EsmModel", em_base, tmp_path / "b")
    assert not warned
    peft_agrees(model, "EsmModel", batch, ours(tuned, batch))
    code, err = export(capsys, "--run", run["run"], "--base-path", em_base, "--peft", tmp_path / "c",
                       "--peft-for", "EsmForMaskedLM")
    assert_one_line_error(code, err, tmp_path / "c", match="--peft-for EsmForMaskedLM: the base model")


def test_peft_export_reads_back_into_esm2lite(run, tuned, batch, tmp_path, capsys):
    """load_peft_adapter takes both layouts the export writes."""
    from esm2lite.weights.peft import load_peft_adapter

    for cls in ("EsmModel", "EsmForSequenceClassification"):
        code, err = export(capsys, "--run", run["run"], "--peft", tmp_path / cls, "--peft-for", cls)
        assert code == 0, err
        model = load_pretrained(run["base"])
        assert load_peft_adapter(model, tmp_path / cls) == {}
        with torch.no_grad():
            got = model.eval()(batch, logits=False)["last_hidden_state"]
        # the same adapters and base weights in the same LoRA layers: the same arithmetic, bit for bit
        assert torch.equal(got[batch.ne(1)], ours(tuned, batch)[batch.ne(1)]), cls


def test_peft_notes_say_when_transformers_cannot_load_the_base(hf_tiny, fair_tiny, tmp_path):
    """A fair-esm .pt or a BioNeMo directory is no base for transformers' Esm classes as it is."""
    from esm2lite.weights.export import peft_notes

    bionemo = oracles.make_bionemo_checkpoint(tmp_path / "bionemo", hf_tiny)
    for base in (fair_tiny, bionemo):
        assert f"transformers cannot load the base model {base}" in peft_notes("EsmModel", base, "regression")[-1]
    assert len(peft_notes("EsmModel", hf_tiny, "regression")) == 3
    assert len(peft_notes("EsmModel", "facebook/esm2_t6_8M_UR50D", "regression")) == 3  # a hub id
    assert "random initialisation" in peft_notes("EsmModel", None, "regression")[-1]


def test_export_errors_are_one_line_and_write_nothing(run, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    merged, peft = tmp_path / "m", tmp_path / "p"
    cases = [
        (["--run", tmp_path / "nope", "--merged", merged], "no best/"),
        (["--checkpoint", tmp_path / "nope", "--merged", merged], "not found"),
        (["--run", run["run"]], "--merged OUT and/or --peft OUT"),
        (["--run", run["run"], "--peft", peft, "--merged", tmp_path / "taken"], "not empty"),
        (["--run", run["run"], "--merged", merged, "--base-path", tmp_path / "gone"], "is not there"),
        (["--run", run["run"], "--merged", merged, "--peft-for", "EsmModel"], "--peft-for needs --peft"),
        (["--run", run["run"], "--peft", peft, "--peft-for", "EsmForCausalLM"], "--peft-for: invalid choice"),
    ]
    for argv, match in cases:
        code, err = export(capsys, *argv)
        assert_one_line_error(code, err, merged, peft, match=match)
    assert (tmp_path / "taken" / "x").read_text() == "x"


def test_peft_export_needs_a_lora_checkpoint(hf_tiny, tmp_path, capsys):
    from esm2lite.data.records import records_from_pairs

    records = {"train": records_from_pairs([("MKTAYIAKQR", 0.1), ("GSHMLEDPVDAFQ", 0.7)])}
    train_model(TrainConfig(checkpoint=hf_tiny, mode="head", steps=1, out=str(tmp_path / "run"), log_every=1),
                records=records)
    out = tmp_path / "peft"
    code, err = export(capsys, "--run", tmp_path / "run", "--peft", out)
    assert_one_line_error(code, err, out, match="needs a LoRA checkpoint")
    code, err = export(capsys, "--run", tmp_path / "run", "--merged", tmp_path / "merged")  # head mode: base as is
    assert code == 0, err
