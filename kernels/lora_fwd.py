"""Triton forward of the fused LoRA linear, and what forward and backward share.

The maths (docs: lora-kernels.md), for x: [M, K], W: [N, K], b: [N], A: [r, K], B: [N, r]:

    xd = dropout(x)            (xd = x when p = 0; mask regenerated from a seed, never stored)
    S  = xd A^T                [M, r]
    y  = x W^T + b + s · S B^T [M, N]

Every kernel accumulates in fp32 and rounds once, at the store. Inputs arrive already cast to
one compute dtype (fp32, fp16 or bf16); S and dS are kept in fp32.

How S is obtained (the design decision, see `s_in_loop`):
  * in the GEMM's K loop: each output tile recomputes S for its BM rows from the x tile it
    already loaded -- no extra read of x, but r_pad/BN extra MMA work per tile;
  * in a separate skinny kernel (`_rank_proj_kernel`) whose result seeds the GEMM's fp32
    accumulator with s · S B^T -- one extra read of x (about ridge/N of the GEMM time), but no
    extra MMA work in the big GEMM.
The same choice applies to dS = s · dY B in the backward (lora_bwd.py), with N <-> K.
"""

import os

import torch
import triton
import triton.language as tl

# TRITON_INTERPRET=1 (CPU tests) is read by triton.jit at import time, so we read it here too:
# one fixed small config and no autotune under the interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Test hook: fill every buffer a kernel writes with NaN first, so unwritten elements show.
POISON_OUTPUTS = False

# H100 ridge point (FLOP per byte) and the tile width the cost model assumes.
_RIDGE = 236
_BN_MODEL = 128


