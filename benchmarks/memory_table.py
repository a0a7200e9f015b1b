"""The memory table in README.md: what fine-tuning ESM-2 8M to 15B needs, per mode.

Counted from the model itself, on the meta device (nothing allocated):
  parameters; fp32 weights; full mode: fp32 gradients and AdamW's two fp32 moments;
  LoRA (r=16 on all six linears): adapter parameters, their gradients and moments;
  the frozen weights' bytes per parameter in lora mode, stored as a bf16 run stores them
  (checkpoints/modes.store_frozen: the blocks' linears in bf16) and, before that, in fp32.
Measured: activations, the bytes autograd saves for backward (saved_tensors_hooks) when the
  regression model (encoder + mean-pool head) runs forward under bf16 autocast. Frozen weights,
  and autocast's bf16 weight copies, are fixed costs, not activations: the script takes the
  slope in tokens (two batch lengths), per layer from a 1- and a 2-layer model of the real
  width, and reports bytes per 1k tokens for the whole depth, in full and lora mode, with
  and without --activation-checkpointing (head mode saves nothing in the frozen encoder).

FSDP over N ranks divides weights, gradients and moments by N, not activations.

    python benchmarks/memory_table.py       # markdown table on stdout, JSON in benchmarks/results/

On CPU the activations are measured under CPU autocast; on a GPU under CUDA autocast, the
training path. (A GPU run is also what the README's "checked against a GPU" would need: the
measured max_memory_allocated of a real step beside the sum of these parts. No GPU has been
available to this project yet, so that check is not in this script's results.)
"""

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import run_info, saved_bytes  # noqa: E402
from esm2lite.model.config import ESM2Config  # noqa: E402
from esm2lite.tasks import TASKS  # noqa: E402
from esm2lite.model.lora import LoRAConfig, apply_lora  # noqa: E402
from esm2lite.model.esm2 import ESM2  # noqa: E402
from esm2lite.checkpoints.modes import MODE  # noqa: E402

SIZES = {"8M": "esm2_t6_8M_UR50D", "35M": "esm2_t12_35M_UR50D", "150M": "esm2_t30_150M_UR50D",
         "650M": "esm2_t33_650M_UR50D", "3B": "esm2_t36_3B_UR50D", "15B": "esm2_t48_15B_UR50D"}
LORA = LoRAConfig(rank=16)  # all six linears
GB = 1e9


