"""A LoRA / head checkpoint names its base model by the sha256 of the encoder's weights: the same
encoder saved in another layout (with or without the LM head) is the same base, other encoder
weights are refused, and checkpoints that recorded the older hash (LM head included) still load."""

import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import oracles
from esm2lite.checkpoints.loading import load_model
from esm2lite.errors import CheckpointError
from esm2lite.model.tokenizer import Tokenizer
from test_infer import trained_run
from esm2lite import load_pretrained


def sha256_v1(state: dict) -> str:
    """The hash checkpoints recorded before (esm2lite 190c633, checkpoint.weights_sha256, verbatim):
    our names in sorted order, "name:shape;" then the fp32 bytes, adapters skipped."""
    h = hashlib.sha256()
    for key in sorted(state):
        if "lora_" in key:
            continue
        t = state[key].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory, hf_tiny):
    return trained_run(tmp_path_factory, hf_tiny)  # base: hf_tiny, an EsmForMaskedLM directory


@pytest.fixture(scope="module")
def best(run):
    return os.path.join(run["run"], "best")


@pytest.fixture(scope="module")
def tokens():
    return Tokenizer().batch_encode(oracles.random_sequences(3, 5, 40, seed=8))


def hidden(ckpt, tokens, **kw):
    with torch.no_grad():
        return load_model(ckpt, **kw).encoder(tokens, logits=False)["last_hidden_state"]


def edited_copy(src, dst, key, delta):
    """A copy of an HF directory with one tensor of its model.safetensors moved by `delta`."""
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    tensors[key] = tensors[key] + delta
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def test_a_checkpoint_records_the_hash_of_the_encoder_alone(best, hf_tiny):
    state = load_pretrained(hf_tiny).state_dict()
    recorded = json.loads(open(os.path.join(best, "config.json")).read())["base"]["sha256"]
    assert recorded == sha256_v1({k: v for k, v in state.items() if not k.startswith("lm_head.")})
    assert recorded != sha256_v1(state)


@pytest.mark.parametrize("cls", ["EsmModel", "EsmForSequenceClassification", "EsmForTokenClassification"])
def test_the_same_encoder_in_another_layout_is_the_same_base(best, hf_tiny, tokens, tmp_path, cls):
    """transformers re-saves hf_tiny without the LM head (and with a pooler / classifier): --base-path
    there gives exactly the encoder the checkpoint was trained on."""
    other = oracles.resave_as(hf_tiny, tmp_path / cls, cls)
    assert torch.equal(hidden(best, tokens, base_path=other), hidden(best, tokens))


def test_the_lm_head_is_not_part_of_the_identity(best, hf_tiny, tokens, tmp_path):
    other = edited_copy(hf_tiny, tmp_path / "lm", "lm_head.bias", 0.5)
    assert torch.equal(hidden(best, tokens, base_path=other), hidden(best, tokens))


@pytest.mark.parametrize("key", ["esm.encoder.layer.1.output.dense.bias", "esm.embeddings.word_embeddings.weight"])
def test_other_encoder_weights_are_refused(best, hf_tiny, tmp_path, key):
    other = edited_copy(hf_tiny, tmp_path / "other", key, 1e-3)
    with pytest.raises(CheckpointError, match=r"encoder weights differ .*sha256") as e:
        load_model(best, base_path=other)
    assert str(tmp_path / "other") in str(e.value) and "\n" not in str(e.value)


def test_a_checkpoint_with_the_older_hash_still_loads(best, hf_tiny, tokens, tmp_path):
    """Its config.json records sha256_v1 of the whole base (LM head included), and SHA256SUMS
    vouches for that config.json, as such a checkpoint was written."""
    old = tmp_path / "old"
    shutil.copytree(best, old)
    config = json.loads((old / "config.json").read_text())
    config["base"]["sha256"] = sha256_v1(load_pretrained(hf_tiny).state_dict())
    (old / "config.json").write_text(json.dumps(config, indent=2))
    digest = hashlib.sha256((old / "config.json").read_bytes()).hexdigest()
    sums = [f"{digest}  config.json" if line.endswith("  config.json") else line
            for line in (old / "SHA256SUMS").read_text().splitlines()]
    (old / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    assert torch.equal(hidden(str(old), tokens), hidden(best, tokens))
    # that hash covers the LM head: it cannot vouch for a copy of the base without one
    no_head = oracles.resave_as(hf_tiny, tmp_path / "no_head", "EsmModel")
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(str(old), base_path=no_head)