def empty(shape, dtype, device):
    """A buffer some kernel will fill (NaN-poisoned when POISON_OUTPUTS is set)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def r_pad(r):
    """tl.dot needs every dim >= 16 and blocks are powers of two: rank 1..128 -> 16..128."""
    return max(16, triton.next_power_of_2(r))


def s_in_loop(r, n_out, n_red):
    """Compute the rank projection (S forward, dS backward) inside the GEMM's reduction loop?

    n_out, n_red: the GEMM's output width and reduction length (N, K forward; K, N for dX).
    In the loop the extra MMA work is r_pad/BN of the GEMM; as a separate kernel the extra cost
    is one more read of the GEMM's input, about ridge/n_out of a compute-bound GEMM (and ~0 MMA).
      * memory-bound GEMM (intensity n_out·n_red/(n_out+n_red) FLOP/B below the ridge, for large
        M; ESM-2 d = 320): extra MMA work is free -> in the loop;
      * compute bound: in the loop iff r_pad/BN < ridge/n_out, i.e. r_pad·n_out <= ridge·BN
        (~30k on H100). For ESM-2 at r <= 16 that is every GEMM whose output width is d
        (q/k/v/out, fc2 forward, fc1 backward) up to d = 1280; separate for output width 4d
        beyond d = 320, for everything at d >= 2560, and at r = 64 beyond d = 320.
    With dropout the forward always uses the separate kernel (see lora_forward): in the loop
    every N-tile would regenerate the Philox mask for its x rows (N/BN times per element of x,
    ~10 ALU ops per element each, comparable to the tile's MMA work), while the separate kernel
    draws it once per element.
    The constants are a cost model, not a measurement: re-tune on the GPU (NOTES.md).
    """
    memory_bound = n_out * n_red / (n_out + n_red) < _RIDGE
    return memory_bound or r_pad(r) * n_out <= _RIDGE * _BN_MODEL


def m_bucket(M):
    """Autotune key for the token count: next power of two, so batches don't each retune."""
    return triton.next_power_of_2(M)


# ----------------------------------------------------------------------------- configs

def gemm_configs(out_block, red_block):
    """Small list for the M×out GEMMs (BN = 64/32 for ESM-2's 5·2^k widths)."""
    shapes = [  # (BM, out, red, warps, stages)
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 32, 64, 4, 4),
        (64, 32, 128, 4, 4),
    ]
    return [
        triton.Config({"BM": bm, out_block: bo, red_block: br, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bo, br, w, s in shapes
    ]


def skinny_configs(red_block):
    """[M, P] @ [P, r] projections: a BM-row panel per program, reduction loop over P."""
    return [
        triton.Config({"BM": bm, red_block: bp}, num_warps=w, num_stages=s)
        for bm, bp, w, s in [(64, 64, 4, 4), (128, 64, 4, 4), (64, 128, 4, 3), (32, 128, 4, 4)]
    ]


def autotune(configs, key):
    """triton.autotune on a GPU; a no-op under the interpreter (launchers pass a fixed config)."""
    if INTERPRET:
        return lambda kernel: kernel
    return triton.autotune(configs, key=key)


# Fixed configs under TRITON_INTERPRET=1: small, unequal (to catch transposed indexing), and
# smaller than the test shapes so every kernel runs several tiles plus a ragged edge.
INTERPRET_GEMM_FWD = {"BM": 16, "BN": 32, "BK": 16, "GROUP_M": 8}
INTERPRET_PROJ = {"BM": 16, "BP": 16}


def launch_config(interpret_config):
    return interpret_config if INTERPRET else {}


# ----------------------------------------------------------------------------- kernels

@triton.jit
def dropout_keep(seed, rows, cols, n_cols, p_drop):
    """keep[i, j] = U(seed, row*n_cols + col) >= p: the mask of element (row, col) of an
    [M, n_cols] tensor, identical in every kernel and tile that regenerates it."""
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    return tl.rand(seed, offsets) >= p_drop


@triton.jit
def grouped_tile(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row tile, column tile) in grouped order: GROUP_M row tiles sweep the
    column tiles together, so the weight tiles they share are reused from L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    group = GROUP_M * tl.cdiv(N, BN)
    first_m = (pid // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group) % group_m, (pid % group) // group_m


@autotune(skinny_configs("BP"), key=["M_BUCKET", "P", "R", "DROPOUT"])
@triton.jit(do_not_specialize=["seed"])
def _rank_proj_kernel(
    X_ptr, Y_ptr, out_ptr,            # X: [M, P]  Y: [r, P]  out: [M, r] fp32
    M, P, r, M_BUCKET, c, p_drop, seed,
    stride_xm, stride_xp, stride_yr, stride_yp, stride_om, stride_or,
    DROPOUT: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr,
):
    """out = c · (mask ⊙ X) Y^T.   S = xd A^T: X = x, Y = A, c = 1/(1-p), mask on.
                                   dS = s · dY B: X = dY, Y = B^T, c = s, no mask."""
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
                    mask=m_ok[:, None] & p_ok[None, :], other=0.0)              # [BM, BP]
        Yt = tl.load(Y_ptr + rr[None, :] * stride_yr + rp[:, None] * stride_yp,
                     mask=p_ok[:, None] & r_ok[None, :], other=0.0)             # [BP, R]
        if DROPOUT:
            X = tl.where(dropout_keep(seed, rm, rp, P, p_drop), X, 0.0)
        acc = tl.dot(X, Yt, acc, input_precision="ieee")  # ieee: no TF32 for fp32 inputs
    tl.store(out_ptr + rm64[:, None] * stride_om + rr[None, :] * stride_or, acc * c,
             mask=m_ok[:, None] & r_ok[None, :])


@autotune(gemm_configs("BN", "BK"), key=["M_BUCKET", "N", "K", "R", "S_IN_LOOP", "DROPOUT"])
@triton.jit(do_not_specialize=["seed"])
def _lora_fwd_kernel(
    x_ptr, W_ptr, b_ptr, A_ptr, B_ptr, S_ptr, y_ptr,   # x: [M, K] W: [N, K] b: [N] A: [r, K] B: [N, r]
    M, N, K, r, M_BUCKET, scale, p_drop, seed,         # S: [M, r] fp32   y: [M, N]
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_sm, stride_sr, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, S_IN_LOOP: tl.constexpr, STORE_S: tl.constexpr, DROPOUT: tl.constexpr,
    R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y = x W^T + b + s · S B^T for one [BM, BN] tile.
    S_IN_LOOP: S = xd A^T accumulates beside x W^T in the K loop (and the pid_n == 0 tiles store
    it for the backward when STORE_S). Otherwise S was computed by _rank_proj_kernel and seeds
    the accumulator."""
    pid_m, pid_n = grouped_tile(M, N, BM, BN, GROUP_M)

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rr = tl.arange(0, R)
    m_ok = rm < M
    n_ok = rn < N
    r_ok = rr < r
    rm64 = rm.to(tl.int64)

    Bt = tl.load(B_ptr + rn[None, :] * stride_bn + rr[:, None] * stride_br,
                 mask=r_ok[:, None] & n_ok[None, :], other=0.0)                 # B^T: [R, BN]
    acc = tl.zeros((BM, BN), dtype=tl.float32)                                  # y tile, fp32
    if S_IN_LOOP:
        S = tl.zeros((BM, R), dtype=tl.float32)
    else:
        S = tl.load(S_ptr + rm64[:, None] * stride_sm + rr[None, :] * stride_sr,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)             # S: [BM, R]
        acc = tl.dot((S * scale).to(Bt.dtype), Bt, acc, input_precision="ieee")

    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)              # x: [BM, BK]
        Wt = tl.load(W_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk,
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)             # W^T: [BK, BN]
        acc = tl.dot(x, Wt, acc, input_precision="ieee")
        if S_IN_LOOP:
            At = tl.load(A_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak,
                         mask=k_ok[:, None] & r_ok[None, :], other=0.0)         # A^T: [BK, R]
            if DROPOUT:  # mask ⊙ x here, the 1/(1-p) once on S below (fp32)
                x = tl.where(dropout_keep(seed, rm, rk, K, p_drop), x, 0.0)
            S = tl.dot(x, At, S, input_precision="ieee")

    if S_IN_LOOP:
        if DROPOUT:
            S = S / (1.0 - p_drop)
        if STORE_S:
            if pid_n == 0:
                tl.store(S_ptr + rm64[:, None] * stride_sm + rr[None, :] * stride_sr, S,
                         mask=m_ok[:, None] & r_ok[None, :])
        acc = tl.dot((S * scale).to(Bt.dtype), Bt, acc, input_precision="ieee")  # += s · S B^T

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
    """c · (mask ⊙ X) Yt^T in fp32.   X: [M, P]  Yt: [r, P]  ->  [M, r] fp32."""
    M, P = X.shape
    r = Yt.shape[0]
    out = empty((M, r), torch.float32, X.device)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]),)
    _rank_proj_kernel[grid](
        X, Yt, out, M, P, r, m_bucket(M), c, p_drop, seed,
        X.stride(0), X.stride(1), Yt.stride(0), Yt.stride(1), out.stride(0), out.stride(1),
        DROPOUT=p_drop > 0, R=r_pad(r), **launch_config(INTERPRET_PROJ),
    )
    return out


def lora_forward(x, W, b, A, B, scale, p_drop, seed, need_S, in_loop=None):
    """y = x W^T + b + s · xd A^T B^T.  x: [M, K] -> (y: [M, N], S: [M, r] fp32 or None).

    in_loop: where S is computed (None: the cost model `s_in_loop`; tests force both)."""
    M, K = x.shape
    N, r = B.shape
    if in_loop is None:
        in_loop = s_in_loop(r, N, K) and p_drop == 0  # dropout: draw the mask once (s_in_loop)
    if in_loop:
        S = empty((M, r), torch.float32, x.device) if need_S else None
    else:
        S = rank_proj(x, A, 1.0 / (1.0 - p_drop), p_drop, seed)   # S = xd A^T: [M, r]
    y = empty((M, N), x.dtype, x.device)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)
    S_arg = S if S is not None else y  # unused pointer when S is neither read nor stored
    _lora_fwd_kernel[grid](
        x, W, b if b is not None else y, A, B, S_arg, y,
        M, N, K, r, m_bucket(M), scale, p_drop, seed,
        x.stride(0), x.stride(1), W.stride(0), W.stride(1), A.stride(0), A.stride(1),
        B.stride(0), B.stride(1), S_arg.stride(0), S_arg.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=b is not None, S_IN_LOOP=in_loop, STORE_S=need_S, DROPOUT=p_drop > 0,
        R=r_pad(r), **launch_config(INTERPRET_GEMM_FWD),
    )
    return y, S


def dropout_mask(seed, M, K, p_drop, device):
    """The keep mask [M, K] (bool) every Triton kernel regenerates for this seed."""
    keep = torch.empty((M, K), dtype=torch.uint8, device=device)
    BM, BK = 64, 64
    _dropout_mask_kernel[(triton.cdiv(M, BM), triton.cdiv(K, BK))](keep, M, K, p_drop, seed, BM=BM, BK=BK)
    return keep.bool()
