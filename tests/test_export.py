"""Export: the merged encoder as an HF directory transformers loads, and the adapters as a peft
directory peft loads, both computing what the esm2lite fine-tuned encoder computes."""

import os

import pytest
import torch

import oracles
from esm2lite.cli import run_main
from esm2lite.export import main as export_main
from esm2lite.ckpt_dir import load_model
from esm2lite.model import ESM2
from esm2lite.tokenizer import Tokenizer
from esm2lite.train import TrainConfig, train_model
from test_infer import assert_one_line_error, trained_run


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


def assert_same_on_residues(got, want, tokens, atol=5e-5):
    keep = tokens.ne(1)  # every non-pad position (cls and eos included)
    assert (got[keep] - want[keep]).abs().max() <= atol


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
    with torch.no_grad():
        got = hf.eval()(input_ids=batch, attention_mask=batch.ne(1)).last_hidden_state
    want = ours(tuned, batch)
    assert_same_on_residues(got, want, batch)
    mlm, info = EsmForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["mismatched_keys"] and not info["unexpected_keys"], info
    assert all(k.startswith("esm.contact_head.") for k in info["missing_keys"]), info
    with torch.no_grad():
        logits = mlm.eval()(input_ids=batch, attention_mask=batch.ne(1)).logits
        ref = ESM2.from_pretrained(str(out))(batch)["logits"]  # esm2lite reads it back too
    assert_same_on_residues(logits, ref, batch)
    assert_same_on_residues(ESM2.from_pretrained(str(out))(batch, logits=False)["last_hidden_state"].detach(),
                            want, batch, atol=1e-5)
    # the merge is not a no-op: the base model computes something else
    base = ESM2.from_pretrained(run["base"])(batch, logits=False)["last_hidden_state"].detach()
    assert (base - want)[batch.ne(1)].abs().max() > 1e-3


def test_peft_directory_loads_in_peft(run, tuned, batch, tmp_path, capsys):
    from peft import PeftModel
    from transformers import EsmModel

    out = tmp_path / "peft"
    code, err = export(capsys, "--run", run["run"], "--peft", out)
    assert code == 0, err
    base = EsmModel.from_pretrained(run["base"], add_pooling_layer=False)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        got = model(input_ids=batch, attention_mask=batch.ne(1)).last_hidden_state
    assert_same_on_residues(got, ours(tuned, batch), batch)


def test_export_errors_are_one_line_and_write_nothing(run, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    merged, peft = tmp_path / "m", tmp_path / "p"
    cases = [
        (["--run", tmp_path / "nope", "--merged", merged], "no best/"),
        (["--checkpoint", tmp_path / "nope", "--merged", merged], "not found"),
        (["--run", run["run"]], "--merged OUT and/or --peft OUT"),
        (["--run", run["run"], "--peft", peft, "--merged", tmp_path / "taken"], "not empty"),
        (["--run", run["run"], "--merged", merged, "--base-path", tmp_path / "gone"], "no such file"),
    ]
    for argv, match in cases:
        code, err = export(capsys, *argv)
        assert_one_line_error(code, err, merged, peft, match=match)
    assert (tmp_path / "taken" / "x").read_text() == "x"


def test_peft_export_needs_a_lora_checkpoint(hf_tiny, tmp_path, capsys):
    from esm2lite.records import records_from_pairs

    records = {"train": records_from_pairs([("MKTAYIAKQR", 0.1), ("GSHMLEDPVDAFQ", 0.7)])}
    train_model(TrainConfig(checkpoint=hf_tiny, mode="head", steps=1, out=str(tmp_path / "run"), log_every=1),
                records=records)
    out = tmp_path / "peft"
    code, err = export(capsys, "--run", tmp_path / "run", "--peft", out)
    assert_one_line_error(code, err, out, match="needs a LoRA checkpoint")
    code, err = export(capsys, "--run", tmp_path / "run", "--merged", tmp_path / "merged")  # head mode: base as is
    assert code == 0, err
