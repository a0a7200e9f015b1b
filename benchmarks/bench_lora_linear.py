"""Benchmark the fused LoRA linear on ESM-2 layer shapes.

For each rank r, d (ESM-2 width), layer shape (qkvo: K=N=d, fc1: K=d N=4d, fc2: K=4d N=d) and
token count M, time forward and forward+backward (grads for x, A, B; W, b frozen) of
  (a) kernels.lora_linear, backend="triton"
  (b) peft-style unfused LoRA: F.linear(x, W, b) + B(A(dropout(x))) * scale, separate ops
  (c) the frozen base linear alone: F.linear, and its dX backward
and report a/c (cost of LoRA over the base; ideal ≈ 1 + the FLOP fraction in docs/kernels.md)
and b/a (speed-up over peft). Medians from triton.testing.do_bench. Rows at the widths of
--overhead-dims (d = 320 on a GPU) are labelled "launch overhead": there the base linear is one
cuBLAS call of a few microseconds and the ratios measure launches, not the kernels' arithmetic.

On a GPU every kernel the sweep launches is first compiled in parallel worker processes
(--compile-workers, benchmarks/warm.py), so compilation stays out of the timed process. The JSON
is rewritten after every row, so a run stopped early keeps what it measured.

Without CUDA it runs a quick CPU comparison of (b) and (c) only (fp32, small token counts,
time.perf_counter medians). Results go to benchmarks/results/ as JSON either way.

    python benchmarks/bench_lora_linear.py                      # GPU: d = 1280/2560/5120, r = 16/8/64, 16384 tokens, bf16
    python benchmarks/bench_lora_linear.py --dims 1280 --ranks 16 --tokens 16384
    python benchmarks/bench_lora_linear.py                      # no GPU: CPU (b) vs (c)
"""

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # after PYTHONPATH: see gpu_check.py

from benchmarks.common import OneLineParser  # noqa: E402
from esm2lite.files.atomic import write_json  # noqa: E402

LAYERS = {  # name -> (K, N) as multiples of d
    "qkvo": (1, 1),
    "fc1": (1, 4),
    "fc2": (4, 1),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CONTENDERS = {
    "lora": "(a) kernels.lora_linear, backend=triton",
    "peft": "(b) F.linear(x, W, b) + F.linear(F.linear(dropout(x), A), B) * scale",
    "base": "(c) F.linear(x, W, b); backward: dX only",
}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    ap = OneLineParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[1280, 2560, 5120] if cuda else [320],
                    help="ESM-2 widths d (default on a GPU: 650M, 3B, 15B)")
    ap.add_argument("--overhead-dims", type=int, nargs="*", default=[320] if cuda else [],
                    help="widths measured once (first rank only) and labelled 'launch overhead' (default on a GPU: 320)")
    ap.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS))
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 8, 64], help="LoRA ranks, in the order measured")
    ap.add_argument("--tokens", type=int, nargs="+",
                    default=[16384] if cuda else [256, 1024])
    ap.add_argument("--compile-workers", type=int, default=min(16, os.cpu_count() or 1) if cuda else 0,
                    help="processes compiling the kernels before the sweep (GPU; 0: compile while timing)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16" if cuda else "fp32",
                    help="compute dtype of x, W, b, A, B (default bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout p (training mode)")
    ap.add_argument("--alpha", type=float, default=32.0, help="scale = alpha / r")
    ap.add_argument("--cpu-threads", type=int, default=1,
                    help="torch threads in CPU mode (default 1: on a busy machine intra-op thread "
                         "barriers quantise timings to the scheduler tick)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/lora_linear_<device>_<date>.json)")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- the three contenders

def fused(x, W, b, A, B, scale, p):
    from esm2lite import kernels
    return kernels.lora_linear(x, W, b, A, B, scale, dropout_p=p, training=True, backend="triton")


def peft_style(x, W, b, A, B, scale, p):
    """peft lora.Linear: base layer, then lora_B(lora_A(dropout(x))) * scaling, added."""
    result = F.linear(x, W, b)
    xd = F.dropout(x, p, training=True) if p > 0 else x
    return result + F.linear(F.linear(xd, A), B) * scale


