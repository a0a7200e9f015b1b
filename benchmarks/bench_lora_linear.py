"""Benchmark the fused LoRA linear on ESM-2 layer shapes.

For each d (ESM-2 width), layer shape (qkvo: K=N=d, fc1: K=d N=4d, fc2: K=4d N=d), rank r and
token count M, time forward and forward+backward (grads for x, A, B; W, b frozen) of
  (a) kernels.lora_linear, backend="triton"
  (b) peft-style unfused LoRA: F.linear(x, W, b) + B(A(dropout(x))) * scale, separate ops
  (c) the frozen base linear alone: F.linear, and its dX backward
and report a/c (cost of LoRA over the base; ideal ≈ 1 + the FLOP fraction in docs/kernels.md)
and b/a (speed-up over peft). Medians from triton.testing.do_bench.

Without CUDA it runs a quick CPU comparison of (b) and (c) only (fp32, small token counts,
time.perf_counter medians). Results go to benchmarks/results/ as JSON either way.

    python benchmarks/bench_lora_linear.py                      # GPU: full sweep, bf16
    python benchmarks/bench_lora_linear.py --dims 1280 --ranks 16 --tokens 16384
    python benchmarks/bench_lora_linear.py                      # no GPU: CPU (b) vs (c)
"""

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def parse_args():
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+",
                    default=[320, 480, 640, 1280, 2560, 5120] if cuda else [320])
    ap.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS))
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    ap.add_argument("--tokens", type=int, nargs="+",
                    default=[4096, 16384, 65536] if cuda else [256, 1024])
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16" if cuda else "fp32",
                    help="compute dtype of x, W, b, A, B (default bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout p (training mode)")
    ap.add_argument("--alpha", type=float, default=32.0, help="scale = alpha / r")
    ap.add_argument("--cpu-threads", type=int, default=1,
                    help="torch threads in CPU mode (default 1: on a busy machine intra-op thread "
                         "barriers quantise timings to the scheduler tick)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/lora_linear_<device>_<date>.json)")
    return ap.parse_args()


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

def run(args):
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = DTYPES[args.dtype]
    contenders = {"lora": fused, "peft": peft_style, "base": base} if cuda else {"peft": peft_style, "base": base}
    timer = gpu_ms if cuda else cpu_ms
    rows = []
    for d in args.dims:
        for layer in args.layers:
            K, N = LAYERS[layer][0] * d, LAYERS[layer][1] * d
            for r in args.ranks:
                for M in args.tokens:
                    x, W, b, A, B, dY = make(M, K, N, r, dtype, device)
                    scale = args.alpha / r
                    row = {"d": d, "layer": layer, "K": K, "N": N, "r": r, "tokens": M,
                           "fwd_ms": {}, "fwd_bwd_ms": {}}
                    for name, fn in contenders.items():
                        trainable = [x] if name == "base" else [x, A, B]
                        fwd, fwd_bwd = step_fns(fn, x, W, b, A, B, dY, scale, args.dropout, trainable)
                        row["fwd_ms"][name] = timer(fwd)
                        row["fwd_bwd_ms"][name] = timer(fwd_bwd)
                    row["ratios"] = ratios(row)
                    print_row(row, cuda)
                    rows.append(row)
                    del x, W, b, A, B, dY
    return rows


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


def write_json(path, payload):
    """Atomically: a temp file in the same folder, then os.replace."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main():
    args = parse_args()
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
    print_header(cuda)
    t0 = time.perf_counter()
    rows = run(args)
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
        "contenders": {name: CONTENDERS[name] for name in rows[0]["fwd_ms"]} if rows else {},
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    write_json(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
