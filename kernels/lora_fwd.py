"""Triton forward of the fused LoRA linear (docs/kernels.md), for x: [M, K], W: [N, K], b: [N],
A: [r, K], B: [N, r], scale s, dropout p on the LoRA branch:

    xd = dropout(x)              (xd = x when p = 0; the mask is regenerated from a seed, never stored)
    S  = s · xd A^T              [M, r]   (the scale is folded into S)
    y  = x W^T + b + S B^T       [M, N]

Every kernel accumulates in fp32 and rounds once, at its store. Inputs arrive already cast to one
compute dtype (fp32, fp16 or bf16); S is stored in it too (the next MMA reads it in that dtype).

Where S is computed (`s_in_loop`, the cost model in tiles.py):
  * in the GEMM's K loop (p = 0 only): each output tile recomputes S for its BM rows from the x
    tile it already loaded -- no extra read of x, but r_pad/BN extra MMA work per tile;
  * in a separate skinny kernel (`_rank_proj_kernel`, which applies the dropout mask) whose
    S B^T seeds the GEMM's fp32 accumulator -- one extra read of x, no extra MMA work.
With dropout S is always separate: the mask is drawn once per element of x, not once per N tile.
"""

import torch
import triton
import triton.language as tl

from .tiles import (autotune, dot_kind, dropout_keep, empty, gemm_configs, grouped_tile, m_bucket, proj_configs, r_pad,
                    rank_block, rank_in_loop, rank_product, s_in_loop)

__all__ = ["lora_forward", "rank_proj", "dropout_mask", "s_in_loop"]


@autotune(proj_configs(), key=["M_BUCKET", "P", "R", "DROPOUT"], out_block="R")
@triton.jit(do_not_specialize=["M", "M_BUCKET", "seed"])
def _rank_proj_kernel(
    X_ptr, Y_ptr, out_ptr,            # X: [M, P]  Y: [r, P]  out: [M, r]
    M, P, r, M_BUCKET, c, p_drop, seed,
    stride_xm, stride_xp, stride_yr, stride_yp, stride_om, stride_or,
    DROPOUT: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr,
):
    """out = c · (mask ⊙ X) Y^T.   S = s · xd A^T: X = x, Y = A, c = s/(1-p), mask on.
                                   dS = s · dY B:   X = dY, Y = B^T, c = s, no mask."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.arange(0, R)
    m_ok = rm < M
    r_ok = rr < r
    rm64 = rm.to(tl.int64)
    acc = tl.zeros((BM, R), dtype=tl.float32)
    for p0 in range(0, P, BP):
        rp = p0 + tl.arange(0, BP)
        p_ok = rp < P
        X = tl.load(X_ptr + rm64[:, None] * stride_xm + rp[None, :] * stride_xp,
                    mask=m_ok[:, None] & p_ok[None, :], other=0.0)              # X: [BM, BP]
        Yt = tl.load(Y_ptr + rr[None, :] * stride_yr + rp[:, None] * stride_yp,
                     mask=p_ok[:, None] & r_ok[None, :], other=0.0)             # Y^T: [BP, R]
        if DROPOUT:
            X = tl.where(dropout_keep(seed, rm, rp, P, p_drop), X, 0.0)
        acc = tl.dot(X, Yt, acc, input_precision="ieee")  # ieee: no TF32 for fp32 inputs
    tl.store(out_ptr + rm64[:, None] * stride_om + rr[None, :] * stride_or,
             (acc * c).to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@autotune(gemm_configs("BN", "BK"), key=["M_BUCKET", "N", "K", "R", "S_IN_LOOP"], out_block="BN")
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _lora_fwd_kernel(
    x_ptr, W_ptr, b_ptr, A_ptr, B_ptr, S_ptr, y_ptr,   # x: [M, K] W: [N, K] b: [N] A: [r, K] B: [N, r]
    M, N, K, r, M_BUCKET, scale,                       # S: [M, r]   y: [M, N]
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_sm, stride_sr, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, S_IN_LOOP: tl.constexpr, STORE_S: tl.constexpr,
    R: tl.constexpr, RB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y = x W^T + b + S B^T for one [BM, BN] tile.
    S_IN_LOOP: x A^T accumulates beside x W^T in the K loop; S = s · x A^T is added at the end and
    the pid_n == 0 tiles store it for the backward (STORE_S). Otherwise S (from _rank_proj_kernel)
    seeds the accumulator: acc = S B^T (RB ranks at a time), then the K loop adds x W^T."""
    pid_m, pid_n = grouped_tile(M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rr = tl.arange(0, R)
    m_ok, n_ok, r_ok = rm < M, rn < N, rr < r
    rm64 = rm.to(tl.int64)

    acc = tl.zeros((BM, BN), dtype=tl.float32)                                  # y tile, fp32
    if S_IN_LOOP:
        xA = tl.zeros((BM, R), dtype=tl.float32)
        Bt = tl.load(B_ptr + rn[None, :] * stride_bn + rr[:, None] * stride_br,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)             # B^T: [R, BN]
    else:                                                                       # acc = S B^T
        acc = rank_product(acc, S_ptr, stride_sm, stride_sr, rm64, m_ok, B_ptr, stride_br, stride_bn, rn, n_ok, r, R, RB)

    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)              # x: [BM, BK]
        Wt = tl.load(W_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk,
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)             # W^T: [BK, BN]
        acc = tl.dot(x, Wt, acc, input_precision="ieee")  # ieee: no TF32 for fp32 inputs
        if S_IN_LOOP:
            At = tl.load(A_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak,
                         mask=k_ok[:, None] & r_ok[None, :], other=0.0)         # A^T: [BK, R]
            xA = tl.dot(x, At, xA, input_precision="ieee")

    if S_IN_LOOP:
        S = (xA * scale).to(B_ptr.dtype.element_ty)                             # S = s · x A^T
        if STORE_S:
            if pid_n == 0:
                tl.store(S_ptr + rm64[:, None] * stride_sm + rr[None, :] * stride_sr, S,
                         mask=m_ok[:, None] & r_ok[None, :])
        acc = tl.dot(S, Bt, acc, input_precision="ieee")                        # += S B^T
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm64[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(keep_ptr, M, K, p_drop, seed, BM: tl.constexpr, BK: tl.constexpr):
    """keep: [M, K] uint8, the mask the kernels regenerate (for tests / the float64 reference)."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    keep = dropout_keep(seed, rm, rk, K, p_drop)
    tl.store(keep_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], keep.to(tl.uint8),
             mask=(rm < M)[:, None] & (rk < K)[None, :])


# ----------------------------------------------------------------------------- launchers

def rank_proj(X, Yt, c, p_drop, seed):
    """c · (mask ⊙ X) Yt^T in X's dtype.   X: [M, P]  Yt: [r, P]  ->  [M, r]."""
    M, P = X.shape
    r = Yt.shape[0]
    out = empty((M, r), X.dtype, X.device)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]),)
    _rank_proj_kernel[grid](
        X, Yt, out, M, P, r, m_bucket(M), c, p_drop, seed,
        X.stride(0), X.stride(1), Yt.stride(0), Yt.stride(1), out.stride(0), out.stride(1),
        DROPOUT=p_drop > 0, R=r_pad(r),
    )
    return out


