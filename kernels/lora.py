"""lora_linear: y = x W^T + b + s · dropout(x) A^T B^T, gradients for x, A and B only.

    x: [..., K]   W: [N, K] frozen   b: [N] frozen or None   A: [r, K]   B: [N, r]   s = scale

Backends compute the same maths (docs/kernels.md):
  "triton": fused Triton kernels (lora_fwd.py, lora_bwd.py): CUDA tensors, or CPU tensors under
            TRITON_INTERPRET=1 (how the tests run them).
  "torch":  plain PyTorch (CPU path and reference).
  "auto":   ESM2LITE_KERNELS=torch|triton if set, else triton on CUDA tensors when it imports.

Dropout (p > 0 only when training) applies to the LoRA branch: xd = mask ⊙ x / (1-p). The mask
is never stored: forward and backward regenerate it from a seed drawn from torch's default CPU
generator (so torch.manual_seed makes it reproducible). `dropout_mask` materialises it.

Precision: everything runs in one compute dtype -- the autocast dtype under torch.autocast for
x's device type, else x's dtype -- with fp32 accumulation; the output is in that dtype and each
gradient comes back in its own input's dtype (A and B are typically fp32 master weights).
"""

import os

import torch

BACKENDS = ("auto", "torch", "triton")
MAX_RANK = 128


# ----------------------------------------------------------------------------- torch backend

