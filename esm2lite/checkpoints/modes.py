"""Modes: what a fine-tune trains, what its checkpoint holds, how that is stored, and how
inference rebuilds and runs the encoder. One object per mode; nothing else branches on the mode.

            trains                     checkpoint holds              stored as
    lora    adapters + head            adapters + head               model.safetensors, gathered on rank 0
    full    everything but the LM head the whole encoder + head      dcp/ shards, every rank its own
    head    the head                   the head                      model.safetensors, gathered on rank 0

The masked-LM head is not on a task's path: in full mode it keeps its pretrained weights.
In lora and head modes under bf16 autocast (one process), the frozen linears are stored in bf16
(store_frozen): 2 bytes per frozen parameter, no per-step cast; checkpoints hold only what trains.
"""

import torch
from torch import nn

from esm2lite.weights.pretrained import architecture, build_model, resolve_dtype
from esm2lite.tasks import head_from_config
from esm2lite.model.lora import LoRALinear, apply_lora, lora_state_dict, merge_lora
from esm2lite.model.esm2 import ESM2


def frozen_linears_to(encoder: ESM2, dtype: torch.dtype) -> None:
    """The frozen weights and biases of the blocks' linears (frozen base of LoRALinears included) stored
    in `dtype`, the same Parameter objects (a LoRALinear shares its base's). What stays fp32: adapters
    and head (they train), embeddings (the residual stream starts there), LayerNorms and the LM head
    (small; autocast runs LayerNorm in fp32). Under autocast to `dtype` every result is unchanged: the
    linears saw these weights cast to `dtype` at every step before."""
    for block in encoder.layers:
        for module in block.modules():
            if isinstance(module, (nn.Linear, LoRALinear)):
                for p in (module.weight, module.bias):
                    if p is not None and not p.requires_grad:
                        p.data = p.data.to(dtype)


class Mode:
    name = ""
    sharded = False  # weights stored as DCP shards, every rank its own (never gathered)
    frozen_encoder = False  # nothing in the encoder trains: run it without autograd
    uses_lora = False

    def prepare(self, encoder: ESM2, lora) -> None:
        """Set requires_grad on the encoder: what this mode trains (the head always trains)."""
        raise NotImplementedError

    def encoder_state(self, encoder: ESM2) -> dict:
        """The encoder tensors a checkpoint of this mode holds (our names, no prefix)."""
        return {}

    def trained_state(self, model) -> dict:
        """Every tensor a checkpoint holds, under "encoder." / "head." prefixes."""
        state = {f"head.{k}": v for k, v in model.head.state_dict().items()}
        state.update({f"encoder.{k}": v for k, v in self.encoder_state(model.encoder).items()})
        return state

    def stored_shapes(self, spec) -> dict | None:
        """{key: meta tensor} a stored checkpoint must hold, checked before loading (sharded only)."""
        return None

    def load_encoder(self, spec, encoder_state: dict, dtype, device, source: str, read) -> ESM2:
        """The encoder a checkpoint describes, before its trained tensors are copied in; read: how
        its base is read (BaseRef.load)."""
        return spec.base.load(dtype, device, read)

    def for_inference(self, encoder: ESM2, merge: bool) -> None:
        """Make the loaded encoder ready to predict (LoRA: merge the adapters unless told not to)."""

    def store_frozen(self, encoder: ESM2, dtype: torch.dtype) -> None:
        """Store the frozen weights in the compute dtype (lora, head), so that no step casts them again;
        full mode trains them all, in fp32."""


class LoRA(Mode):
    name, uses_lora = "lora", True

    def prepare(self, encoder, lora):
        apply_lora(encoder, lora)  # freezes everything but the adapters

    def encoder_state(self, encoder):
        return lora_state_dict(encoder)

    def load_encoder(self, spec, encoder_state, dtype, device, source, read):
        return apply_lora(spec.base.load(dtype, device, read), spec.lora)

    def for_inference(self, encoder, merge):
        if merge:
            merge_lora(encoder)  # one GEMM per linear instead of three

    def store_frozen(self, encoder, dtype):
        frozen_linears_to(encoder, dtype)


class Full(Mode):
    name, sharded = "full", True

    def prepare(self, encoder, lora):
        encoder.lm_head.requires_grad_(False)

    def encoder_state(self, encoder):
        return encoder.state_dict()

    def stored_shapes(self, spec):
        with torch.device("meta"):
            encoder, head = architecture(spec.model_config)(spec.model_config), head_from_config(spec.head)
        return {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                **{f"head.{k}": v for k, v in head.state_dict().items()}}

    def load_encoder(self, spec, encoder_state, dtype, device, source, read):
        return build_model(spec.model_config, encoder_state, [], source, resolve_dtype(dtype), torch.device(device or "cpu"))


class Head(Mode):
    name, frozen_encoder = "head", True

    def prepare(self, encoder, lora):
        encoder.requires_grad_(False)

    def store_frozen(self, encoder, dtype):
        frozen_linears_to(encoder, dtype)


MODE = {m.name: m for m in (LoRA(), Full(), Head())}
