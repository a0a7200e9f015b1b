"""Int8 CPU inference (--precision int8): the encoder's linears as int8 x int8 matrix products with
int32 accumulation, scaled back to fp32; embeddings, LayerNorms, attention, activations and the LM
head stay fp32. ESM-2: attention query, key, value, out and the FFN's fc1, fc2; ESM C: q, k, v, o
and the SwiGLU's gate, up, down.

    y = x W^T + b          x: [M, K] (M tokens), W: [N, K], b: [N]

Weights, once, symmetric per output channel n:
    s_w[n] = max_k |W[n, k]| / 127             Wq[n, k] = round(W[n, k] / s_w[n])  in [-127, 127], int8
Activations, at every call, symmetric per token m (L = 127; 63 on a CPU without VNNI, see below):
    s_x[m] = max_k |x[m, k]| / L               xq[m, k] = round(x[m, k] / s_x[m]) + (L + 1), uint8
Product: oneDNN's u8 x s8 GEMM (VNNI) accumulates in int32, subtracts the zero point L + 1 and
applies s_w[n]; the token scale and the bias are applied after it, in fp32:
    y[m, n] = s_x[m] * s_w[n] * sum_k (xq[m, k] - L - 1) * Wq[n, k] + b[n]

Per-token scales make a token's output depend on that token alone, never on its batch mates or on
padding rows: padded and packed batches give the same numbers, as in fp32.

SmoothQuant (optional, `calibration=`): a linear fed by a LayerNorm (ESM-2's q/k/v and fc1; ESM C's
q/k/v and gate/up) has its input channel k divided by c[k] inside the LayerNorm (weight and bias)
and its weight columns multiplied by c[k]: x W^T is unchanged in exact arithmetic, while the
activation outliers move into the weights, which are quantized per channel:
    c[k] = max_m |X[m, k]|^alpha / max_n |W[n, k]|^(1 - alpha)     over calibration tokens, all
                                                                    linears sharing that LayerNorm
On random-init weights its gain was small and mixed (docs/int8.md: measured with and without), so
infer.py does not calibrate; the option is kept for pretrained weights, whose activations have
outlier channels (not measured here).

Kernel: torch.ops.onednn.qlinear_prepack / qlinear_pointwise, the int8 linear of PyTorch's x86
quantization (inductor), called eagerly on plain int8 / uint8 tensors. Not torch.ao.nn.quantized
.dynamic.Linear (fbgemm): it needs torch.quantize_per_channel and the qint8 dtype, deprecated in
torch 2.13 (pytorch/pytorch#184982). Without VNNI, oneDNN's u8 x s8 product adds pairs in int16
and can saturate: activations then use 7 bits (L = 63), as torch's own qconfig warns.
"""

import torch
from torch import nn

from esm2lite.errors import Esm2liteError
from esm2lite.model.esm2 import ESM2
from esm2lite.model.esmc import ESMC
from esm2lite.model.lora import LoRALinear
from esm2lite.model.tokenizer import Tokenizer

WEIGHT_LEVELS = 127  # symmetric int8 weights: [-127, 127]
# encoder class -> (LayerNorm, the linears it feeds) for SmoothQuant, and every quantized linear
SMOOTHABLE = {ESM2: (("attn_norm", ("attn.query", "attn.key", "attn.value")), ("ffn_norm", ("fc1",))),
              ESMC: (("attn_norm", ("attn.q", "attn.k", "attn.v")), ("ffn_norm", ("gate", "up")))}
LINEARS = {ESM2: ("attn.query", "attn.key", "attn.value", "attn.out", "fc1", "fc2"),
           ESMC: ("attn.q", "attn.k", "attn.v", "attn.o", "gate", "up", "down")}


def activation_levels() -> int:
    """127 with VNNI (int32 dot products); 63 without, where u8 x s8 pairs add in int16 and saturate."""
    return 127 if torch.cpu._is_vnni_supported() else 63


def quantize_tokens(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] fp32 -> (xq [M, K] uint8 = round(x / s_x) + levels + 1, in [1, 2 levels + 1]; s_x [M, 1]).
    Rounds half up: floor(v + levels + 1.5) through int32, 3x faster than converting fp32 to
    uint8 directly (not vectorized in torch 2.13; measured)."""
    amax = x.abs().amax(1, keepdim=True).clamp_min_(1e-30)  # [M, 1]
    shifted = (x * (levels / amax)).add_(levels + 1.5)  # in [1.5, 2 levels + 1.5]
    return shifted.to(torch.int32).to(torch.uint8), amax.div_(levels)


class Int8Linear(nn.Module):
    """nn.Linear's forward on int8 weights (per output channel) and uint8 activations (per token)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, levels: int = 127):
        super().__init__()
        w = weight.detach().float()  # [N, K]
        self.out_features, self.in_features = w.shape
        scale = w.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny) / WEIGHT_LEVELS  # [N]
        self.register_buffer("qweight", torch.round(w / scale[:, None]).to(torch.int8))  # [N, K]
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())  # [N]
        self.register_buffer("weight_zero", torch.zeros(self.out_features, dtype=torch.int32), persistent=False)
        self.levels = levels
        self.packed = None  # oneDNN's blocked copy of qweight, made at the first call (not copyable)

    @classmethod
    def from_linear(cls, linear: nn.Module, levels: int = 127) -> "Int8Linear":
        """From an nn.Linear (or a LoRALinear whose adapters are merged in)."""
        return cls(linear.weight, linear.bias, levels)

    def __getstate__(self):  # deepcopy / pickle: the opaque packed weight is rebuilt at the next call
        return {**self.__dict__, "packed": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K] -> [..., N], fp32
        lead, K = x.shape[:-1], self.in_features
        x2 = x.reshape(-1, K).float()  # [M, K]
        if x2.shape[0] == 0:
            return x2.new_zeros(*lead, self.out_features)
        if self.packed is None:
            self.packed = torch.ops.onednn.qlinear_prepack(self.qweight, None)
        xq, token_scale = quantize_tokens(x2, self.levels)  # [M, K] uint8, [M, 1]
        y = torch.ops.onednn.qlinear_pointwise(xq, 1.0, self.levels + 1, self.packed, self.weight_scale,
                                               self.weight_zero, None, 1.0, 0, torch.float32, "none", [], "")
        if self.bias is None:
            y.mul_(token_scale)  # [M, N] * s_x[m]
        else:
            torch.addcmul(self.bias, y, token_scale, out=y)  # b[n] + y[m, n] * s_x[m], one pass
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, int8 weights per channel, "
                f"{'8' if self.levels == 127 else '7'}-bit activations per token")


