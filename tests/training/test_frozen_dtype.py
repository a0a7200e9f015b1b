"""Frozen weights in the compute dtype (issue 22, item 4): in lora and head modes under bf16 autocast, one
process stores the blocks' frozen linears in bf16 (checkpoints/modes.frozen_linears_to). Held to the
previous behaviour, the fp32 weights cast by autocast at every step (store_frozen made a no-op): the same
losses and the same trained tensors, bit for bit (autocast's cast of an fp32 weight is the rounding that
storing it in bf16 does once); what trains and what is saved stays fp32."""

import json

import pytest
import torch
from torch import nn

from esm2lite.checkpoints import modes
from esm2lite.checkpoints.checkpoint_dir import read_tensors
from esm2lite.model.lora import LoRALinear
from esm2lite.training.loop import train_model
from test_train import small_config, splits  # noqa: F401  (splits: a fixture)


def run(hf_tiny, out, mode, records, monkeypatch, store: bool, seen: list):
    original = type(modes.MODE[mode]).store_frozen

    def recording(self, encoder, dtype):
        if store:
            original(self, encoder, dtype)
        seen.append({n: p.dtype for n, p in encoder.named_parameters()})

    monkeypatch.setattr(type(modes.MODE[mode]), "store_frozen", recording)
    train_model(small_config(hf_tiny, out, mode=mode, precision="bf16", steps=6, eval_every=3), records=records)
    losses = [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    encoder, head = read_tensors(str(out / "checkpoints" / "step_6"))
    return losses, {**{f"encoder.{k}": v for k, v in encoder.items()}, **{f"head.{k}": v for k, v in head.items()}}


@pytest.mark.parametrize("mode", ["lora", "head"])
def test_bf16_frozen_weights_change_no_number(hf_tiny, tmp_path, splits, monkeypatch, mode):  # noqa: F811
    seen_new, seen_old = [], []
    losses, trained = run(hf_tiny, tmp_path / "new", mode, splits, monkeypatch, True, seen_new)
    losses_old, trained_old = run(hf_tiny, tmp_path / "old", mode, splits, monkeypatch, False, seen_old)
    assert losses == losses_old and len(losses) >= 6
    assert trained.keys() == trained_old.keys() and trained
    for k in trained:
        assert trained[k].dtype == torch.float32 and torch.equal(trained[k], trained_old[k]), k
    dtypes = seen_new[0]
    linear = [n for n in dtypes if n.startswith("layers.") and n.rsplit(".", 1)[-1] in ("weight", "bias")
              and "norm" not in n]
    assert linear and all(dtypes[n] == torch.bfloat16 for n in linear)  # the frozen linears: 2 bytes
    assert all(dtypes[n] == torch.float32 for n in dtypes if n not in linear)  # adapters, norms, embeddings
    assert all(dtype == torch.float32 for dtype in seen_old[0].values())


def test_only_frozen_linears_change_dtype(hf_tiny):
    from esm2lite.model.lora import LoRAConfig
    from esm2lite.weights.pretrained import load_pretrained

    encoder = load_pretrained(hf_tiny)
    modes.MODE["lora"].prepare(encoder, LoRAConfig(rank=2, targets=("query", "fc1")))
    weight = encoder.layers[0].attn.query.weight
    modes.MODE["lora"].store_frozen(encoder, torch.bfloat16)
    assert encoder.layers[0].attn.query.weight is weight  # the same Parameter, its storage in bf16
    for module in encoder.modules():
        if isinstance(module, (nn.Linear, LoRALinear)) and module is not encoder.lm_head.dense:
            assert module.weight.dtype == torch.bfloat16
        if isinstance(module, LoRALinear):
            assert module.lora_a.dtype == module.lora_b.dtype == torch.float32
    assert encoder.embed_tokens.weight.dtype == encoder.layers[0].attn_norm.weight.dtype == torch.float32
    full = load_pretrained(hf_tiny)
    modes.MODE["full"].store_frozen(full, torch.bfloat16)  # full mode trains every weight: nothing stored in bf16
    assert all(p.dtype == torch.float32 for p in full.parameters())