def base(x, W, b, A, B, scale, p):
    return F.linear(x, W, b)


def step_fns(fn, x, W, b, A, B, dY, scale, p, trainable):
    """(forward, forward+backward) closures; grads via autograd.grad (no .grad accumulation)."""
    def fwd():
        with torch.no_grad():
            return fn(x, W, b, A, B, scale, p)

    def fwd_bwd():
        return torch.autograd.grad(fn(x, W, b, A, B, scale, p), trainable, dY)

    return fwd, fwd_bwd


def make(M, K, N, r, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *s, std=1.0: (torch.randn(*s, generator=g, device=device) * std).to(dtype)
    x = rand(M, K).requires_grad_()
    W, b = rand(N, K, std=K ** -0.5), rand(N)
    A = rand(r, K, std=K ** -0.5).requires_grad_()
    B = rand(N, r, std=0.01).requires_grad_()
    return x, W, b, A, B, rand(M, N)


# ----------------------------------------------------------------------------- timers

def gpu_ms(fn):
    import triton.testing
    return triton.testing.do_bench(fn, return_mode="median")


def cpu_ms(fn, reps=7):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------- sweep

def shapes(args):
    """(d, layer, r, tokens, regime) of every row, in the order measured: each rank over the widths,
    then the launch-overhead widths at the first rank."""
    rows = [(d, layer, r, M, "kernel") for r in args.ranks for d in args.dims for layer in args.layers
            for M in args.tokens]
    rows += [(d, layer, args.ranks[0], M, "launch overhead") for d in args.overhead_dims for layer in args.layers
             for M in args.tokens]
    return rows


def warm_up(args):
    """Compile the fused kernels of every row in parallel processes (GPU only)."""
    from benchmarks.warm import Launch, warm
    launches = []
    for d, layer, r, _, _ in shapes(args):
        K, N = LAYERS[layer][0] * d, LAYERS[layer][1] * d
        launches += [Launch(N, K, r, args.dtype, args.dropout, grads=()),   # forward under no_grad
                     Launch(N, K, r, args.dtype, args.dropout)]             # forward + backward
    return warm(launches, args.compile_workers, say=lambda m: print(m, flush=True))


def run_row(contenders, timer, d, layer, r, M, regime, args, device):
    dtype = DTYPES[args.dtype]
    K, N = LAYERS[layer][0] * d, LAYERS[layer][1] * d
    row = {"d": d, "layer": layer, "K": K, "N": N, "r": r, "tokens": M, "regime": regime,
           "fwd_ms": {}, "fwd_bwd_ms": {}}
    x, W, b, A, B, dY = make(M, K, N, r, dtype, device)
    scale = args.alpha / r
    for name, fn in contenders.items():
        trainable = [x] if name == "base" else [x, A, B]
        fwd, fwd_bwd = step_fns(fn, x, W, b, A, B, dY, scale, args.dropout, trainable)
        row["fwd_ms"][name] = timer(fwd)
        row["fwd_bwd_ms"][name] = timer(fwd_bwd)
    row["ratios"] = ratios(row)
    return row


def run(args, record):
    """Every row, in order; each row (or its error) goes to record(row) as soon as it is measured."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    contenders = {"lora": fused, "peft": peft_style, "base": base} if cuda else {"peft": peft_style, "base": base}
    timer = gpu_ms if cuda else cpu_ms
    for d, layer, r, M, regime in shapes(args):
        try:
            row = run_row(contenders, timer, d, layer, r, M, regime, args, device)
            print_row(row, cuda)
        except Exception as e:  # one failed shape must not lose the others
            row = {"d": d, "layer": layer, "r": r, "tokens": M, "regime": regime,
                   "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
            print(f"{d:>5} {layer:>5} r={r} tokens={M}: {row['error']}", flush=True)
        finally:
            if cuda:
                torch.cuda.empty_cache()
        record(row)


def ratios(row):
    out = {}
    for phase in ("fwd_ms", "fwd_bwd_ms"):
        t = row[phase]
        key = phase[:-3]
        if "lora" in t:
            out[f"{key}_lora_over_base"] = t["lora"] / t["base"]      # a/c
            out[f"{key}_peft_over_lora"] = t["peft"] / t["lora"]      # b/a
        out[f"{key}_peft_over_base"] = t["peft"] / t["base"]          # b/c
    return out


def print_header(cuda):
    cols = "lora   base   peft    a/c   b/a" if cuda else "base   peft    b/c"
    print(f"{'d':>5} {'layer':>5} {'K':>6} {'N':>6} {'r':>3} {'tokens':>6} | fwd ms: {cols} | fwd+bwd ms: {cols}")


def print_row(row, cuda):
    parts = []
    for phase in ("fwd_ms", "fwd_bwd_ms"):
        t, key = row[phase], phase[:-3]
        if cuda:
            parts.append(f"{t['lora']:6.3f} {t['base']:6.3f} {t['peft']:6.3f} "
                         f"{row['ratios'][key + '_lora_over_base']:5.2f} {row['ratios'][key + '_peft_over_lora']:5.2f}")
        else:
            parts.append(f"{t['base']:6.2f} {t['peft']:6.2f} {row['ratios'][key + '_peft_over_base']:5.2f}")
    print(f"{row['d']:>5} {row['layer']:>5} {row['K']:>6} {row['N']:>6} {row['r']:>3} {row['tokens']:>6} | "
          f"{parts[0]:>33} | {parts[1]:>33}", flush=True)


def headline(rows) -> str:
    """One line: the median ratios of the kernel rows at the first rank measured."""
    done = [r for r in rows if "ratios" in r and r["regime"] == "kernel"]
    if not done:
        return "no kernel rows measured"
    r0 = done[0]["r"]
    at_r = [r for r in done if r["r"] == r0]
    med = lambda key: statistics.median(r["ratios"][key] for r in at_r)
    where = f"r={r0}, {len(at_r)} shapes at d={'/'.join(str(d) for d in sorted({r['d'] for r in at_r}))}"
    if "fwd_bwd_lora_over_base" in at_r[0]["ratios"]:
        return (f"{where}: fused fwd+bwd {med('fwd_bwd_lora_over_base'):.2f}x the base linear's time (median), "
                f"{med('fwd_bwd_peft_over_lora'):.2f}x faster than the unfused path")
    return f"{where}: unfused fwd+bwd {med('fwd_bwd_peft_over_base'):.2f}x the base linear's time (median; CPU)"


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    now = datetime.datetime.now(datetime.timezone.utc)
    tag = "cpu" if not cuda else device_name.replace(" ", "-").lower()
    out = args.out or os.path.join(RESULTS, f"lora_linear_{tag}_{now:%Y%m%d}.json")
    if not cuda:
        torch.set_num_threads(args.cpu_threads)
        print("No CUDA device: CPU comparison of peft-style LoRA (b) vs the base linear (c) only.")
    t0 = time.perf_counter()
    payload = {
        "device": device_name,
        "cpu_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2),  # CPU timings on a shared machine are noisy
        "torch": torch.__version__,
        "triton": triton_version,
        "date": now.isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
        "dtype": args.dtype,
        "dropout": args.dropout,
        "alpha": args.alpha,
        "timer": "triton.testing.do_bench median" if cuda else "time.perf_counter median of 7 (1 warm-up)",
        "contenders": {name: CONTENDERS[name] for name in (CONTENDERS if cuda else ("peft", "base"))},
        "compile": warm_up(args) if cuda else [],
        "rows": [],
    }
    print_header(cuda)

    def record(row):
        payload["rows"].append(row)
        payload["seconds"] = round(time.perf_counter() - t0, 1)
        payload["headline"] = headline(payload["rows"])
        write_json(out, payload)

    run(args, record)
    print(f"{payload.get('headline', 'no rows')}\nwrote {out}")


if __name__ == "__main__":
    main()
