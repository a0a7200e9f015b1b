"""LoRA for esm2lite's ESM-2: adapters on the encoder's linears, on the fused kernel.

    y = x W^T + b + scale · dropout(x) A^T B^T      W: [N, K] frozen, A: [r, K], B: [N, r]
    scale = alpha / rank

    model = load_pretrained(path)
    apply_lora(model, LoRAConfig(rank=16, alpha=32))   # only lora_a / lora_b train
    ...train...
    save_file(lora_state_dict(model), "adapters.safetensors")   # adapters only
    merge_lora(model)                                    # W += scale · B A, plain F.linear

Targets name our modules: query, key, value, out (model.layers[i].attn.*) and fc1, fc2
(model.layers[i].*). HF peft interop (adapter_config.json + adapter_model.safetensors) is in
peft_io.py.

FSDP: each LoRALinear calls the kernel with its own parameters only, and the adapters are
created in the base weight's dtype (one storage dtype per block). tie_weights shares one
A/B pair across blocks, which per-block FSDP wrapping cannot shard: use it unsharded.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from esm2lite import kernels
from esm2lite.errors import CheckpointError, key_mismatch
from esm2lite.kernels.lora import MAX_RANK

TARGETS = ("query", "key", "value", "out", "fc1", "fc2")  # ESM-2's linears (the default)
ESMC_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # ESM C's, all bias-free
INITS = ("xavier", "kaiming", "normal", "zero")


@dataclasses.dataclass
class LoRAConfig:
    """rank r, alpha (scale = alpha / r), dropout on the LoRA branch's input, targets (module
    names, see TARGETS), layers (block indices; None = all), init of A [r, K] and B [N, r],
    tie_weights (one A/B pair per target shared by all selected layers, BioNeMo's weight_tying).

    Inits follow peft / BioNeMo (NeMo's ParallelLinearAdapter column_init / row_init):
    kaiming = kaiming_uniform_(a=sqrt(5)) (peft's default for A), xavier = xavier_normal_,
    normal = N(0, 0.2^2), zero = 0. BioNeMo's ESM-2 LoRA is init_a="xavier", init_b="zero"."""

    rank: int = dataclasses.field(default=16, metadata={"help": "adapter rank r (size of the low-rank update)"})
    alpha: float = dataclasses.field(default=32.0, metadata={"help": "adapter scale = alpha / rank"})
    dropout: float = dataclasses.field(default=0.0, metadata={"help": "dropout on the adapters' input"})
    targets: tuple = dataclasses.field(default=TARGETS, metadata={
        "help": "which linears get adapters: ESM-2's query key value out fc1 fc2 (the default: all), ESM C's q k v "
                "o gate up down (all of them when this is left at its default)"})
    layers: tuple | None = dataclasses.field(default=None, metadata={
        "help": "blocks that get adapters, counted from 0 (default: all; BioNeMo's layer_selection counts from 1: "
                "its [1, 12] is 0 11 here)", "item_type": int})
    init_a: str = dataclasses.field(default="kaiming", metadata={
        "help": "init of A (BioNeMo's column_init_method; BioNeMo uses xavier, peft kaiming)", "choices": INITS})
    init_b: str = dataclasses.field(default="zero", metadata={
        "help": "init of B (BioNeMo's row_init_method); zero makes the adapters start as a no-op", "choices": INITS})
    tie_weights: bool = dataclasses.field(default=False, metadata={
        "help": "one A/B pair per target shared by all selected blocks (BioNeMo's weight_tying; one process only)"})

    def __post_init__(self):
        if isinstance(self.targets, str) or not _is_sequence(self.targets):
            raise ValueError(f"LoRAConfig.targets must be a sequence of names from {TARGETS}, got {self.targets!r}")
        self.targets = tuple(self.targets)
        if self.layers is not None:
            if not _is_sequence(self.layers):
                raise ValueError(f"LoRAConfig.layers must be None or a sequence of layer indices, got {self.layers!r}")
            self.layers = tuple(self.layers)
        self.validate()

    def validate(self) -> None:
        def bad(field, why):
            raise ValueError(f"LoRAConfig.{field} = {getattr(self, field)!r}: {why}")

        if not _is_int(self.rank) or not 1 <= self.rank <= MAX_RANK:
            bad("rank", f"must be an integer in 1..{MAX_RANK}")
        if not _is_number(self.alpha) or not (math.isfinite(self.alpha) and self.alpha > 0):
            bad("alpha", "must be a finite number > 0")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            bad("dropout", "must be a number in [0, 1)")
        unknown = [t for t in self.targets if t not in TARGETS + ESMC_TARGETS]
        if not self.targets or unknown or len(set(self.targets)) != len(self.targets):
            bad("targets", f"must be distinct names from {TARGETS} (ESM-2) or {ESMC_TARGETS} (ESM C), at least one")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)
                                        or not all(_is_int(i) and i >= 0 for i in self.layers)):
            bad("layers", "must be None (all layers) or distinct non-negative layer indices, at least one")
        for field in ("init_a", "init_b"):
            if getattr(self, field) not in INITS:
                bad(field, f"must be one of {INITS}")
        if self.init_a == self.init_b == "zero":
            bad("init_b", "A and B both zero would never train (each one's gradient is proportional to the other)")
        if not isinstance(self.tie_weights, bool):
            bad("tie_weights", "must be True or False")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"LoRAConfig: unknown fields {unknown}; expected some of {sorted(names)}")
        return cls(**d)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_sequence(v) -> bool:
    return isinstance(v, (list, tuple))