def frozen_bytes(model) -> tuple[int, int]:
    """(frozen parameters, their bytes as stored)."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    return sum(p.numel() for p in frozen), sum(p.numel() * p.element_size() for p in frozen)


def counts(config: ESM2Config) -> dict:
    """Parameter counts from the model built on the meta device, and the frozen weights' bytes per
    parameter in lora mode before (fp32) and after store_frozen (bf16 linears)."""
    with torch.device("meta"):
        model = ESM2(config)
        params = sum(p.numel() for p in model.parameters())
        apply_lora(model, LORA)
        adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen, before = frozen_bytes(model)
        MODE["lora"].store_frozen(model, torch.bfloat16)
        after = frozen_bytes(model)[1]
    return {"parameters": params, "lora_parameters": adapters, "lora_frozen_bytes_per_param_fp32": before / frozen,
            "lora_frozen_bytes_per_param": after / frozen, "lora_frozen_weights": after}


def _model(config: ESM2Config, layers: int, mode: str, device, stored_bf16: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    encoder = ESM2(dataclasses.replace(config, num_layers=layers)).to(device)
    if mode == "lora":
        apply_lora(encoder, LORA)
    elif mode == "head":
        encoder.requires_grad_(False)
    if stored_bf16:
        MODE[mode].store_frozen(encoder, torch.bfloat16)
    head = TASKS["regression"].head(config.d_model, 1, 256, 0.25).to(device)
    return encoder.train(), head.train()


def _saved(encoder, head, tokens: torch.Tensor, checkpointing: bool) -> int:
    encoder.activation_checkpointing = checkpointing
    params = [*encoder.parameters(), *head.parameters()]

    def forward():
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16):
            return head(encoder(tokens, logits=False)["last_hidden_state"], tokens)

    return saved_bytes(forward, params)


def saved_per_layer(config: ESM2Config, mode: str, checkpointing: bool, device, lengths=(64, 128),
                    stored_bf16: bool = True) -> dict:
    """What one block saves for backward, at config's width: bytes per token (activations) and
    bytes independent of the batch (autocast's bf16 copies of the block's weights); and the
    bytes per token outside the blocks (embeddings, final LayerNorm, pooling)."""
    saved = {}  # (layers, tokens per sequence) -> bytes, batches of 2 sequences
    for layers in (1, 2):
        encoder, head = _model(config, layers, mode, device, stored_bf16)
        for n in lengths:
            tokens = torch.randint(4, 24, (2, n), device=device)
            tokens[:, 0], tokens[:, -1] = 0, 2  # <cls> ... <eos>
            saved[layers, n] = _saved(encoder, head, tokens, checkpointing)
        del encoder, head
    a, b = lengths
    slope = {layers: (saved[layers, b] - saved[layers, a]) / (2 * (b - a)) for layers in (1, 2)}
    per_token = slope[2] - slope[1]
    return {"per_token": per_token, "outside_per_token": slope[1] - per_token,
            "fixed": saved[2, a] - saved[1, a] - 2 * a * per_token}


def table(device, sizes=tuple(SIZES)) -> dict:
    rows = {}
    for size in sizes:
        config = ESM2Config.from_name(SIZES[size])
        c = counts(config)
        row = {**c, "weights_fp32": 4 * c["parameters"], "full_grads_fp32": 4 * c["parameters"],
               "full_adamw_fp32": 8 * c["parameters"], "lora_grads_and_adamw": 12 * c["lora_parameters"]}
        for mode in ("full", "lora", "head"):
            for ckpt in (False, True) if mode != "head" else (False,):  # head mode runs the encoder without autograd
                m = saved_per_layer(config, mode, ckpt, device)
                suffix = f"_{mode}" + ("_checkpointed" if ckpt else "")
                row["activations_per_1k_tokens" + suffix] = 1024 * (config.num_layers * m["per_token"] + m["outside_per_token"])
                row["bytes_per_token_per_layer" + suffix] = m["per_token"]
                row["weight_copies_kept" + suffix] = config.num_layers * m["fixed"]
                print(f"{size} {mode}{' checkpointed' if ckpt else ''}: {m['per_token'] / config.d_model:.2f} d bytes "
                      f"per token per layer, {m['fixed'] / 1e6:.0f} MB fixed per layer", file=sys.stderr, flush=True)
        before = saved_per_layer(config, "lora", False, device, stored_bf16=False)  # frozen weights kept fp32
        row["weight_copies_kept_lora_fp32_stored"] = config.num_layers * before["fixed"]
        row["activations_per_1k_tokens_lora_fp32_stored"] = 1024 * (config.num_layers * before["per_token"]
                                                                    + before["outside_per_token"])
        rows[size] = row
    return rows


def fmt(nbytes: float) -> str:
    if nbytes < 1e6:
        return f"{nbytes / 1e3:.0f} kB"
    return f"{nbytes / 1e6:.0f} MB" if nbytes < GB else f"{nbytes / GB:.1f} GB"


def markdown(rows: dict) -> str:
    lines = ["| | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]

    def line(label, key, f=fmt):
        lines.append(f"| {label} | " + " | ".join(f(r[key]) for r in rows.values()) + " |")

    line("parameters", "parameters", lambda n: f"{n / 1e9:.2f} B")
    line("weights, fp32", "weights_fp32")
    bpp = lambda v: f"{v:.2f}"  # noqa: E731
    line("LoRA, bf16: frozen weights, bytes per parameter as stored", "lora_frozen_bytes_per_param", bpp)
    line("… before (frozen weights kept fp32)", "lora_frozen_bytes_per_param_fp32", bpp)
    line("LoRA, bf16: frozen weights as stored", "lora_frozen_weights")
    line("full: fp32 gradients", "full_grads_fp32")
    line("full: AdamW moments (2 × fp32)", "full_adamw_fp32")
    line("LoRA r=16, six linears: adapter parameters", "lora_parameters", lambda n: f"{n / 1e6:.1f} M")
    line("LoRA: adapter gradients + AdamW moments", "lora_grads_and_adamw")
    line("activations per 1k tokens, bf16 autocast: full", "activations_per_1k_tokens_full")
    line("… lora", "activations_per_1k_tokens_lora")
    line("… head (frozen encoder)", "activations_per_1k_tokens_head")
    line("… full, `--activation-checkpointing`", "activations_per_1k_tokens_full_checkpointed")
    line("… lora, `--activation-checkpointing`", "activations_per_1k_tokens_lora_checkpointed")
    line("… lora, frozen weights kept fp32 (before)", "activations_per_1k_tokens_lora_fp32_stored")
    line("one process, bf16 autocast: weight copies kept for backward, full", "weight_copies_kept_full")
    line("… lora (frozen weights stored bf16)", "weight_copies_kept_lora")
    line("… lora, frozen weights kept fp32 (before)", "weight_copies_kept_lora_fp32_stored")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--out", help="JSON path (default benchmarks/results/memory_table_<device type>.json)")
    args = p.parse_args()
    device = torch.device(args.device)
    rows = table(device, tuple(args.sizes))
    print(markdown(rows))
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"memory_table_{device.type}.json")
    result = {**run_info(device), "method": __doc__.split("\n\n")[1], "lora": LORA.to_dict(), "rows": rows}
    from esm2lite.files.atomic import write_json

    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
