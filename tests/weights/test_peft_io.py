"""peft directories both ways, per transformers class: adapters peft saved on EsmModel,
EsmForMaskedLM, EsmForSequenceClassification and EsmForTokenClassification load into esm2lite;
the check that peft takes every adapter tensor esm2lite writes, before the directory is in place."""

import os
import sys
import warnings

import pytest
import torch

import oracles
from esm2lite.errors import CheckpointError
from esm2lite.model.lora import LoRAConfig, apply_lora
from esm2lite.weights.peft import check_in_peft, load_peft_adapter, save_peft_adapter, target_regex
from esm2lite.model.tokenizer import Tokenizer
from esm2lite import load_pretrained

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # raised inside peft


@pytest.fixture(scope="module")
def batch():
    return Tokenizer().batch_encode(oracles.random_sequences(4, 5, 30, seed=12))  # padded, with <mask>


def random_lora_(model, seed):
    """Non-zero A and B everywhere (B's zero init would hide a dropped or misplaced tensor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def peft_saved(base, cls, path, **lora_kw):
    """An adapter as a transformers + peft user saves it, on `cls`."""
    extra = {} if cls in ("EsmModel", "EsmForMaskedLM") else {"num_labels": 3}
    model = peft.get_peft_model(oracles.load_hf(base, cls, **extra), peft.LoraConfig(r=4, lora_alpha=12, **lora_kw))
    random_lora_(model, seed=len(cls))
    model.save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize("cls, lora_kw, heads", [
    ("EsmModel", dict(target_modules=["query", "key", "value", "output.dense", "intermediate.dense"]), []),
    ("EsmForMaskedLM", dict(target_modules=["query", "value"], lora_dropout=0.1), []),
    ("EsmForSequenceClassification", dict(target_modules=["key", "intermediate.dense"], task_type="SEQ_CLS"),
     ["classifier.dense.bias", "classifier.dense.weight", "classifier.out_proj.bias", "classifier.out_proj.weight"]),
    ("EsmForTokenClassification", dict(target_modules=["value", "attention.output.dense"], task_type="TOKEN_CLS"),
     ["classifier.bias", "classifier.weight"]),
])
def test_adapters_peft_saved_on_each_class_load_into_esm2lite(hf_tiny, tmp_path, batch, cls, lora_kw, heads):
    theirs = peft_saved(hf_tiny, cls, tmp_path / "adapter", **lora_kw)
    ours = load_pretrained(hf_tiny)
    got_heads = load_peft_adapter(ours, tmp_path / "adapter")
    assert sorted(got_heads) == heads  # modules_to_save come back, not dropped
    theirs64 = oracles.float64_copy(theirs)  # the fp32 comparison's yardstick: peft + transformers in float64
    with torch.no_grad():
        want, ref = (oracles.hf_encoder(m.get_base_model())(input_ids=batch, attention_mask=batch.ne(1)).last_hidden_state
                     for m in (theirs, theirs64))
        got = ours.eval()(batch)
    keep = batch.ne(1)  # padding rows are garbage in every implementation
    oracles.assert_fp32_agrees(got["last_hidden_state"], want, ref, keep, what="last_hidden_state")
    if cls == "EsmForMaskedLM":
        with torch.no_grad():
            logits, ref = (m(input_ids=batch, attention_mask=batch.ne(1)).logits for m in (theirs, theirs64))
        oracles.assert_fp32_agrees(got["logits"], logits, ref, keep, what="logits")


@pytest.mark.parametrize("cls", ["EsmModel", "EsmForMaskedLM", "EsmForSequenceClassification",
                                 "EsmForTokenClassification"])
def test_a_layer_and_target_subset_lands_on_exactly_those_modules(hf_tiny, tmp_path, batch, cls):
    ours = apply_lora(load_pretrained(hf_tiny), LoRAConfig(rank=2, alpha=3.0, targets=("key", "fc2"), layers=(1,)))
    random_lora_(ours, seed=5)
    save_peft_adapter(ours, tmp_path / "adapter", base_model_name_or_path=hf_tiny, for_class=cls)
    theirs = peft.PeftModel.from_pretrained(oracles.load_hf(hf_tiny, cls), str(tmp_path / "adapter")).eval()
    prefix = "" if cls == "EsmModel" else "esm."
    adapted = {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in theirs.named_modules()
               if n.endswith(".lora_A")}
    assert adapted == {f"{prefix}encoder.layer.1.attention.self.key", f"{prefix}encoder.layer.1.output.dense"}
    with torch.no_grad():
        ours_h = ours.eval()(batch, logits=False)["last_hidden_state"]
        theirs_h, ref = (oracles.hf_encoder(m.get_base_model())(input_ids=batch, attention_mask=batch.ne(1))
                         .last_hidden_state for m in (theirs, oracles.float64_copy(theirs)))
    oracles.assert_fp32_agrees(ours_h, theirs_h, ref, batch.ne(1), what="last_hidden_state")


def test_target_regex_matches_exactly_its_paths_in_peft():
    """peft's own matcher (re.fullmatch): the product form and the plain alternation."""
    from peft.tuners.tuners_utils import check_target_module_exists

    every = [f"{p}encoder.layer.{i}.{m}" for p in ("", "esm.") for i in (0, 1, 2, 11)
             for m in ("attention.self.query", "attention.output.dense", "output.dense", "intermediate.dense")]
    for paths in (["esm.encoder.layer.2.output.dense", "esm.encoder.layer.11.output.dense"],
                  ["encoder.layer.0.attention.output.dense", "encoder.layer.1.output.dense"]):
        config = peft.LoraConfig(target_modules=target_regex(paths))
        assert [k for k in every if check_target_module_exists(config, k)] == paths


