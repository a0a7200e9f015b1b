"""What the LoRA kernels share: their tile configurations and autotuning, where the rank
projection is computed (the cost model), the order of output tiles, and the dropout mask.

Under TRITON_INTERPRET=1 (the CPU tests) the same kernels, decorators and launchers run; only
the tile lists differ: one small config each, smaller than the test shapes so every kernel runs
several tiles plus a ragged edge, with unequal block sizes to catch transposed indexing.
"""

import os

import torch
import triton
import triton.language as tl

# triton.jit reads TRITON_INTERPRET when a kernel is defined (at import), so it is read here too.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Test hook: fill every buffer a kernel writes with NaN first, so unwritten elements show.
POISON_OUTPUTS = False

# H100 ridge point (FLOP per byte) and the tile width the cost model assumes.
_RIDGE = 236
_BN_MODEL = 128
# Above this padded rank the rank projection never runs inside a GEMM's loop: its fp32
# accumulator [BM, R] would sit beside the GEMM's own and push large tiles into spilling.
MAX_R_IN_LOOP = 32

# Tile lists per kind of dot. bf16/fp16 dots run on the tensor cores (wgmma on sm_90, mma.sync
# on sm_80) with their operands staged in shared memory. fp32 dots (input_precision="ieee": no TF32)
# are plain FMA: each thread holds its rows of both operand tiles in registers, so fp32 tiles
# have a short reduction block and fewer accumulator elements per thread. A launch keeps only its
# own kind's tiles (`fitting`); the autotuner's key includes the argument dtypes, so each kind
# tunes among its own.
#
# (BM, output block, reduction block, warps, stages) of the M x out GEMMs. ESM-2 widths are
# 5·2^k: a 64-wide output block keeps the last tile of 320 / 1280 / 5120 full.
GEMM_TILES = {"mma": [
    (128, 128, 64, 8, 3),   # the Hopper / Ampere workhorse
    (128, 256, 64, 8, 3),   # wide outputs (fc1: 4d)
    (128, 64, 64, 4, 4),    # narrow outputs (d = 320)
    (64, 64, 64, 4, 4),     # few tokens
], "fma": [
    (64, 64, 32, 8, 3),
    (32, 64, 32, 4, 3),     # few tokens
]}
# (BM, BP, warps, stages) of the skinny projections [M, P] @ [P, r] (S and dS).
PROJ_TILES = {"mma": [(64, 64, 4, 4), (128, 64, 4, 4)], "fma": [(64, 32, 4, 3), (32, 32, 4, 3)]}
# (BP, BM, warps, stages) of the skinny reductions over M, [P, M] @ [M, r] (dA and dB).
GRAD_TILES = {"mma": [(64, 64, 4, 3), (128, 64, 8, 3)], "fma": [(64, 32, 4, 3), (128, 32, 8, 3)]}
if INTERPRET:  # one config per kernel, for both kinds
    GEMM_TILES = {"mma": [(16, 32, 16, 1, 1)], "fma": [(16, 32, 16, 1, 1)]}
    PROJ_TILES = {"mma": [(16, 16, 1, 1)], "fma": [(16, 16, 1, 1)]}
    GRAD_TILES = {"mma": [(16, 16, 1, 1)], "fma": [(16, 16, 1, 1)]}
# Rows of one reduction chunk are a multiple of every BM of GRAD_TILES.
GRAD_ROW_ALIGN = max(bm for tiles in GRAD_TILES.values() for _, bm, _, _ in tiles)


def dot_kind(dtype) -> str:
    """"fma" for fp32 compute (ieee dots), "mma" for bf16/fp16 (tensor cores). dtype: a torch or
    triton dtype, or its name."""
    return "fma" if str(dtype).rsplit(".", 1)[-1] in ("float32", "fp32") else "mma"


