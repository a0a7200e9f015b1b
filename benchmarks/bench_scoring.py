"""Zero-shot scoring benchmark: a deep mutational scan (every one of the 19 substitutions at every
position of a random wild type: 300 residues -> 5,700 single mutants) scored by masked marginals.

The same random-weight ESM-2 architecture (8M by default) is built with transformers, saved with
save_pretrained and loaded by both libraries (transformers.EsmForMaskedLM, sdpa attention).

    esm2lite                     score_mutants(..., "masked-marginal"): one row per distinct mutated
                                 position (300), in token-budget batches
    transformers-per-variant     the plain loop: for each variant, mask its position in the wild
                                 type, one forward (batch 1), log p(mt) - log p(wt)
    transformers-per-position    fair-esm's predict.py recipe: every token masked in turn (L + 2
                                 forwards of batch 1), then each variant read from that table

The per-variant loop costs the same for every variant, so it is timed on an evenly spread subset
(--baseline-variants, default 300: one per position) and its sequences/s gives the full scan's
time; the other two are timed on the whole scan. Repeats are interleaved (load drift hits all
alike); medians are reported, with ratios against the per-variant loop from the same run. Scores
are checked against each other (max |difference| in the JSON). pll is counted, not timed by
default (its forwards come from esm2lite.inference.scoring.plan_mutants; --pll-variants N times N variants).

On a 2-core CPU with 1 thread the default run takes about 10 minutes.

    python benchmarks/bench_scoring.py                  # CPU: fp32, 1 thread; GPU if present: bf16
    python benchmarks/bench_scoring.py --length 100 --repeats 1 --baseline-variants 50   # quick look
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import make_checkpoint, run_info, sync  # noqa: E402
from esm2lite.files.atomic import write_json  # noqa: E402
from esm2lite.inference.scoring import plan_mutants, score_mutants  # noqa: E402
from esm2lite.model.tokenizer import MASK, TOKENS, Tokenizer  # noqa: E402
from esm2lite import load_pretrained

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
AA = "ACDEFGHIKLMNPQRSTVWY"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("esm2lite", "transformers-per-position", "transformers-per-variant")


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="esm2_t6_8M_UR50D", help="ESM-2 architecture name (random weights)")
    p.add_argument("--length", type=int, default=300, help="wild-type residues")
    p.add_argument("--batch-tokens", type=int, default=8192, help="esm2lite tokens per batch, padding included")
    p.add_argument("--baseline-variants", type=int, default=300, help="variants the per-variant loop is timed on")
    p.add_argument("--pll-variants", type=int, default=0, help="variants to time pll on (0 = count only)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per implementation (median reported)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16" if cuda else "fp32")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1: stable timings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default benchmarks/results/scoring_<device>.json)")
    return p.parse_args(argv)


def deep_mutational_scan(length, seed) -> tuple[str, list[str]]:
    g = torch.Generator().manual_seed(seed)
    wt = "".join(AA[i] for i in torch.randint(0, 20, (length,), generator=g).tolist())
    return wt, [f"{a}{i + 1}{b}" for i, a in enumerate(wt) for b in AA if b != a]


# ---------------------------------------------------------------- the two transformers loops


def single(code) -> tuple[int, int, int]:
    """'A24G' -> (token index, wt id, mt id); <cls> is token 0."""
    return int(code[1:-1]), TOKENS.index(code[0]), TOKENS.index(code[-1])


@torch.inference_mode()
def per_variant(model, wt_tokens, mutants, device) -> list[float]:
    scores = []
    for code in mutants:
        i, wt, mt = single(code)
        tokens = wt_tokens.clone()
        tokens[0, i] = MASK
        logp = model(input_ids=tokens.to(device)).logits[0, i].float().log_softmax(-1)
        scores.append(float(logp[mt] - logp[wt]))
    return scores


@torch.inference_mode()
def per_position(model, wt_tokens, mutants, device) -> list[float]:
    rows = []
    for i in range(wt_tokens.shape[1]):
        tokens = wt_tokens.clone()
        tokens[0, i] = MASK
        rows.append(model(input_ids=tokens.to(device)).logits[0, i].float().log_softmax(-1).cpu())
    table = torch.stack(rows)  # [T, 33]
    return [float(table[i, mt] - table[i, wt]) for i, wt, mt in map(single, mutants)]


# ---------------------------------------------------------------- the run


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def load_models(model_dir, dtype, device):
    from transformers import EsmForMaskedLM


    ours = load_pretrained(model_dir, dtype=dtype, device=device).eval()
    theirs = EsmForMaskedLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=dtype).to(device).eval()
    return ours, theirs


def main(argv=None):
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    precision = "fp32" if args.dtype == "fp32" else "bf16"
    wt, scan = deep_mutational_scan(args.length, args.seed)
    subset = scan[:: max(1, len(scan) // args.baseline_variants)][: args.baseline_variants]
    wt_tokens = Tokenizer().batch_encode([wt])  # [1, L + 2]
    print(f"{len(scan)} single mutants of a {args.length}-residue wild type; {args.arch} {args.dtype} on {device}"
          + (f", {args.threads} thread(s)" if device.type == "cpu" else ""))
    with tempfile.TemporaryDirectory() as model_dir:
        make_checkpoint(args.arch, model_dir, args.seed)
        ours, theirs = load_models(model_dir, dtype, device)

    runs = {
        "esm2lite": lambda: score_mutants(ours, wt, scan, batch_tokens=args.batch_tokens, precision=precision),
        "transformers-per-position": lambda: per_position(theirs, wt_tokens, scan, device),
        "transformers-per-variant": lambda: per_variant(theirs, wt_tokens, subset, device),
    }
    per_variant(theirs, wt_tokens, subset[:2], device)  # warm-up
    score_mutants(ours, wt, scan[:19], batch_tokens=args.batch_tokens, precision=precision)
    times, outputs = {impl: [] for impl in IMPLS}, {}
    for r in range(args.repeats):
        for impl in IMPLS:
            t, outputs[impl] = timed(runs[impl], device)
            times[impl].append(t)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{i} {t[-1]:.1f}s" for i, t in times.items()), flush=True)

    result = outputs["esm2lite"]
    ours_scores = dict(zip(scan, result.scores))
    variants = {"esm2lite": len(scan), "transformers-per-position": len(scan), "transformers-per-variant": len(subset)}
    forwards = {"esm2lite": result.forwards, "transformers-per-position": args.length + 2,
                "transformers-per-variant": len(subset)}
    results = {}
    for impl in IMPLS:
        median = statistics.median(times[impl])
        rate = variants[impl] / median
        results[impl] = {"variants_timed": variants[impl], "forwards_timed": forwards[impl], "pass_s": times[impl],
                         "pass_s_median": median, "seqs_per_s": rate, "full_scan_s": len(scan) / rate,
                         "full_scan_forwards": forwards[impl] if impl != "transformers-per-variant" else len(scan)}
    results["esm2lite"].update(batches=result.batches, tokens=result.tokens)
    base = results["transformers-per-variant"]["seqs_per_s"]
    for impl in IMPLS:
        results[impl]["speedup_vs_per_variant"] = results[impl]["seqs_per_s"] / base
    diffs = {"per_position_vs_esm2lite": max_diff(ours_scores, scan, outputs["transformers-per-position"]),
             "per_variant_vs_esm2lite": max_diff(ours_scores, subset, outputs["transformers-per-variant"])}
    pll = pll_section(args, ours, theirs, wt, wt_tokens, scan, device, precision)
    print_table(results, diffs, pll)
    write_results(args, device, wt, scan, subset, results, diffs, pll)


def max_diff(ours_scores, codes, scores) -> float:
    return max(abs(ours_scores[c] - s) for c, s in zip(codes, scores))


def pll_section(args, ours, theirs, wt, wt_tokens, scan, device, precision) -> dict:
    """pll forwards for the whole scan (planned, not run); with --pll-variants, timings on a subset."""
    out = {"esm2lite_full_scan_forwards": plan_mutants(wt, scan, "pll").forwards,
           "per_variant_full_scan_forwards": len(scan) * args.length}
    if args.pll_variants > 0:
        subset = scan[:: max(1, len(scan) // args.pll_variants)][: args.pll_variants]
        t_ours, res = timed(lambda: score_mutants(ours, wt, subset, "pll", args.batch_tokens, precision=precision), device)
        t_theirs, theirs_pll = timed(lambda: [pll_loop(theirs, apply(wt, c), device) for c in subset], device)
        out.update(variants_timed=len(subset), esm2lite_s=t_ours, esm2lite_forwards=res.forwards,
                   per_variant_s=t_theirs, per_variant_forwards=len(subset) * args.length,
                   max_abs_diff=max(abs(a - b) for a, b in zip(res.scores, theirs_pll)))
    return out


def apply(wt, code):
    i = int(code[1:-1]) - 1
    return wt[:i] + code[-1] + wt[i + 1:]


@torch.inference_mode()
def pll_loop(model, seq, device) -> float:
    """The plain pll: every residue masked in turn, one forward each (batch 1)."""
    tokens, total = Tokenizer().batch_encode([seq]), 0.0
    for i in range(1, len(seq) + 1):
        masked = tokens.clone()
        masked[0, i] = MASK
        total += float(model(input_ids=masked.to(device)).logits[0, i].float().log_softmax(-1)[tokens[0, i]])
    return total


def print_table(results, diffs, pll) -> None:
    print(f"\n{'implementation':<27} {'forwards':>9} {'seq/s':>9} {'full scan s':>12} {'vs per-variant':>15}")
    for impl, r in results.items():
        print(f"{impl:<27} {r['full_scan_forwards']:>9} {r['seqs_per_s']:>9.1f} {r['full_scan_s']:>12.1f} "
              f"{r['speedup_vs_per_variant']:>14.1f}x")
    print("max |score difference|: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    print(f"pll forwards for the whole scan: esm2lite {pll['esm2lite_full_scan_forwards']}, "
          f"per-variant loop {pll['per_variant_full_scan_forwards']}")


def write_results(args, device, wt, scan, subset, results, diffs, pll) -> None:
    import transformers

    out = args.out or os.path.join(RESULTS, f"scoring_{device.type}.json")
    doc = {
        "benchmark": "zero-shot masked-marginal scoring of a deep mutational scan: esm2lite vs transformers loops",
        **run_info(device, transformers=transformers.__version__),
        "settings": {**vars(args), "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
                     "cpu_count": os.cpu_count()},
        "data": {"wildtype_residues": len(wt), "variants": len(scan), "per_variant_subset": len(subset)},
        "notes": ("full_scan_s of transformers-per-variant = variants / its measured seqs_per_s on the subset "
                  "(every iteration is one batch-1 forward of the same length); seqs_per_s = variants scored per "
                  "second; forwards = sequence rows through the model"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "results": results,
        "max_abs_score_diff": diffs,
        "pll": pll,
    }
    write_json(out, doc)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