def _torch_keep(seed, M, K, p_drop, device):
    """keep: [M, K] bool, from a generator seeded with `seed` (regenerated, never stored)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand((M, K), generator=gen, device=device) >= p_drop


def _torch_dropout(t, p_drop, seed):
    """mask ⊙ t / (1-p) for t: [M, K] (the same mask for x forward and for dS A backward)."""
    if p_drop == 0:
        return t
    keep = _torch_keep(seed, t.shape[0], t.shape[1], p_drop, t.device)
    return torch.where(keep, t / (1 - p_drop), 0)


def torch_forward(x, W, b, A, B, scale, p_drop, seed, need_S):
    """x: [M, K] -> (y: [M, N], S: [M, r])."""
    S = _torch_dropout(x, p_drop, seed) @ A.T                     # S = xd A^T: [M, r]
    y = torch.addmm(b, x, W.T) if b is not None else x @ W.T     # x W^T + b: [M, N]
    y.addmm_(S, B.T, alpha=scale)                                 # + s · S B^T
    return y, S


def torch_backward(dY, x, W, A, B, S, scale, p_drop, seed, need_dX, need_dA, need_dB):
    """dY: [M, N] -> (dX: [M, K], dA: [r, K], dB: [N, r]), None where not needed."""
    dX = dA = dB = None
    dS = (dY @ B) * scale if need_dX or need_dA else None        # dS = s · dY B: [M, r]
    if need_dX:
        dX = _torch_dropout(dS @ A, p_drop, seed)                 # mask ⊙ (dS A)/(1-p)
        dX.addmm_(dY, W)                                          # + dY W
    if need_dA:
        dA = dS.T @ _torch_dropout(x, p_drop, seed)               # dA = dS^T xd: [r, K]
    if need_dB:
        dB = (dY.T @ S) * scale                                   # dB = s · dY^T S: [N, r]
    return dX, dA, dB


def _ops(backend):
    if backend == "torch":
        return torch_forward, torch_backward
    from .lora_bwd import lora_backward
    from .lora_fwd import lora_forward
    return lora_forward, lora_backward


# ----------------------------------------------------------------------------- autograd

class LoRALinearFunction(torch.autograd.Function):
    """Both backends: x: [M, K] (2-D) -> y: [M, N] in `dtype`. No gradient for W, b (frozen)."""

    @staticmethod
    def forward(ctx, x, W, b, A, B, scale, p_drop, seed, dtype, backend):
        forward, _ = _ops(backend)
        need_dX, _, _, need_dA, need_dB = ctx.needs_input_grad[:5]
        with torch.autocast(x.device.type, enabled=False):
            xc, Wc, Ac, Bc = (t.to(dtype) for t in (x, W, A, B))
            bc = b.to(dtype) if b is not None else None
            y, S = forward(xc, Wc, bc, Ac, Bc, scale, p_drop, seed, need_S=need_dB)
        ctx.save_for_backward(xc if need_dA else None, Wc if need_dX else None, Ac, Bc, S)
        ctx.args = (scale, p_drop, seed, dtype, backend)
        ctx.grad_dtypes = (x.dtype, A.dtype, B.dtype)
        return y

    @staticmethod
    def backward(ctx, dY):
        xc, Wc, Ac, Bc, S = ctx.saved_tensors
        scale, p_drop, seed, dtype, backend = ctx.args
        need_dX, _, _, need_dA, need_dB = ctx.needs_input_grad[:5]
        _, backward = _ops(backend)
        with torch.autocast(dY.device.type, enabled=False):
            dX, dA, dB = backward(dY.to(dtype), xc, Wc, Ac, Bc, S, scale, p_drop, seed,
                                  need_dX, need_dA, need_dB)
        x_dtype, A_dtype, B_dtype = ctx.grad_dtypes
        dX = dX.to(x_dtype) if dX is not None else None
        dA = dA.to(A_dtype) if dA is not None else None
        dB = dB.to(B_dtype) if dB is not None else None
        return dX, None, None, dA, dB, None, None, None, None, None


# ----------------------------------------------------------------------------- public API

def _check(x, W, b, A, B, scale, dropout_p):
    tensors = {"x": x, "weight": W, "lora_a": A, "lora_b": B}
    if b is not None:
        tensors["bias"] = b
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"lora_linear: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"lora_linear: {name} must be floating point, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"lora_linear: {name} is on {t.device} but x is on {x.device}")
    if W.dim() != 2:
        raise ValueError(f"lora_linear: weight must be [N, K], got shape {tuple(W.shape)}")
    N, K = W.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"lora_linear: x's last dim must be K={K} (weight is [N, K]={tuple(W.shape)}), "
                         f"got x of shape {tuple(x.shape)}")
    if b is not None and tuple(b.shape) != (N,):
        raise ValueError(f"lora_linear: bias must be [N]=({N},), got {tuple(b.shape)}")
    if A.dim() != 2 or A.shape[1] != K:
        raise ValueError(f"lora_linear: lora_a must be [r, K] with K={K}, got {tuple(A.shape)}")
    r = A.shape[0]
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"lora_linear: rank r = lora_a.shape[0] must be in 1..{MAX_RANK}, got {r}")
    if tuple(B.shape) != (N, r):
        raise ValueError(f"lora_linear: lora_b must be [N, r]=({N}, {r}) for weight {tuple(W.shape)} "
                         f"and lora_a {tuple(A.shape)}, got {tuple(B.shape)}")
    if isinstance(scale, torch.Tensor) and scale.numel() != 1:
        raise ValueError(f"lora_linear: scale must be a number, got a tensor of shape {tuple(scale.shape)}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"lora_linear: dropout_p must be in [0, 1), got {dropout_p}")


def _triton_imports():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend, device):
    """"auto" -> "triton" or "torch" for tensors on `device`; checks the explicit choices."""
    if backend not in BACKENDS:
        raise ValueError(f"lora_linear: unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        env = os.environ.get("ESM2LITE_KERNELS")
        if env:
            if env not in ("torch", "triton"):
                raise ValueError(f"ESM2LITE_KERNELS must be 'torch' or 'triton', got {env!r}")
            backend = env
        else:
            backend = "triton" if device.type == "cuda" and _triton_imports() else "torch"
    if backend == "triton":
        if not _triton_imports():
            raise ValueError("lora_linear: backend='triton' but triton is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"lora_linear: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), "
                             f"got tensors on {device}")
    return backend


def dropout_mask(seed, M, K, p, device, backend):
    """The keep mask [M, K] (bool) that `backend` regenerates for `seed` -- for tests and
    references: xd = where(mask, x / (1-p), 0). The seed of a call is the next
    torch.randint(0, 2**31 - 1, ()) of the default CPU generator (drawn only when p > 0 and training)."""
    device = torch.device(device)
    if resolve_backend(backend, device) == "torch":
        return _torch_keep(seed, M, K, p, device)
    from .lora_fwd import dropout_mask as triton_dropout_mask
    return triton_dropout_mask(seed, M, K, p, device)


def draw_seed():
    """The dropout seed: from torch's default CPU generator, so torch.manual_seed reproduces it."""
    return int(torch.randint(0, 2**31 - 1, ()).item())


def lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0, training=False, backend="auto"):
    """y = x W^T + b + scale · dropout(x) A^T B^T.   x: [..., K] -> y: [..., N]."""
    _check(x, weight, bias, lora_a, lora_b, scale, dropout_p)
    backend = resolve_backend(backend, x.device)
    p_drop = float(dropout_p) if training else 0.0
    seed = draw_seed() if p_drop > 0 else 0
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    else:
        dtype = x.dtype
    N, K = weight.shape
    x2 = x.reshape(-1, K)                                         # [M, K], strides kept if possible
    if x2.shape[0] == 0:
        backend = "torch"  # nothing to launch
    y = LoRALinearFunction.apply(x2, weight, bias, lora_a, lora_b, float(scale), p_drop, seed, dtype, backend)
    return y.reshape(*x.shape[:-1], N)