def init_(t: torch.Tensor, method: str) -> None:
    """Initialise t in place (computed in fp32 from torch's default generator, then cast)."""
    w = torch.empty(t.shape, dtype=torch.float32)
    if method == "kaiming":
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    elif method == "xavier":
        nn.init.xavier_normal_(w)
    elif method == "normal":
        nn.init.normal_(w, std=0.2)
    else:
        nn.init.zeros_(w)
    with torch.no_grad():
        t.copy_(w)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a low-rank update. `weight` and `bias` are the original
    Parameter objects; lora_a [r, K] and lora_b [N, r] may be shared with other modules."""

    def __init__(self, base: nn.Linear, lora_a: nn.Parameter, lora_b: nn.Parameter, scale: float,
                 dropout_p: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # [N, K], [N] or None
        self.lora_a, self.lora_b = lora_a, lora_b        # [r, K], [N, r]
        self.scale, self.dropout_p = scale, dropout_p
        self.merged = False

    def forward(self, x):  # x: [..., K] -> [..., N]
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return kernels.lora_linear(x, self.weight, self.bias, self.lora_a, self.lora_b, self.scale,
                                   self.dropout_p, self.training)

    @torch.no_grad()
    def _update(self, sign: int) -> None:
        delta = self.lora_b.float() @ self.lora_a.float()  # [N, K], fp32
        self.weight.copy_((self.weight.float() + sign * self.scale * delta).to(self.weight.dtype))

    def merge(self) -> None:
        """W += scale · B A (no-op when already merged)."""
        if not self.merged:
            self._update(+1)
            self.merged = True

    def unmerge(self) -> None:
        """W -= scale · B A (no-op when not merged)."""
        if self.merged:
            self._update(-1)
            self.merged = False

    def extra_repr(self) -> str:
        N, K = self.weight.shape
        return (f"in={K}, out={N}, rank={self.lora_a.shape[0]}, scale={self.scale:g}, "
                f"dropout={self.dropout_p:g}, merged={self.merged}")


ATTN_TARGETS = ("query", "key", "value", "out", "q", "k", "v", "o")


def module_name(i: int, target: str) -> str:
    """Our name of target in block i: "layers.3.attn.query", "layers.3.fc1" (ESM C: "layers.3.attn.q",
    "layers.3.gate")."""
    return f"layers.{i}.attn.{target}" if target in ATTN_TARGETS else f"layers.{i}.{target}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def selected_layers(model: nn.Module, config: LoRAConfig) -> list[int]:
    L = len(model.layers)
    layers = list(range(L)) if config.layers is None else sorted(config.layers)
    out_of_range = [i for i in layers if i >= L]
    if out_of_range:
        raise ValueError(f"LoRAConfig.layers: {out_of_range} out of range 0..{L - 1}")
    return layers


def expected_shapes(model: nn.Module, config: LoRAConfig) -> dict[str, tuple]:
    """{key: shape} of the adapters apply_lora(model, config) creates, in lora_state_dict's
    naming (tied adapters under the first selected layer), without changing the model."""
    layers = selected_layers(model, config)
    shapes = {}
    for t in config.targets:
        for i in layers[:1] if config.tie_weights else layers:
            N, K = model.get_submodule(module_name(i, t)).weight.shape
            shapes[f"{module_name(i, t)}.lora_a"] = (config.rank, K)
            shapes[f"{module_name(i, t)}.lora_b"] = (N, config.rank)
    return shapes


def _get(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def default_targets(model: nn.Module) -> tuple:
    """Every linear of the model's blocks: ESM-2's TARGETS, or ESM C's."""
    return ESMC_TARGETS if isinstance(_get(model, module_name(0, "gate")), nn.Linear) else TARGETS