def check_quantizable(model: nn.Module) -> None:
    """Esm2liteError (one line) unless `model` is an ESM-2 / ESM C encoder in eval mode, fp32, on the
    CPU, not yet quantized, with no unmerged LoRA adapters."""
    if type(model) not in LINEARS:
        raise Esm2liteError(f"--precision int8 converts an ESM-2 or ESM C encoder, not a {type(model).__name__}")
    if model.training:
        raise Esm2liteError("--precision int8 is for inference: the model is in training mode (call .eval(); "
                            "train in fp32 or bf16)")
    if is_int8(model):
        raise Esm2liteError("--precision int8: this model is already quantized")
    unmerged = [name for name, m in model.named_modules() if isinstance(m, LoRALinear) and not m.merged]
    if unmerged:
        raise Esm2liteError(f"--precision int8 quantizes plain linears; {unmerged[0]} has LoRA adapters not merged "
                            "into its weights (drop --no-merge, or merge_lora(model) first)")
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        raise Esm2liteError(f"--precision int8 runs on the CPU only; the model is on {', '.join(sorted(devices))}")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise Esm2liteError(f"--precision int8 converts an fp32 model; this one holds "
                            f"{', '.join(sorted(str(d) for d in dtypes))} weights (load it in fp32)")


def is_int8(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


def quantize_int8(model: nn.Module, calibration=(), alpha: float = 0.5) -> nn.Module:
    """Replace the encoder's linears by Int8Linear, in place; returns the model (frozen, inference
    only). calibration: protein sequences; when given, SmoothQuant (migration strength `alpha`)
    is calibrated on them and folded into the LayerNorms and weights first."""
    check_quantizable(model)
    model.requires_grad_(False)
    if len(calibration):
        smooth(model, calibration, alpha)
    levels = activation_levels()
    for block in model.layers:
        for path in LINEARS[type(model)]:
            parent, _, name = path.rpartition(".")
            owner = block.get_submodule(parent) if parent else block
            setattr(owner, name, Int8Linear.from_linear(getattr(owner, name), levels))
    return model


def for_precision(model: nn.Module, precision: str) -> nn.Module:
    """The encoder as a run in `precision` computes with it: quantized in place for int8, else as it is."""
    return quantize_int8(model) if precision == "int8" else model


# ---------------------------------------------------------------- SmoothQuant


@torch.no_grad()
def activation_maxima(model: nn.Module, sequences) -> dict[int, dict[str, torch.Tensor]]:
    """max over calibration tokens of |LayerNorm output| per channel: {block: {norm name: [d]}}.
    Each sequence runs alone (no padding rows among the tokens)."""
    maxima, hooks, tok = {}, [], Tokenizer()
    for i, block in enumerate(model.layers):
        for norm, _ in SMOOTHABLE[type(model)]:
            def keep(module, args, out, key=(i, norm)):
                seen = out.detach().abs().flatten(0, -2).amax(0)  # [d]
                maxima[key] = torch.maximum(maxima[key], seen) if key in maxima else seen
            hooks.append(getattr(block, norm).register_forward_hook(keep))
    try:
        for seq in sequences:
            model(tok.batch_encode([seq]), logits=False)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for (i, norm), m in maxima.items():
        out.setdefault(i, {})[norm] = m
    return out


def smoothing_factors(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """c[k] = act_max[k]^alpha / max_n |W[n, k]|^(1 - alpha) over every weight [N_i, K]; 1 where
    either side is 0 (a dead channel stays as it is)."""
    w_max = torch.cat([w.abs() for w in weights]).amax(0)  # [K]
    c = act_max.clamp_min(0).pow(alpha) / w_max.pow(1 - alpha)
    return torch.where((act_max > 0) & (w_max > 0), c, torch.ones_like(c))


@torch.no_grad()
def smooth(model: nn.Module, sequences, alpha: float = 0.5) -> None:
    """SmoothQuant, in place: each LayerNorm's weight and bias divided by c, the weight columns
    of the linears it feeds multiplied by c (the fp32 outputs unchanged up to rounding)."""
    if not 0.0 <= alpha <= 1.0:
        raise Esm2liteError(f"SmoothQuant alpha {alpha!r} must be in [0, 1]")
    maxima = activation_maxima(model, sequences)
    for i, block in enumerate(model.layers):
        for norm_name, paths in SMOOTHABLE[type(model)]:
            norm, linears = getattr(block, norm_name), [block.get_submodule(p) for p in paths]
            c = smoothing_factors(maxima[i][norm_name], [m.weight for m in linears], alpha)  # [d]
            norm.weight.div_(c)
            if norm.bias is not None:
                norm.bias.div_(c)
            for m in linears:
                m.weight.mul_(c)  # [N, K] * [K]
