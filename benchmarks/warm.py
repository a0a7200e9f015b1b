"""Compile, before a benchmark times anything, the fused LoRA kernels it will launch: in parallel
worker processes that share one Triton cache, so the timed process finds every binary compiled.

Which binaries a launch needs depends on its compute dtype, its rank, which S / dS strategy the
launchers pick (tiles.rank_in_loop), bias, dropout, which gradients are needed, and the widths'
divisibility by 16 -- not on the token count (the kernels do not specialise it). Launches are
grouped by that class and one launch per class runs, on a few rows, in a worker: there the
autotuner compiles every config of its list. A worker that fails reports its error; the
benchmark then compiles (or fails) in its own process as it would have without the warm-up.
"""

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Launch:
    """One call of kernels.lora_linear: y = x W^T + b + s · dropout(x) A^T B^T, W: [N, K], rank r;
    grads: the inputs that need a gradient (() for inference: forward only)."""
    N: int
    K: int
    r: int
    dtype: str = "bf16"
    p: float = 0.0
    bias: bool = True
    grads: tuple = ("x", "A", "B")


def compile_class(launch: Launch) -> tuple:
    """What decides the binaries a launch compiles (see the module docstring)."""
    from esm2lite.kernels.tiles import dot_kind, r_pad, rank_in_loop
    kind = dot_kind(launch.dtype)
    return (launch.dtype, launch.r, r_pad(launch.r), launch.N % 16, launch.K % 16, launch.bias, launch.p > 0,
            launch.grads, rank_in_loop(launch.r, launch.N, launch.K, launch.p, kind),
            rank_in_loop(launch.r, launch.K, launch.N, launch.p, kind))


def distinct(launches) -> list[Launch]:
    """One launch per compile class, first seen first."""
    seen = {}
    for launch in launches:
        seen.setdefault(compile_class(launch), launch)
    return list(seen.values())


def run_launch(launch: Launch, rows: int = 64) -> float:
    """Forward (and backward) of one launch on random CUDA tensors; seconds, compiles included."""
    import torch

    from esm2lite import kernels
    start = time.perf_counter()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[launch.dtype]
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *shape, std=1.0: (torch.randn(*shape, generator=g, device="cuda") * std).to(dtype)
    x = rand(rows, launch.K).requires_grad_("x" in launch.grads)
    W, b = rand(launch.N, launch.K, std=launch.K ** -0.5), rand(launch.N) if launch.bias else None
    A = rand(launch.r, launch.K, std=launch.K ** -0.5).requires_grad_("A" in launch.grads)
    B = rand(launch.N, launch.r).requires_grad_("B" in launch.grads)
    with torch.set_grad_enabled(bool(launch.grads)):
        y = kernels.lora_linear(x, W, b, A, B, 2.0, dropout_p=launch.p, training=launch.p > 0, backend="triton")
        if launch.grads:
            y.backward(torch.randn_like(y))
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _job(launch: Launch) -> dict:
    try:
        return {"launch": vars(launch), "seconds": round(run_launch(launch), 2)}
    except Exception as e:  # reported, not raised: the benchmark itself still runs
        return {"launch": vars(launch), "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}


def warm(launches, workers: int, say=print) -> list[dict]:
    """Run one launch per compile class in `workers` spawned processes (CUDA); one dict per launch
    run: {"launch", "seconds"} or {"launch", "error"}."""
    jobs = distinct(launches)
    if not jobs or workers < 1:
        return []
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
        done = list(pool.map(_job, jobs))
    failed = [d for d in done if "error" in d]
    say(f"warm-up: {len(jobs)} kernel launch classes compiled in {time.perf_counter() - start:.1f} s "
        f"by {min(workers, len(jobs))} processes" + (f"; {len(failed)} failed: {failed[0]['error']}" if failed else ""))
    return done


def model_launches(d_model: int, ffn_dim: int, r: int, dtype: str, p: float = 0.0) -> list[Launch]:
    """The LoRA linears of an ESM-2 block with adapters on q, k, v, out, fc1, fc2, training: every
    input needs its gradient, except in the first block's q, k, v (their input, the embedding's
    LayerNorm, is frozen)."""
    d, f = d_model, ffn_dim
    shapes = [(d, d), (f, d), (d, f)]  # (N, K): q/k/v/out, fc1, fc2
    return ([Launch(N, K, r, dtype, p) for N, K in shapes]
            + [Launch(d, d, r, dtype, p, grads=("A", "B"))])
