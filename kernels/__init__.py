"""Triton kernels for esm2lite (the fused LoRA linear lives here)."""

from .lora import dropout_mask, lora_linear

__all__ = ["lora_linear", "dropout_mask"]
