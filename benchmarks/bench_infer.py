"""Inference benchmark: esm2lite vs transformers (sdpa attention; eager too on the CPU) on one set
of sequences.

The same random-weight ESM-2 architecture (8M on the CPU, 650M on a GPU by default; several --arch
run one after the other, the JSON rewritten after each) is built with transformers, saved with
save_pretrained and loaded by both libraries: transformers.EsmModel (no pooler, no LM head) and
esm2lite.ESM2 (logits=False), so both compute the final hidden states and nothing else. The
sequences (random residues, lengths uniform in [min-len, max-len], or real ones: --sequences) are cut
into length-sorted token-budget batches (esm2lite.data.batching.make_batches), right-padded; transformers
gets attention_mask = tokens != <pad>. esm2lite-packed gets its own batches, cut by real tokens and
packed end to end (no padding), as esm2lite's inference runs them on a CPU. Every repeat times one pass over all batches per
implementation (implementations interleaved, so load drift hits all alike); medians are reported,
with ratios against transformers-sdpa from the same run.

Peak memory above what the loaded model already holds:
  GPU: torch.cuda.max_memory_allocated() - memory_allocated() before a full pass (tensors only).
  CPU: peak resident set size minus the RSS before the forward of the first batch (the longest
       sequences, where the peak is: eager attention grows with T^2 at a fixed token budget), in a
       fresh process per implementation (so freed heap pages of another implementation are not
       reused): Linux /proc/self/status VmHWM after resetting it through /proc/self/clear_refs. It
       includes allocator caching and fragmentation: a coarse number, not a tensor count.

The CPU default (16 sequences, 1 thread) takes about 1-2 minutes; transformers-eager dominates.

    python benchmarks/bench_infer.py                     # CPU: 8M fp32, 1 thread; GPU if present: 650M bf16
    python benchmarks/bench_infer.py --num-seqs 16 --repeats 2
    python benchmarks/bench_infer.py --arch esm2_t33_650M_UR50D esm2_t36_3B_UR50D --batch-tokens 16384   # GPU
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # after PYTHONPATH: see gpu_check.py

from benchmarks.common import OneLineParser, in_child, make_checkpoint, read_sequences, rss_bytes, run_info, sync  # noqa: E402
from esm2lite.files.atomic import write_json  # noqa: E402
from esm2lite.data.batching import make_batches  # noqa: E402
from esm2lite.model.batch import Batch  # noqa: E402
from esm2lite.model.tokenizer import PAD, Tokenizer  # noqa: E402
from esm2lite import load_pretrained

IMPLS = ("esm2lite", "esm2lite-packed", "transformers-eager", "transformers-sdpa")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no load reports in the output
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = OneLineParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["esm2_t33_650M_UR50D" if cuda else "esm2_t6_8M_UR50D"],
                   help="ESM-2 (or ESM C: esmc_300m ...) architecture names (random weights), measured in turn; "
                        "default 650M on GPU, 8M on CPU")
    gpu_impls = ["esm2lite", "esm2lite-packed", "transformers-sdpa"]
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS) if not cuda else gpu_impls,
                   help="implementations (transformers-sdpa, the reference, is always included; "
                        "default on a GPU: esm2lite, esm2lite-packed (varlen_attn) and transformers-sdpa)")
    p.add_argument("--num-seqs", type=int, default=64 if cuda else 16, help="sequences in the set")
    p.add_argument("--min-len", type=int, default=50, help="shortest sequence (residues)")
    p.add_argument("--max-len", type=int, default=1000, help="longest sequence (residues)")
    p.add_argument("--batch-tokens", type=int, default=8192,
                   help="tokens per batch: padding included; esm2lite-packed: real tokens (no padding)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per implementation (median reported)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16" if cuda else "fp32",
                   help="weights and compute dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads on CPU (default 1: stable timings on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--order", choices=("sorted", "random"), default="sorted",
                   help="batches of length-sorted sequences (esm2lite's), or of the sequences in random order "
                        "(a loader that does not sort: more padding)")
    p.add_argument("--sequences", help="a CSV with a `sequence` column: its first --num-seqs sequences of "
                                        "--min-len..--max-len residues instead of random ones (a real length "
                                        "distribution, e.g. examples/secondary_structure_flip_sampled.csv)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/infer_<device>.json)")
    args = p.parse_args(argv)
    for name in ("num_seqs", "min_len", "max_len", "batch_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.min_len > args.max_len:
        p.error(f"--min-len {args.min_len} is above --max-len {args.max_len}")
    if args.max_len + 2 > args.batch_tokens:
        p.error(f"--batch-tokens {args.batch_tokens} cannot hold a sequence of --max-len {args.max_len} (+2 tokens)")
    return args


# ---------------------------------------------------------------- models and data


def load_model(impl: str, model_dir: str, dtype, device):
    if impl.startswith("esm2lite"):

        return load_pretrained(model_dir, dtype=dtype, device=device).eval()
    from transformers import EsmcModel, EsmModel

    attn = impl.split("-", 1)[1]
    with open(os.path.join(model_dir, "config.json")) as f:
        esmc = json.load(f)["model_type"] == "esmc"  # an esmc_* architecture
    if esmc:
        return EsmcModel.from_pretrained(model_dir, attn_implementation=attn, dtype=dtype).to(device).eval()
    model = EsmModel.from_pretrained(model_dir, attn_implementation=attn, add_pooling_layer=False, dtype=dtype)
    return model.to(device).eval()


@torch.inference_mode()
def forward(impl: str, model, batch):
    """One batch -> final hidden states: padded tokens [B, T] -> [B, T, d]; esm2lite-packed: a packed
    Batch ([1, N], the sequences end to end, each attending to itself) -> [1, N, d], left packed."""
    if impl.startswith("esm2lite"):
        return model(batch, logits=False)["last_hidden_state"]
    return model(input_ids=batch, attention_mask=batch.ne(PAD)).last_hidden_state


def real_sequences(path, num_seqs, min_len, max_len) -> list[str]:
    """common.read_sequences, refusing a file with fewer than num_seqs such sequences."""
    seqs = read_sequences(path, num_seqs, min_len, max_len)
    if len(seqs) < num_seqs:
        raise SystemExit(f"{path}: {len(seqs)} sequences of {min_len}-{max_len} residues, fewer than --num-seqs")
    return seqs


def random_sequences(num_seqs, min_len, max_len, seed) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    letters = "LAGVSERTIDPKQNFYMHWC"
    lengths = torch.randint(min_len, max_len + 1, (num_seqs,), generator=g).tolist()
    return ["".join(letters[i] for i in torch.randint(0, 20, (n,), generator=g).tolist()) for n in lengths]


def cut(seqs, batch_tokens, order="sorted", packed=False) -> list:
    """The sequences in batches. sorted: esm2lite's length-sorted token-budget batches (make_batches),
    longest first; random: in their order, each batch filled while its cost stays within batch_tokens
    (a loader that does not sort). Cost: longest x count (padded), or the tokens themselves (packed).
    -> padded token tensors [B, T], or packed Batches [1, N]."""
    tokens = [len(s) + 2 for s in seqs]
    cost = lambda g: sum(tokens[j] for j in g) if packed else max(tokens[j] for j in g) * len(g)  # noqa: E731
    if order == "sorted":
        groups = make_batches(tokens, batch_tokens, shuffle=False, packed=packed)
    else:
        groups = [[]]
        for i in range(len(seqs)):
            if groups[-1] and cost(groups[-1] + [i]) > batch_tokens:
                groups.append([])
            groups[-1].append(i)
    tok = Tokenizer()
    if not packed:
        return [tok.batch_encode([seqs[i] for i in idx]) for idx in groups]
    return [Batch.of_rows([tok.encode(seqs[i]) for i in idx], packed=True) for idx in groups]


def run_pass(impl, model, batches, device) -> float:
    sync(device)
    start = time.perf_counter()
    for tokens in batches:
        forward(impl, model, tokens)
    sync(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------- peak memory


def cpu_peak_child(impl, model_dir, dtype, batches, threads, queue) -> None:
    """In a fresh process: peak RSS of the first (longest) batch above the RSS after loading the model."""
    torch.set_num_threads(threads)
    model = load_model(impl, model_dir, dtype, "cpu")
    forward(impl, model, batches[-1])  # lazy initialisation (kernels, dispatch) outside the pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = rss_bytes("VmRSS")
    run_pass(impl, model, batches[:1], torch.device("cpu"))
    queue.put(rss_bytes("VmHWM") - before)


def cpu_peak_memory(impl, model_dir, dtype, batches, threads) -> int | None:
    if not os.path.exists("/proc/self/clear_refs"):
        return None  # not Linux: no per-pass peak RSS
    return in_child(impl, cpu_peak_child, impl, model_dir, dtype, batches, threads)


def gpu_peak_memory(impl, model, batches, device) -> int:
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run_pass(impl, model, batches, device)
    return torch.cuda.max_memory_allocated(device) - before


# ---------------------------------------------------------------- the run


def max_abs_diff(impl, model, ref, tokens) -> float:
    """|this implementation - transformers-sdpa| on the non-pad positions of one padded batch (packed:
    the same sequences packed, then unpacked)."""
    keep = tokens.ne(PAD)
    if impl == "esm2lite-packed":
        batch = Batch(tokens).pack()
        out = batch.unpack(forward(impl, model, batch))
    else:
        out = forward(impl, model, tokens)
    return float((out.float()[keep] - ref[keep].float()).abs().max())


def main(argv=None):
    args = parse_args(argv)
    impls = [i for i in IMPLS if i in args.impls or i == "transformers-sdpa"]
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    seqs = (real_sequences(args.sequences, args.num_seqs, args.min_len, args.max_len) if args.sequences
            else random_sequences(args.num_seqs, args.min_len, args.max_len, args.seed))
    lengths = [len(s) for s in seqs]
    batches = {impl: cut(seqs, args.batch_tokens, args.order, packed=impl == "esm2lite-packed") for impl in impls}
    residues, padded = sum(lengths), sum(b.numel() for b in batches["transformers-sdpa"])
    print(f"{args.num_seqs} sequences, {residues} residues, {len(batches['transformers-sdpa'])} padded batches "
          f"({padded} tokens with padding), {args.dtype} on {device}"
          + (f", {args.threads} thread(s)" if device.type == "cpu" else ""))
    doc = start_doc(args, device, lengths, batches, residues, padded)
    for arch in args.arch:
        try:
            doc["results"][arch] = results = run_arch(arch, impls, args, device, dtype, batches, residues)
            print_table(arch, results)
        except Exception as e:  # recorded; the other architectures still run
            doc["results"][arch] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{arch}: {doc['results'][arch]['error']}", flush=True)
        doc["headline"] = headline(doc["results"])
        write_json(doc["out"], doc)
    print(f"\n{doc['headline']}\nwrote {doc['out']}")


def warm_up(models: dict, batches: dict, device, peak: dict) -> dict:
    """One forward of each implementation (lazy initialisation outside the timed passes) and, on a GPU,
    its peak memory. An implementation other than the baseline that fails is removed from `models`:
    -> {impl: its error}, so the others are still measured."""
    failed = {}
    for impl, model in list(models.items()):
        try:
            forward(impl, model, batches[impl][-1])
            if device.type == "cuda":
                peak[impl] = gpu_peak_memory(impl, model, batches[impl], device)
        except Exception as e:
            if impl == "transformers-sdpa":
                raise
            failed[impl] = f"{type(e).__name__}: {e}"[:500]
            print(f"{impl}: {failed[impl]}", flush=True)
            del models[impl]
    return failed


def run_arch(arch, impls, args, device, dtype, batches, residues) -> dict:
    """Every implementation on one architecture (batches: each implementation's own): medians, peak
    memory, differences, ratios."""
    with tempfile.TemporaryDirectory() as model_dir:
        make_checkpoint(arch, model_dir, args.seed, device=device, dtype=dtype if device.type == "cuda" else None)
        peak = {}
        if device.type == "cpu":
            for impl in impls:
                peak[impl] = cpu_peak_memory(impl, model_dir, dtype, batches[impl], args.threads)
        models = {impl: load_model(impl, model_dir, dtype, device) for impl in impls}
    batches = {impl: [b.to(device) for b in batches[impl]] for impl in impls}
    failed = warm_up(models, batches, device, peak)  # an implementation that fails is dropped, not the run
    impls = list(models)
    first = batches["transformers-sdpa"][0]  # [B, T] padded
    ref = forward("transformers-sdpa", models["transformers-sdpa"], first)
    diffs = {impl: max_abs_diff(impl, m, ref, first) for impl, m in models.items()}

    times = {impl: [] for impl in impls}
    for r in range(args.repeats):
        for impl, model in models.items():
            times[impl].append(run_pass(impl, model, batches[impl], device))
        print(f"{arch} repeat {r + 1}/{args.repeats}: " + ", ".join(f"{i} {t[-1]:.2f}s" for i, t in times.items()),
              flush=True)
    del models
    if device.type == "cuda":
        torch.cuda.empty_cache()

    results = {impl: {"error": error} for impl, error in failed.items()}
    for impl in impls:
        median = statistics.median(times[impl])
        results[impl] = {"pass_s_median": median, "pass_s": times[impl], "seqs_per_s": args.num_seqs / median,
                         "residues_per_s": residues / median, "peak_memory_bytes": peak.get(impl),
                         "max_abs_diff_vs_sdpa": diffs[impl]}
    ref_impl = results["transformers-sdpa"]
    for impl in impls:
        r = results[impl]
        r["speedup_vs_sdpa"] = r["seqs_per_s"] / ref_impl["seqs_per_s"]
        if r["peak_memory_bytes"] and ref_impl["peak_memory_bytes"]:
            r["peak_memory_ratio_vs_sdpa"] = r["peak_memory_bytes"] / ref_impl["peak_memory_bytes"]
    return results


def headline(all_results) -> str:
    parts = []
    for arch, results in all_results.items():
        size = arch.split("_")[2] if arch.startswith("esm2_") else arch  # esm2_t33_650M_UR50D -> 650M; esmc_300m
        r = results.get("esm2lite", {})
        if "speedup_vs_sdpa" in r:
            mem = f", {r['peak_memory_ratio_vs_sdpa']:.2f}x peak memory" if "peak_memory_ratio_vs_sdpa" in r else ""
            parts.append(f"{size}: {r['speedup_vs_sdpa']:.2f}x residues/s of transformers sdpa{mem}")
        else:
            parts.append(f"{size}: {results.get('error', 'incomplete')}")
    return "; ".join(parts) or "nothing measured"


def print_table(arch, results) -> None:
    print(f"\n{arch}\n{'implementation':<20} {'seq/s':>8} {'residues/s':>11} {'vs sdpa':>8} {'peak MiB':>9} "
          f"{'mem vs sdpa':>11} {'max|Δ|':>9}")
    for impl, r in results.items():
        if "error" in r:
            print(f"{impl:<20} {r['error']}")
            continue
        mib = f"{r['peak_memory_bytes'] / 2**20:.0f}" if r["peak_memory_bytes"] is not None else "n/a"
        mem = f"{r['peak_memory_ratio_vs_sdpa']:.2f}x" if "peak_memory_ratio_vs_sdpa" in r else "n/a"
        print(f"{impl:<20} {r['seqs_per_s']:>8.2f} {r['residues_per_s']:>11.0f} {r['speedup_vs_sdpa']:>7.2f}x "
              f"{mib:>9} {mem:>11} {r['max_abs_diff_vs_sdpa']:>9.1e}")


def start_doc(args, device, lengths, batches, residues, padded) -> dict:
    import transformers

    return {
        "benchmark": "inference: esm2lite vs transformers EsmModel (sdpa; eager on the CPU), final hidden states",
        **run_info(device, transformers=transformers.__version__),
        "out": args.out or os.path.join(RESULTS, f"infer_{device.type}.json"),
        "settings": {**vars(args), "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
                     "cpu_count": os.cpu_count()},
        "data": {"num_seqs": len(lengths), "residues": residues, "source": args.sequences or "random residues",
                 "lengths": lengths, "tokens_with_padding": padded,
                 "num_batches": {impl: len(b) for impl, b in batches.items()},
                 "batch_shapes": {impl: [list(x.shape) if isinstance(x, torch.Tensor) else [len(x.lengths),
                                                                                          int(x.tokens.shape[1])]
                                         for x in b] for impl, b in batches.items()}},
        "memory_method": ("torch.cuda.max_memory_allocated minus allocated before the pass" if device.type == "cuda"
                          else "peak RSS (VmHWM after /proc/self/clear_refs) minus RSS before the forward of the "
                               "first (longest) batch, one fresh process per implementation"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "note": ("timings on a shared 2-core machine (other jobs running); implementations interleaved per repeat"
                 if device.type == "cpu" else ""),
        "results": {}, "headline": "nothing measured yet",
    }


if __name__ == "__main__":
    main()