def lora_forward(x, W, b, A, B, scale, p_drop, seed, need_S, in_loop=None):
    """y = x W^T + b + s · xd A^T B^T.  x: [M, K] -> (y: [M, N], S = s · xd A^T: [M, r] or None).

    in_loop: where S is computed (None: the cost model `s_in_loop`; the tests force each strategy).
    With dropout, above r_pad = 32, or in fp32, S is computed separately (tiles.rank_in_loop)."""
    M, K = x.shape
    N, r = B.shape
    in_loop = rank_in_loop(r, N, K, p_drop, dot_kind(x.dtype), prefer=in_loop)
    if in_loop:
        S = empty((M, r), x.dtype, x.device) if need_S else None
    else:
        S = rank_proj(x, A, scale / (1.0 - p_drop), p_drop, seed)          # S = s · xd A^T: [M, r]
    y = empty((M, N), x.dtype, x.device)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)
    S_arg = S if S is not None else y  # unused pointer when S is neither read nor stored
    _lora_fwd_kernel[grid](
        x, W, b if b is not None else y, A, B, S_arg, y,
        M, N, K, r, m_bucket(M), scale,
        x.stride(0), x.stride(1), W.stride(0), W.stride(1), A.stride(0), A.stride(1),
        B.stride(0), B.stride(1), S_arg.stride(0), S_arg.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=b is not None, S_IN_LOOP=in_loop, STORE_S=need_S, R=r_pad(r), RB=rank_block(r, dot_kind(x.dtype)),
    )
    return y, S


def dropout_mask(seed, M, K, p_drop, device):
    """The keep mask [M, K] (bool) every Triton kernel regenerates for this seed."""
    keep = torch.empty((M, K), dtype=torch.uint8, device=device)
    BM, BK = 64, 64
    _dropout_mask_kernel[(triton.cdiv(M, BM), triton.cdiv(K, BK))](keep, M, K, p_drop, seed, BM=BM, BK=BK)
    return keep.bool()
