"""Triton backward of the fused LoRA linear (no dW, no db: the base is frozen). With S = s · xd A^T
saved by the forward:

    dS = s · dY B                        [M, r]
    dX = dY W + mask ⊙ (dS A) / (1-p)    [M, K]   (mask term only when p > 0)
    dA = dS^T xd                         [r, K]
    dB = dY^T S                          [N, r]

dS = s · dY B reduces over N exactly like dX = dY W, so (p = 0) it may accumulate in the dX
kernel's N loop, or is computed first by the skinny `_rank_proj_kernel` (the same cost model as
the forward's S, with N and K swapped: `s_in_loop(r, K, N)`). Computed first, the (masked) dS A
seeds the dX accumulator, so a tile never holds two fp32 [BM, BK] tiles at once.
dA and dB are skinny reductions over M: each program sums one P-tile over a fixed chunk of
rows into its own slot of a partial buffer [splits, P, r]; the chunks are then summed in a
fixed order. No atomics, so the gradients are bitwise identical run to run.
"""

import torch
import triton
import triton.language as tl

from .lora_fwd import rank_proj
from .tiles import (GRAD_ROW_ALIGN, autotune, dot_kind, dropout_keep, empty, gemm_configs, grad_configs, grouped_tile,
                    m_bucket, r_pad, rank_block, rank_in_loop, rank_product)

__all__ = ["lora_backward", "rank_grad"]