def _new_adapter(base: nn.Linear, config: LoRAConfig) -> tuple[nn.Parameter, nn.Parameter]:
    N, K = base.weight.shape
    kw = dict(dtype=base.weight.dtype, device=base.weight.device)
    a, b = torch.empty(config.rank, K, **kw), torch.empty(N, config.rank, **kw)
    init_(a, config.init_a)
    init_(b, config.init_b)
    return nn.Parameter(a), nn.Parameter(b)


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Replace the targeted linears of the selected layers with LoRALinear and freeze every
    other parameter. Returns the model (changed in place)."""
    config.validate()
    if lora_modules(model):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    layers = selected_layers(model, config)
    missing = [t for t in config.targets if not isinstance(_get(model, module_name(0, t)), nn.Linear)]
    if missing:
        own = " ".join(t for t in TARGETS + ESMC_TARGETS if isinstance(_get(model, module_name(0, t)), nn.Linear))
        raise ValueError(f"LoRAConfig.targets: {' '.join(missing)} not linears of this model (its targets: {own})")
    for p in model.parameters():
        p.requires_grad_(False)
    for t in config.targets:
        shared = None  # (A, B) of the first selected layer, reused when tying
        for i in layers:
            parent_name, _, attr = module_name(i, t).rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, attr)
            if shared is None or not config.tie_weights:
                shared = _new_adapter(base, config)
            setattr(parent, attr, LoRALinear(base, *shared, config.scale, config.dropout))
    model.lora_config = config
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """W += scale · B A for every adapter (computed in fp32). Already-merged modules are skipped."""
    for m in lora_modules(model).values():
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora (W -= scale · B A in fp32)."""
    for m in lora_modules(model).values():
        m.unmerge()
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, under our module names ("layers.0.attn.query.lora_a").
    With tie_weights each shared tensor appears once, under the first selected layer's name
    (as named_parameters() reports it)."""
    return {name: p.detach() for name, p in model.named_parameters()
            if name.endswith((".lora_a", ".lora_b"))}


def load_lora_state_dict(model: nn.Module, sd: dict, source: str = "LoRA state dict") -> nn.Module:
    """Copy adapters into a model that apply_lora has prepared. Strict: missing, unexpected
    and mis-shaped keys are one CheckpointError."""
    params = dict(lora_state_dict(model))
    if not params:
        raise CheckpointError(f"{source}: the model has no LoRA adapters (call apply_lora first)")
    if any(m.merged for m in lora_modules(model).values()):
        raise CheckpointError(f"{source}: unmerge_lora the model before loading adapters")
    check_adapter_keys({k: tuple(p.shape) for k, p in params.items()}, sd, source)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in sd.items():
            named[k].copy_(v)
    return model


def check_adapter_keys(expected: dict[str, tuple], got: dict, source: str) -> None:
    """One CheckpointError listing every missing, unexpected and mis-shaped adapter key."""
    problems = key_mismatch(expected, got, set(got) - set(expected))
    if problems:
        raise CheckpointError(f"{source}: adapters do not fit the model ({problems})")


def count_trainable(model: nn.Module) -> int:
    """Parameters with requires_grad, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
