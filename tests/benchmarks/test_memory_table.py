"""The README's memory table: built from the committed measurement, with parameter counts that
transformers and peft agree with, and activations that re-measure the same."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchmarks import memory_table  # noqa: E402
from esm2lite.model.config import ESM2Config  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "memory_table_cpu.json"


@pytest.fixture(scope="module")
def rows():
    return json.loads(RESULT.read_text())["rows"]


def test_readme_table_is_the_committed_measurement(rows):
    assert memory_table.markdown(rows) in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("size", list(memory_table.SIZES))
def test_parameter_counts_agree_with_transformers_and_peft(rows, size):
    from peft import LoraConfig, get_peft_model
    from transformers import EsmConfig, EsmForMaskedLM

    config = ESM2Config.from_name(memory_table.SIZES[size])
    hf_config = {k: v for k, v in config.to_hf_config().items() if k != "torch_dtype"}
    with torch.device("meta"):
        hf = EsmForMaskedLM(EsmConfig(**hf_config))
        # the contact head (not part of the encoder) and the tied decoder are not our parameters
        ours = sum(p.numel() for n, p in hf.named_parameters() if "contact_head" not in n)
        peft = get_peft_model(hf.esm, LoraConfig(r=16, lora_alpha=32, target_modules=[
            "query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]))
        adapters = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    assert rows[size]["parameters"] == ours
    assert rows[size]["lora_parameters"] == adapters
    counted = memory_table.counts(config)
    assert (counted["parameters"], counted["lora_parameters"]) == (ours, adapters)
    d, f, L = config.d_model, config.ffn_dim, config.num_layers
    linears = L * (4 * d * d + 4 * d + 2 * d * f + f + d)  # the blocks' q k v out fc1 fc2, weights and biases
    assert counted["lora_frozen_bytes_per_param"] == pytest.approx((2 * linears + 4 * (ours - linears)) / ours,
                                                                   rel=1e-12)  # those in bf16, the rest fp32
    assert counted["lora_frozen_bytes_per_param_fp32"] == 4.0
    assert rows[size]["full_adamw_fp32"] == 8 * ours and rows[size]["lora_grads_and_adamw"] == 12 * adapters


@pytest.mark.slow
def test_activation_bytes_measure_again_the_same(rows):
    """Re-measured here at the 650M width (the committed run measured every size)."""
    config = ESM2Config.from_name(memory_table.SIZES["650M"])
    full = memory_table.saved_per_layer(config, "full", False, torch.device("cpu"))
    assert full["per_token"] == pytest.approx(rows["650M"]["bytes_per_token_per_layer_full"], rel=0.02)
    block_params = 4 * config.d_model**2 + 2 * config.d_model * config.ffn_dim  # q k v out, fc1 fc2
    assert full["fixed"] == pytest.approx(2 * block_params, rel=0.01)  # its weights' bf16 copies
    lora = memory_table.saved_per_layer(config, "lora", False, torch.device("cpu"))
    d, f, r = config.d_model, config.ffn_dim, memory_table.LORA.rank
    adapter_copies = 2 * r * (4 * 2 * d + 2 * (d + f))  # bf16 copies of A [r, K] and B [N, r], six linears
    assert lora["fixed"] == pytest.approx(adapter_copies, rel=0.01)  # frozen weights stored bf16: no copies
    checkpointed = memory_table.saved_per_layer(config, "lora", True, torch.device("cpu"))
    assert checkpointed["per_token"] == 4 * config.d_model  # only each block's fp32 input is kept
