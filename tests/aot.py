"""Compile the project's Triton kernels for an NVIDIA GPU this machine does not have.

How: a stand-in triton driver reports the target (sm_90: H100/H200, sm_80: A100) and the project's
own launchers (lora_forward, lora_backward, dropout_mask) run on "meta" tensors -- CUDA-like
16-byte-aligned tensors with no data. Every launch therefore goes through triton's real binder,
specialisation and autotuner (each config of its list), and `JITFunction.run` is called with
warmup=True: triton compiles the kernel for the target (ttir -> ttgir -> ptx -> cubin with the
ptxas inside the triton wheel) and stops before launching. The ptxas log (-v) gives registers,
stack and spills; the compiled kernel's metadata gives shared memory; its ttgir shows whether
the dots became Hopper's warpgroup MMA (wgmma).

Used by tests/kernels/test_kernels_compile.py, in spawned processes (TRITON_INTERPRET unset, one per
architecture). `compile_cover(arch)` returns plain dicts, one per compiled unit (kernel x
specialisation x config), plus the launches that failed to bind or compile.
"""

import contextlib
import io
import os
import re
import time
from dataclasses import dataclass

SMEM_LIMIT = {90: 232448, 80: 166912}    # max shared memory per block (opt-in): H100/H200, A100
SM_COUNT = {90: 132, 80: 108}            # H100 SXM / H200, A100 SXM
REGISTERS_PER_BLOCK = 65536
GRID_LIMIT = (2**31 - 1, 65535, 65535)
GEMM_KERNELS = ("_lora_fwd_kernel", "_lora_dx_kernel")  # must use wgmma on sm_90
TILE_NAMES = ("BM", "BN", "BK", "BP", "GROUP_M")         # autotuned block sizes

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # names of torch dtypes
WIDTHS = {"8M": 320, "35M": 480, "650M": 1280, "3B": 2560, "15B": 5120}  # ESM-2 d; FFN 4d
ESMC_WIDTHS = {"300M": 960, "600M": 1152, "6B": 2560}  # ESM C d; SwiGLU 8/3 d rounded up to 256: 2560, 3072, 6912
DROPOUT_P = 0.1


# ----------------------------------------------------------------------------- the cover

@dataclass(frozen=True)
class Launch:
    """One call of the launchers: a LoRA linear y = x W^T + b + s·dropout(x) A^T B^T, fwd (+ bwd)."""
    N: int
    K: int
    r: int
    M: int
    p: float = 0.0
    bias: bool = True
    train: bool = True          # backward too (dX, dA, dB)
    need_dX: bool = True        # False: the first LoRA layer (x needs no gradient)
    in_loop: bool | None = None  # None: the launchers' cost model; True/False: forced (tests)

    def __str__(self):
        return (f"N={self.N} K={self.K} r={self.r} M={self.M} p={self.p} bias={self.bias} "
                f"train={self.train} dX={self.need_dX} in_loop={self.in_loop}")


def cover(full: bool) -> list[Launch]:
    """Launches whose compiled units cover, in one dtype, every kernel x autotune config (the
    autotuner expands all of them at every launch). full: also the heaviest flags each kernel
    reaches -- the largest rank in and out of the loops, dropout -- and the ESM-2 cases: widths
    320 ... 5120 and 4d, ranks 8 ... 128, token counts that are and are not multiples of 16,
    dropout on and off, with and without bias, the first LoRA layer (no dX), both S strategies; and
    ESM C's bias-free widths (960, 1152, 2560; SwiGLU 2560 ... 6912)."""
    d = WIDTHS
    every_config = [Launch(d["3B"], d["3B"], 16, 4096)]             # S and dS separate, no dropout
    if not full:
        return every_config
    return every_config + [
        Launch(d["8M"], d["8M"], 32, 4096),                         # in the loops at the largest rank
        Launch(4 * d["650M"], d["650M"], 64, 1000, p=DROPOUT_P),    # fc1, dropout, M not /16
        Launch(d["15B"], 4 * d["15B"], 128, 4096, p=DROPOUT_P),     # fc2 15B, the largest rank
        Launch(d["35M"], d["35M"], 8, 1000, bias=False),            # 480 = 15·32, rank 8, no bias
        Launch(d["3B"], 4 * d["3B"], 16, 4096, p=DROPOUT_P, need_dX=False),  # the first layer
        # ESM C (bias-free): 600M q/k/v/o (1152 = 9·128), 6B gate/up (6912 = 54·128), 300M down (K = 2560)
        Launch(ESMC_WIDTHS["600M"], ESMC_WIDTHS["600M"], 16, 4096, bias=False),
        Launch(6912, ESMC_WIDTHS["6B"], 16, 4096, p=DROPOUT_P, bias=False),
        Launch(ESMC_WIDTHS["300M"], 2560, 16, 1000, bias=False),
    ]


