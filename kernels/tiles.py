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

# (BM, output block, reduction block, warps, stages) of the M x out GEMMs. ESM-2 widths are
# 5·2^k: a 64-wide output block keeps the last tile of 320 / 1280 / 5120 full.
GEMM_TILES = [(16, 32, 16, 1, 1)] if INTERPRET else [
    (128, 128, 64, 8, 3),   # the Hopper / Ampere workhorse
    (128, 256, 64, 8, 3),   # wide outputs (fc1: 4d)
    (128, 64, 64, 4, 4),    # narrow outputs (d = 320)
    (64, 64, 64, 4, 4),     # few tokens
]
# (BM, BP, warps, stages) of the skinny projections [M, P] @ [P, r] (S and dS).
PROJ_TILES = [(16, 16, 1, 1)] if INTERPRET else [(64, 64, 4, 4), (128, 64, 4, 4)]
# (BP, BM, warps, stages) of the skinny reductions over M, [P, M] @ [M, r] (dA and dB).
GRAD_TILES = [(16, 16, 1, 1)] if INTERPRET else [(64, 64, 4, 3), (128, 64, 8, 3)]
# Rows of one reduction chunk are a multiple of every BM of GRAD_TILES.
GRAD_ROW_ALIGN = max(bm for _, bm, _, _ in GRAD_TILES)


def empty(shape, dtype, device):
    """A buffer some kernel will fill (NaN-poisoned when POISON_OUTPUTS is set)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def r_pad(r):
    """tl.dot needs every dim >= 16 and blocks are powers of two: rank 1..128 -> 16..128."""
    return max(16, triton.next_power_of_2(r))


def m_bucket(M):
    """Autotune key for the token count: next power of two, so batches don't each retune."""
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


def rank_in_loop(r, n_out, n_red, p_drop, prefer=None) -> bool:
    """The launchers' choice: never with dropout (the mask is drawn once per element, in its own
    kernel) nor above MAX_R_IN_LOOP; otherwise `prefer` (tests force each strategy) or the cost
    model."""
    if p_drop > 0 or r_pad(r) > MAX_R_IN_LOOP:
        return False
    return s_in_loop(r, n_out, n_red) if prefer is None else prefer


# ----------------------------------------------------------------------------- configs

def gemm_configs(out_block, red_block):
    return [triton.Config({"BM": bm, out_block: bo, red_block: br, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bo, br, w, s in GEMM_TILES]


def proj_configs():
    return [triton.Config({"BM": bm, "BP": bp}, num_warps=w, num_stages=s) for bm, bp, w, s in PROJ_TILES]


def grad_configs():
    return [triton.Config({"BP": bp, "BM": bm}, num_warps=w, num_stages=s) for bp, bm, w, s in GRAD_TILES]


def target_arch() -> int:
    """Compute capability of the device triton compiles for (90: H100/H200, 80: A100). Without a
    driver (compiling ahead of time on a machine with no GPU) the stricter rules of sm_80 apply."""
    from triton.runtime import driver
    try:
        return driver.active.get_current_target().arch
    except RuntimeError:  # "0 active drivers"
        return 80


def tile_fits(bm: int, out: int, R: int, dropout: bool, arch: int) -> bool:
    """Does an output tile [bm, out] stay in registers and shared memory? The rules are what
    tests/test_kernels_compile.py found compiling every config for sm_90 and sm_80:
      * without warpgroup MMA (sm_80: mma.sync keeps its operands in registers) the 128 x 256
        tile spills beside the rank tiles;
      * at padded rank 128 the [bm, R] rank tiles double: only bm = 64 stays out of spills (and
        128 x 256 inside sm_90's 227 KB of shared memory);
      * with dropout a tile draws its Philox mask for all of its elements at once (the dX seed
        tile, the projection's input tile): only bm = 64 stays out of spills."""
    if arch < 90 and bm * out > 128 * 128:
        return False
    return bm <= 64 or not (R >= 128 or dropout)


def fitting(out_block):
    """early_config_prune for kernels whose output tile is [BM, out_block] (see tile_fits)."""
    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs
        arch, R, dropout = target_arch(), kwargs["R"], kwargs.get("DROPOUT", False)
        return [c for c in configs if tile_fits(c.kwargs["BM"], {**kwargs, **c.kwargs}[out_block], R, dropout, arch)]
    return prune


def autotune(configs, key, out_block=None):
    """triton.autotune, on a GPU and under the interpreter alike (one config there: no timing);
    out_block: prune the tiles that would not fit (see tile_fits)."""
    prune = {"early_config_prune": fitting(out_block)} if out_block else None
    return triton.autotune(configs, key=key, prune_configs_by=prune)


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
def dropout_keep(seed, rows, cols, n_cols, p_drop):
    """keep[i, j] = U(seed, row*n_cols + col) >= p: the mask of element (row, col) of an
    [M, n_cols] tensor, identical in every kernel and tile that regenerates it."""
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    return tl.rand(seed, offsets) >= p_drop