def test_the_check_catches_what_peft_only_warns_about(hf_tiny, tmp_path):
    """The failure the export used to ship: adapter keys for EsmModel (suffix target_modules) loaded
    onto EsmForMaskedLM. peft warns and keeps every lora_B at zero; check_in_peft refuses."""
    peft_saved(hf_tiny, "EsmModel", tmp_path / "adapter", target_modules=["query", "value"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(oracles.load_hf(hf_tiny, "EsmForMaskedLM"), str(tmp_path / "adapter"))
    assert any("missing adapter keys" in str(w.message) for w in caught)
    assert all(p.abs().max() == 0 for n, p in loaded.named_parameters() if "lora_B" in n)
    hf_config = load_pretrained(hf_tiny).config.to_hf_config()
    assert "takes all 8" in check_in_peft(str(tmp_path / "adapter"), hf_config, "EsmModel", 8, "adapter")
    with pytest.raises(CheckpointError, match=r"^adapter: peft .* no module on EsmForMaskedLM for 8 of the 8 .* no value for 8 of the 8 ") as e:
        check_in_peft(str(tmp_path / "adapter"), hf_config, "EsmForMaskedLM", 8, "adapter")
    assert "\n" not in str(e.value)


def test_a_failed_check_writes_nothing(hf_tiny, tmp_path, monkeypatch):
    import esm2lite.weights.peft as peft_io

    ours = apply_lora(load_pretrained(hf_tiny), LoRAConfig(rank=2, targets=("query",)))
    monkeypatch.setattr(peft_io, "target_regex", lambda paths: "no\\.such\\.module")
    with pytest.raises(CheckpointError, match="cannot load this adapter onto EsmModel .*not found in the base model"):
        save_peft_adapter(ours, tmp_path / "adapter")
    assert os.listdir(tmp_path) == []  # neither the directory nor a temporary


def test_without_peft_the_check_says_so(hf_tiny, tmp_path, monkeypatch):
    ours = apply_lora(load_pretrained(hf_tiny), LoRAConfig(rank=2, targets=("query",)))
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    assert save_peft_adapter(ours, tmp_path / "adapter") == "not checked with peft (peft or transformers is not " \
                                                             "installed here)"
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