def run_launch(fwd, bwd, launch: Launch, dtype: str) -> None:
    import torch
    dt = getattr(torch, DTYPES[dtype])
    meta = lambda *shape: torch.empty(*shape, dtype=dt, device="meta")
    M, N, K, r = launch.M, launch.N, launch.K, launch.r
    x, W, A, B = meta(M, K), meta(N, K), meta(r, K), meta(N, r)
    b = meta(N) if launch.bias else None
    seed = 1234 if launch.p > 0 else 0
    forced = {} if launch.in_loop is None else {"in_loop": launch.in_loop}
    y, S = fwd.lora_forward(x, W, b, A, B, 2.0, launch.p, seed, need_S=launch.train, **forced)
    if launch.train:
        bwd.lora_backward(meta(M, N), x, W, A, B, S, 2.0, launch.p, seed, launch.need_dX, True, True, **forced)


# ----------------------------------------------------------------------------- a driver without a GPU

class TargetOnlyDriver:
    """What triton asks of its driver before a launch, answered for a GPU that is not here."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch  # a device id per architecture: separate compile caches

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):
        def bench(kernel_call, quantiles=None, **_):
            kernel_call()  # compiles this config; every config "takes" the same time
            return [1.0] * len(quantiles or (0.5,))
        return bench


class Recorder:
    """Stands in for JITFunction.run: compile (warmup=True, the real path up to the launch), keep
    the ptxas log of each new unit, evaluate the grid as the launch would."""

    def __init__(self, arch: int):
        self.arch = arch
        self.units = {}       # kernel hash -> unit dict
        self.failures = []    # one line per launch that failed to bind, compile or fit the grid
        self.launch = None    # the Launch being run

    def run(self, original, fn, args, grid, kwargs):
        log, t0 = io.StringIO(), time.time()
        try:
            with contextlib.redirect_stdout(log):
                kernel = original(fn, *args, grid=grid, warmup=True, **kwargs)
        except Exception as e:  # what fn[grid](...) raises on a GPU before it launches
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.failures.append(f"{fn.__name__} [{self.launch}]: {type(e).__name__}: {first}")
            raise
        meta = {**dict(zip(fn.arg_names, args)), **kwargs}
        g = tuple(int(v) for v in (grid(meta) if callable(grid) else grid))
        g = g + (1,) * (3 - len(g))
        if any(not 0 < v <= lim for v, lim in zip(g, GRID_LIMIT)):
            self.failures.append(f"{fn.__name__} [{self.launch}]: grid {g} outside CUDA's limits")
        if kernel.hash not in self.units:
            unit = describe(fn, kernel, self.arch, kwargs, log.getvalue(), str(self.launch))
            self.units[kernel.hash] = {**unit, "seconds": round(time.time() - t0, 2)}
        return kernel


@contextlib.contextmanager
def targeting(arch: int, rec: Recorder):
    """Launches compile for `arch` and are recorded instead of run."""
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction
    original, active = JITFunction.run, driver._active

    def run(self, *args, grid, warmup, **kwargs):
        return rec.run(original, self, args, grid, kwargs)

    driver.set_active(TargetOnlyDriver(arch))
    JITFunction.run = run
    knobs.nvidia.dump_ptxas_log = True
    try:
        yield
    finally:
        JITFunction.run = original
        driver._active = active  # (reset_active() would look for a GPU)


def describe(fn, kernel, arch: int, kwargs, ptxas_log: str, launch: str) -> dict:
    """The facts a unit is judged on (plain data: it crosses a process boundary)."""
    regs = re.search(r"Used (\d+) registers", ptxas_log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    ttgir = kernel.asm["ttgir"]
    return {
        "kernel": fn.__name__, "arch": arch, "launch": launch,
        "dtype": kernel.src.signature[fn.arg_names[0]].lstrip("*"),
        "flags": {k: v for k, v in kwargs.items() if k.isupper() and k not in TILE_NAMES},
        "config": config_label(kwargs, kernel.metadata.num_warps, kernel.metadata.num_stages),
        "shared": kernel.metadata.shared, "num_warps": kernel.metadata.num_warps,
        "registers": int(regs.group(1)) if regs else None,
        "stack": int(spill.group(1)) if spill else None,
        "spilled": int(spill.group(2)) + int(spill.group(3)) if spill else None,
        "wgmma": "ttng.warp_group_dot" in ttgir,
        "has_log": bool(regs and spill),
    }


def config_label(tiles: dict, num_warps: int, num_stages: int) -> str:
    return " ".join(f"{k}{tiles[k]}" for k in TILE_NAMES if k in tiles) + f" w{num_warps} s{num_stages}"


def compile_cover(arch: int, dtypes=("bf16", "fp16", "fp32"), full_dtypes=("bf16", "fp32"), cache_dir=None,
                  launches=None) -> dict:
    """Run in a fresh process (TRITON_INTERPRET unset): compile every unit the cover reaches for
    `arch`. full_dtypes get the full list of launches, the other dtypes one launch that reaches
    every config (launches: a list of Launch to run instead, in every dtype)."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's default on a GPU, said explicitly
    if cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
    from esm2lite.kernels import lora_bwd as bwd
    from esm2lite.kernels import lora_fwd as fwd
    rec = Recorder(arch)
    with targeting(arch, rec):
        configs = {name: {dt: [config_label(c.kwargs, c.num_warps, c.num_stages) for c in plain_configs(at, dt)]
                          for dt in dtypes}
                   for name, at in autotuned(fwd, bwd).items()}
        bwd._target_programs = lambda device: 4 * SM_COUNT[arch]
        for dtype in dtypes:
            for launch in launches or cover(full=dtype in full_dtypes):
                rec.launch = f"{launch} {dtype}"
                with contextlib.suppress(Exception):  # recorded by Recorder.run
                    run_launch(fwd, bwd, launch, dtype)
        rec.launch = "dropout_mask"
        with contextlib.suppress(Exception):
            fwd.dropout_mask(1234, 4000, 1280, DROPOUT_P, "meta")
    return {"units": list(rec.units.values()), "failures": rec.failures, "configs": configs}


def plain_configs(at, dtype: str) -> list:
    """The configs an autotuner keeps for a `dtype` launch at rank 16 without dropout on the current
    target: every config a launch of the model can use in that dtype (the others are pruned on this
    architecture, or serve the other dot kind)."""
    import torch
    prune = at.early_config_prune
    first = torch.empty(0, dtype=getattr(torch, DTYPES[dtype]), device="meta")  # the kernels' first argument
    return prune(at.configs, {"first": first}, R=16, DROPOUT=False) if prune else at.configs


def autotuned(*modules) -> dict:
    """kernel name -> its triton Autotuner, for every autotuned kernel of the modules."""
    from triton.runtime.autotuner import Autotuner
    return {v.base_fn.__name__: v for m in modules for v in vars(m).values() if isinstance(v, Autotuner)}