@autotune(gemm_configs("BK", "BN"), key=["M_BUCKET", "N", "K", "R", "DS_IN_LOOP", "DROPOUT"], out_block="BK")
@triton.jit(do_not_specialize=["M", "M_BUCKET", "seed"])
def _lora_dx_kernel(
    dY_ptr, W_ptr, A_ptr, B_ptr, dS_ptr, dX_ptr,       # dY: [M, N] W: [N, K] A: [r, K] B: [N, r]
    M, N, K, r, M_BUCKET, scale, p_drop, seed,         # dS: [M, r]   dX: [M, K]
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_dsm, stride_dsr, stride_dxm, stride_dxk,
    DS_IN_LOOP: tl.constexpr, STORE_DS: tl.constexpr, DROPOUT: tl.constexpr,
    R: tl.constexpr, RB: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dX = dY W + mask ⊙ (dS A)/(1-p) for one [BM, BK] tile (BN: the reduction block over N).
    DS_IN_LOOP (p = 0): dY B accumulates beside dY W in the N loop; dS = s · dY B is stored by the
    pid_k == 0 tiles for dA (STORE_DS) and dS A added at the end. Otherwise dS came from
    _rank_proj_kernel and seeds the accumulator: acc = mask ⊙ (dS A)/(1-p) (RB ranks at a time), then the
    loop adds dY W."""
    pid_m, pid_k = grouped_tile(M, K, BM, BK, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    rr = tl.arange(0, R)
    m_ok, k_ok, r_ok = rm < M, rk < K, rr < r
    rm64 = rm.to(tl.int64)
    A_ptrs = A_ptr + rr[:, None] * stride_ar + rk[None, :] * stride_ak
    dS_ptrs = dS_ptr + rm64[:, None] * stride_dsm + rr[None, :] * stride_dsr

    acc = tl.zeros((BM, BK), dtype=tl.float32)                                  # dX tile, fp32
    if DS_IN_LOOP:
        dYB = tl.zeros((BM, R), dtype=tl.float32)
    else:                                                                       # acc = dS A
        acc = rank_product(acc, dS_ptr, stride_dsm, stride_dsr, rm64, m_ok, A_ptr, stride_ar, stride_ak, rk, k_ok, r, R, RB)
        if DROPOUT:
            acc = tl.where(dropout_keep(seed, rm, rk, K, p_drop), acc * (1.0 / (1.0 - p_drop)), 0.0)

    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        n_ok = rn < N
        dY = tl.load(dY_ptr + rm64[:, None] * stride_dym + rn[None, :] * stride_dyn,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)             # dY: [BM, BN]
        W = tl.load(W_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk,
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)              # W: [BN, BK]
        acc = tl.dot(dY, W, acc, input_precision="ieee")  # ieee: no TF32 for fp32 inputs
        if DS_IN_LOOP:
            B = tl.load(B_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                        mask=n_ok[:, None] & r_ok[None, :], other=0.0)          # B: [BN, R]
            dYB = tl.dot(dY, B, dYB, input_precision="ieee")

    if DS_IN_LOOP:
        dS = (dYB * scale).to(dX_ptr.dtype.element_ty)                          # dS = s · dY B
        if STORE_DS:
            if pid_k == 0:
                tl.store(dS_ptrs, dS, mask=m_ok[:, None] & r_ok[None, :])
        A = tl.load(A_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)     # A: [R, BK]
        acc = tl.dot(dS, A, acc, input_precision="ieee")                        # += dS A
    tl.store(dX_ptr + rm64[:, None] * stride_dxm + rk[None, :] * stride_dxk,
             acc.to(dX_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


@autotune(grad_configs(), key=["M_BUCKET", "P", "R", "DROPOUT"])
@triton.jit(do_not_specialize=["M", "M_BUCKET", "seed"])
def _rank_grad_kernel(
    X_ptr, Y_ptr, part_ptr,           # X: [M, P]  Y: [M, r]  part: [splits, P, r] fp32
    M, P, r, M_BUCKET, rows_per_split, c, p_drop, seed,
    stride_xm, stride_xp, stride_ym, stride_yr, stride_part_s, stride_part_p, stride_part_r,
    DROPOUT: tl.constexpr, R: tl.constexpr, BP: tl.constexpr, BM: tl.constexpr,
):
    """part[split] = c · (mask ⊙ X)^T Y over the rows of one M-chunk, for one P-tile.
    dA^T = xd^T dS: X = x, Y = dS, c = 1/(1-p), mask on.   dB = dY^T S: X = dY, Y = S, c = 1."""
    pid_p = tl.program_id(0)
    split = tl.program_id(1)
    rp = pid_p * BP + tl.arange(0, BP)
    rr = tl.arange(0, R)
    p_ok, r_ok = rp < P, rr < r
    acc = tl.zeros((BP, R), dtype=tl.float32)
    m_start = split * rows_per_split
    m_end = min(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BM):
        rm = m0 + tl.arange(0, BM)
        m_ok = rm < m_end
        rm64 = rm.to(tl.int64)
        X = tl.load(X_ptr + rm64[:, None] * stride_xm + rp[None, :] * stride_xp,
                    mask=m_ok[:, None] & p_ok[None, :], other=0.0)              # X: [BM, BP]
        Y = tl.load(Y_ptr + rm64[:, None] * stride_ym + rr[None, :] * stride_yr,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)              # Y: [BM, R]
        if DROPOUT:
            X = tl.where(dropout_keep(seed, rm, rp, P, p_drop), X, 0.0)
        acc = tl.dot(tl.trans(X), Y, acc, input_precision="ieee")              # X^T Y: [BP, R]
    tl.store(part_ptr + split * stride_part_s + rp[:, None] * stride_part_p + rr[None, :] * stride_part_r,
             acc * c, mask=p_ok[:, None] & r_ok[None, :])


def _target_programs(device):
    """Enough programs for a few waves: 4 per SM on a GPU; 4 elsewhere (the interpreter's tests
    then see more than one chunk)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def rank_grad(X, Y, c, p_drop, seed):
    """c · (mask ⊙ X)^T Y summed over M.   X: [M, P]  Y: [M, r]  ->  [P, r] fp32."""
    M, P = X.shape
    r = Y.shape[1]
    # M-chunks: enough programs to fill the device with the narrowest P-tiles; the chunking does
    # not depend on the autotuned tiles, so every config writes the same partial sums.
    p_tiles = triton.cdiv(P, min(cfg.kwargs["BP"] for cfg in grad_configs()))
    splits = min(triton.cdiv(M, GRAD_ROW_ALIGN), max(1, triton.cdiv(_target_programs(X.device), p_tiles)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), GRAD_ROW_ALIGN) * GRAD_ROW_ALIGN
    splits = triton.cdiv(M, rows_per_split)
    part = empty((splits, P, r), torch.float32, X.device)
    grid = lambda meta: (triton.cdiv(P, meta["BP"]), splits)
    _rank_grad_kernel[grid](
        X, Y, part, M, P, r, m_bucket(M), rows_per_split, c, p_drop, seed,
        X.stride(0), X.stride(1), Y.stride(0), Y.stride(1), part.stride(0), part.stride(1), part.stride(2),
        DROPOUT=p_drop > 0, R=r_pad(r),
    )
    return part.sum(0)  # fixed-order reduction over the chunks (no atomics)


def lora_backward(dY, x, W, A, B, S, scale, p_drop, seed, need_dX, need_dA, need_dB, in_loop=None):
    """dY: [M, N], x: [M, K], S = s · xd A^T: [M, r] (needed for dB) -> (dX, dA fp32, dB fp32),
    None where not needed. in_loop: where dS is computed (None: the cost model `s_in_loop`; the
    tests force each strategy); with dropout, above r_pad = 32, or in fp32, dS is computed first."""
    M, N = dY.shape
    K = x.shape[1]
    r = A.shape[0]
    in_loop = rank_in_loop(r, K, N, p_drop, dot_kind(dY.dtype), prefer=in_loop)
    dX = dS = dA = dB = None
    if need_dX:
        if in_loop:
            dS = empty((M, r), dY.dtype, dY.device) if need_dA else None
        else:
            dS = rank_proj(dY, B.T, scale, 0.0, seed)                  # dS = s · dY B: [M, r]
        dX = empty((M, K), dY.dtype, dY.device)
        dS_arg = dS if dS is not None else dX  # unused pointer when dS is neither read nor stored
        grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(K, meta["BK"]),)
        _lora_dx_kernel[grid](
            dY, W, A, B, dS_arg, dX, M, N, K, r, m_bucket(M), scale, p_drop, seed,
            dY.stride(0), dY.stride(1), W.stride(0), W.stride(1), A.stride(0), A.stride(1),
            B.stride(0), B.stride(1), dS_arg.stride(0), dS_arg.stride(1), dX.stride(0), dX.stride(1),
            DS_IN_LOOP=in_loop, STORE_DS=need_dA, DROPOUT=p_drop > 0, R=r_pad(r), RB=rank_block(r, dot_kind(dY.dtype)),
        )
    elif need_dA:
        dS = rank_proj(dY, B.T, scale, 0.0, seed)
    if need_dA:
        dA = rank_grad(x, dS, 1.0 / (1.0 - p_drop), p_drop, seed).T   # dA = dS^T xd: [r, K]
    if need_dB:
        dB = rank_grad(dY, S, 1.0, 0.0, seed)                         # dB = dY^T S: [N, r]
    return dX, dA, dB