def empty(shape, dtype, device):
    """A buffer some kernel will fill (NaN-poisoned when POISON_OUTPUTS is set)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def r_pad(r):
    """tl.dot needs every dim >= 16 and blocks are powers of two: rank 1..128 -> 16..128."""
    return max(16, triton.next_power_of_2(r))


def rank_block(r, kind) -> int:
    """Ranks per step of `rank_product`. An fp32 (FMA) dot holds each thread's rows of both operands
    in registers: over the whole padded rank (up to 128) that spilled on sm_80, so fp32 steps 16
    ranks at a time; tensor-core dots take the whole rank in one step."""
    return r_pad(r) if kind == "mma" else 16


def m_bucket(M):
    """Autotune key for the token count: next power of two, so batches don't each retune. The
    kernels take M and M_BUCKET unspecialised (do_not_specialize): triton would otherwise compile
    a binary per divisibility of the token count (M % 16, M == 1), which changes every batch."""
    return triton.next_power_of_2(M)


def s_in_loop(r, n_out, n_red):
    """Compute the rank projection (S forward, dS backward) inside the GEMM's reduction loop?

    n_out, n_red: the GEMM's output width and reduction length (N, K forward; K, N for dX).
    In the loop the extra MMA work is r_pad/BN of the GEMM; as a separate kernel the extra cost
    is one more read of the GEMM's input, about ridge/n_out of a compute-bound GEMM (and ~0 MMA).
      * memory-bound GEMM (intensity n_out·n_red/(n_out+n_red) FLOP/B below the ridge, for large
        M; ESM-2 d = 320): extra MMA work is free -> in the loop;
      * compute bound: in the loop iff r_pad/BN < ridge/n_out, i.e. r_pad·n_out <= ridge·BN
        (~30k on H100): at r <= 16 every GEMM whose output width is d up to d = 1280.
    Never above MAX_R_IN_LOOP (registers), and never with dropout (the launchers' choice).
    The constants are a cost model, not a measurement: re-tune on the GPU (benchmarks/NOTES.md).
    """
    if r_pad(r) > MAX_R_IN_LOOP:
        return False
    memory_bound = n_out * n_red / (n_out + n_red) < _RIDGE
    return memory_bound or r_pad(r) * n_out <= _RIDGE * _BN_MODEL


def rank_in_loop(r, n_out, n_red, p_drop, kind, prefer=None) -> bool:
    """The launchers' choice: never with dropout (the mask is drawn once per element, in its own
    kernel) nor above MAX_R_IN_LOOP; otherwise `prefer` (tests force each strategy), else never
    for fp32 (kind "fma": the rank product would add r_pad/BN of FMA work to a GEMM that is
    compute bound at the FMA rate, against one extra read of x when separate; and its [BM, R]
    accumulator beside the GEMM's spilled on sm_90), else the cost model."""
    if p_drop > 0 or r_pad(r) > MAX_R_IN_LOOP:
        return False
    if prefer is not None:
        return prefer
    return kind == "mma" and s_in_loop(r, n_out, n_red)


# ----------------------------------------------------------------------------- configs

def _configs(tiles: dict, make) -> list:
    """One triton.Config per distinct tile of `tiles` ({kind: [tile, ...]}), tagged with the dot
    kinds it serves (`config.kinds`); make(tile) -> (kwargs, num_warps, num_stages)."""
    kinds = {}
    for kind, tile_list in tiles.items():
        for tile in tile_list:
            kinds.setdefault(tile, set()).add(kind)
    configs = []
    for tile, served in kinds.items():
        kwargs, warps, stages = make(tile)
        config = triton.Config(kwargs, num_warps=warps, num_stages=stages)
        config.kinds = frozenset(served)
        configs.append(config)
    return configs


def gemm_configs(out_block, red_block):
    return _configs(GEMM_TILES, lambda t: ({"BM": t[0], out_block: t[1], red_block: t[2], "GROUP_M": 8}, t[3], t[4]))


def proj_configs():
    return _configs(PROJ_TILES, lambda t: ({"BM": t[0], "BP": t[1]}, t[2], t[3]))


def grad_configs():
    return _configs(GRAD_TILES, lambda t: ({"BP": t[0], "BM": t[1]}, t[2], t[3]))


def target_arch() -> int:
    """Compute capability of the device triton compiles for (90: H100/H200, 80: A100). Without a
    driver (compiling ahead of time on a machine with no GPU) the stricter rules of sm_80 apply."""
    from triton.runtime import driver
    try:
        return driver.active.get_current_target().arch
    except RuntimeError:  # "0 active drivers"
        return 80


def tile_fits(bm: int, out: int, R: int, dropout: bool, arch: int, kind: str = "mma") -> bool:
    """Does an output tile [bm, out] stay in registers and shared memory? The rules are what the
    compile check (tests/kernels/test_kernels_compile.py) found compiling every config for sm_90 and sm_80:
    mma (bf16/fp16):
      * without warpgroup MMA (sm_80: mma.sync keeps its operands in registers) the 128 x 256
        tile spills beside the rank tiles;
      * at padded rank 128 the [bm, R] rank tiles double: only bm = 64 stays out of spills (and
        128 x 256 inside sm_90's 227 KB of shared memory);
      * with dropout a tile draws its Philox mask for all of its elements at once (the dX seed
        tile, the projection's input tile): only bm = 64 stays out of spills.
    fma (fp32): the accumulator and each thread's rows of both operands live in registers: at most
      64 x 64 output elements (a [64, 128] projection tile at rank 128 spilled on sm_90)."""
    if kind == "fma":
        return bm * out <= 64 * 64
    if arch < 90 and bm * out > 128 * 128:
        return False
    return bm <= 64 or not (R >= 128 or dropout)


def fitting(out_block):
    """early_config_prune: the configs of the launch's dot kind (from its first argument's dtype)
    and, for kernels whose output tile is [BM, out_block], only the tiles that fit (tile_fits)."""
    def prune(configs, named_args, **kwargs):
        kind = dot_kind(next(iter(named_args.values())).dtype)
        configs = [c for c in configs if kind in c.kinds]
        if INTERPRET or out_block is None:
            return configs
        arch, R, dropout = target_arch(), kwargs["R"], kwargs.get("DROPOUT", False)
        return [c for c in configs
                if tile_fits(c.kwargs["BM"], {**kwargs, **c.kwargs}[out_block], R, dropout, arch, kind)]
    return prune


def bench_config(kernel_call, quantiles):
    """The autotuner's timer: the driver's own benchmarker over 25 ms per config (triton's default
    is 100 ms). A LoRA run tunes every adapted layer shape at its start, among two to four tiles."""
    from triton.runtime import driver
    return driver.active.get_benchmarker()(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def autotune(configs, key, out_block=None):
    """triton.autotune, on a GPU and under the interpreter alike (one config there: no timing),
    keeping the configs of the launch's dot kind; out_block: also prune the tiles that would not
    fit (see tile_fits)."""
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": fitting(out_block)},
                           do_bench=bench_config)


# ----------------------------------------------------------------------------- device helpers

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


@triton.jit
def rank_product(acc, P_ptr, stride_pm, stride_pr, rows, row_ok, Q_ptr, stride_qr, stride_qc, cols, col_ok,
                 r, R: tl.constexpr, RB: tl.constexpr):
    """acc + P[rows, :r] Q[:r, cols] (acc: [BM, BN] fp32), RB ranks at a time. The low-rank term
    that seeds a GEMM's accumulator: S B^T forward (P = S, Q = B^T), dS A backward (P = dS, Q = A)."""
    for r0 in tl.static_range(0, R, RB):
        rb = r0 + tl.arange(0, RB)
        rb_ok = rb < r
        P = tl.load(P_ptr + rows[:, None] * stride_pm + rb[None, :] * stride_pr,
                    mask=row_ok[:, None] & rb_ok[None, :], other=0.0)           # P: [BM, RB]
        Q = tl.load(Q_ptr + rb[:, None] * stride_qr + cols[None, :] * stride_qc,
                    mask=rb_ok[:, None] & col_ok[None, :], other=0.0)           # Q: [RB, BN]
        acc = tl.dot(P, Q, acc, input_precision="ieee")
    return acc


@triton.jit
def dropout_keep(seed, rows, cols, n_cols, p_drop):
    """keep[i, j] = U(seed, row*n_cols + col) >= p: the mask of element (row, col) of an
    [M, n_cols] tensor, identical in every kernel and tile that regenerates it."""
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    return tl.rand(seed, offsets) >= p_drop
