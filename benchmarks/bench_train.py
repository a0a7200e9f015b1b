"""Fine-tuning benchmark: one LoRA regression workload through esm2lite and through
transformers.EsmForSequenceClassification + peft, in one run.

Same random-weight ESM-2 checkpoint (transformers save_pretrained), same data (random residues,
lengths uniform in [min-len, max-len], random regression targets), same token-budget batches
(esm2lite.data.batching.make_batches, padded; transformers gets attention_mask; esm2lite-packed gets the
same sequences packed end to end, no padding), LoRA r=16, alpha=32,
dropout 0 on query, key, value, attention.output.dense, intermediate.dense, output.dense (esm2lite:
all six targets), AdamW, same number of steps. Only the step is timed: forward, MSE loss,
backward, optimizer step (+ zero_grad). After warm-up steps, the median step time is reported.

The heads differ as the libraries do (a few hundred thousand FLOPs per sequence, negligible):
esm2lite mean-pools residues into Linear-ReLU-Linear (hidden 256); transformers' classifier is
Linear-tanh-Linear on <cls> (peft trains it whole, modules_to_save).

Each implementation runs in its own fresh process (sequentially), so its peak memory is its own:
  GPU: torch.cuda.max_memory_allocated over the timed steps (tensors: weights, optimizer, activations).
  CPU: peak RSS over the timed steps (VmHWM after /proc/self/clear_refs) minus the RSS before
       them; warm-up steps have allocated the optimizer state already, so it is mostly activations.
       Coarse: freed heap pages are reused, so it depends on the allocator's history.
  Both: the bytes autograd saves for backward in one forward of the first timed batch
       (saved_tensors_hooks, parameters excluded), which does not depend on the allocator.

CPU (default without CUDA): fp32, 8M architecture. GPU: bf16 autocast, 650M architecture, and MFU =
4 * parameters * tokens/s / a bf16 matmul rate measured here (4 = 2 forward + 2 backward-to-input
FLOPs per frozen weight; LoRA and attention FLOPs are not counted). Several --arch run one after
the other; the random checkpoint is built on the benchmark's device (bf16 on a GPU), and on a GPU
the fused LoRA kernels of the architecture are compiled in parallel worker processes first
(--compile-workers, benchmarks/warm.py). The JSON is rewritten after every implementation, so a
run stopped early keeps what it measured. Data too small for --warmup + --steps batches is one
line and exit status 2, before anything is built.

    python benchmarks/bench_train.py                    # CPU: 8M fp32, 1 thread; GPU: 650M bf16
    python benchmarks/bench_train.py --arch esm2_t33_650M_UR50D esm2_t36_3B_UR50D   # on a GPU
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # after PYTHONPATH: see gpu_check.py

from benchmarks.common import OneLineParser, in_child, make_checkpoint, rss_bytes, run_info, saved_bytes, sync  # noqa: E402
from esm2lite.files.atomic import write_json  # noqa: E402
from esm2lite.model.config import ESM2Config  # noqa: E402
from esm2lite.data.batching import make_batches  # noqa: E402
from esm2lite.model.batch import Batch  # noqa: E402
from esm2lite.model.tokenizer import PAD, Tokenizer  # noqa: E402
from esm2lite import load_pretrained

IMPLS = ("esm2lite", "transformers+peft", "esm2lite-packed")  # baseline before the packed variant: a run cut short keeps the ratio
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no load reports in the output
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HF_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = OneLineParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["esm2_t33_650M_UR50D" if cuda else "esm2_t6_8M_UR50D"],
                   help="ESM-2 architectures (random weights), measured in turn; default 650M on GPU, 8M on CPU")
    p.add_argument("--num-seqs", type=int, help="size of the data pool batches are cut from "
                   "(default: enough for --warmup + --steps batches)")
    p.add_argument("--min-len", type=int, default=50)
    p.add_argument("--max-len", type=int, default=600)
    p.add_argument("--batch-tokens", type=int, default=16384 if cuda else 2048, help="tokens per batch, padding included")
    p.add_argument("--warmup", type=int, default=3 if cuda else 2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=20 if cuda else 5, help="timed steps (median reported)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16" if cuda else "fp32",
                   help="bf16: autocast (esm2lite stores the frozen weights in bf16, as train.py does; transformers "
                        "keeps them fp32); default bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1: stable timings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile-workers", type=int, default=min(16, os.cpu_count() or 1) if cuda else 0,
                   help="processes compiling the LoRA kernels before the timed runs (GPU; 0: compile in the run)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/train_<device>.json)")
    args = p.parse_args(argv)
    for name in ("warmup", "steps", "batch_tokens", "min_len", "max_len", "rank"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'warmup' else 'positive'}")
    if args.min_len > args.max_len:
        p.error(f"--min-len {args.min_len} is above --max-len {args.max_len}")
    if args.max_len + 2 > args.batch_tokens:
        p.error(f"--batch-tokens {args.batch_tokens} cannot hold a sequence of --max-len {args.max_len} (+2 tokens)")
    if args.num_seqs is None:  # batches hold about batch_tokens / (mean length + 2) sequences
        per_batch = max(1, args.batch_tokens // (args.max_len + 2))
        args.num_seqs = per_batch * (args.warmup + args.steps) * 2
    return args


# ---------------------------------------------------------------- data and models


def make_data(args) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """warmup + steps batches: (tokens [B, T] padded, targets [B, 1])."""
    g = torch.Generator().manual_seed(args.seed)
    letters = "LAGVSERTIDPKQNFYMHWC"
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.num_seqs,), generator=g).tolist()
    seqs = ["".join(letters[i] for i in torch.randint(0, 20, (n,), generator=g).tolist()) for n in lengths]
    targets = torch.randn(args.num_seqs, 1, generator=g)
    order = make_batches([n + 2 for n in lengths], args.batch_tokens, shuffle=True, seed=args.seed)
    need = args.warmup + args.steps
    if len(order) < need:
        raise DataTooSmall(f"--num-seqs {args.num_seqs} gives {len(order)} batches of {args.batch_tokens} tokens, "
                           f"fewer than --warmup + --steps = {need}: raise --num-seqs (or leave it out)")
    tok = Tokenizer()
    return [(tok.batch_encode([seqs[i] for i in idx]), targets[idx]) for idx in order[:need]]


class DataTooSmall(ValueError):
    pass


def tokens_of(batch) -> torch.Tensor:
    return batch.tokens if isinstance(batch, Batch) else batch


def build_esm2lite(model_dir, args, device):
    """-> (step inputs -> loss function, trainable parameters, all parameters)."""
    from esm2lite.tasks import TASKS
    from esm2lite.checkpoints.modes import MODE
    from esm2lite.model.lora import LoRAConfig, apply_lora

    encoder = load_pretrained(model_dir, device=device)
    apply_lora(encoder, LoRAConfig(rank=args.rank, alpha=args.alpha, dropout=0.0,
                                   targets=("query", "key", "value", "out", "fc1", "fc2")))
    if args.precision == "bf16":  # as train.py in one process: the frozen linears stored in bf16
        MODE["lora"].store_frozen(encoder, torch.bfloat16)
    task = TASKS["regression"]
    head = task.head(encoder.config.d_model, 1, 256, 0.0).to(device)
    encoder.train(), head.train()

    def loss_fn(tokens, target):
        hidden = encoder(tokens, logits=False)["last_hidden_state"]
        return task.loss(head(hidden, tokens), target)

    params = [p for m in (encoder, head) for p in m.parameters()]
    return loss_fn, params


def build_transformers(model_dir, args, device):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import EsmForSequenceClassification

    base = EsmForSequenceClassification.from_pretrained(model_dir, num_labels=1, problem_type="regression",
                                                        attn_implementation="sdpa", dtype=torch.float32)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                        target_modules=HF_TARGETS)
    model = get_peft_model(base, config).to(device)
    model.train()
    adapted = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    assert len(adapted) == 6 * base.config.num_hidden_layers, len(adapted)

    def loss_fn(tokens, target):
        return model(input_ids=tokens, attention_mask=tokens.ne(PAD), labels=target).loss

    return loss_fn, list(model.parameters())


# ---------------------------------------------------------------- one implementation, in its own process


def run_impl(impl, model_dir, args, queue) -> None:
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    build = build_esm2lite if impl.startswith("esm2lite") else build_transformers
    loss_fn, params = build(model_dir, args, device)
    trainable = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    amp = torch.bfloat16 if args.precision == "bf16" else None
    data = [((Batch(t).pack() if impl == "esm2lite-packed" else t).to(device), y.to(device)) for t, y in make_data(args)]

    def step(tokens, target) -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = loss_fn(tokens, target)
        loss.float().backward()
        optimizer.step()
        return float(loss.detach())

    losses, times = [], []
    for tokens, target in data[: args.warmup]:
        losses.append(step(tokens, target))
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        saved = saved_bytes(lambda: loss_fn(*data[args.warmup]), params)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    rss_before = rss_bytes("VmRSS") if device.type == "cpu" else None
    for tokens, target in data[args.warmup:]:
        sync(device)
        start = time.perf_counter()
        losses.append(step(tokens, target))  # float(loss) synchronises too
        sync(device)
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else rss_bytes("VmHWM") - rss_before if rss_before is not None else None)
    timed = data[args.warmup:]
    queue.put({
        "step_s": times, "step_s_median": statistics.median(times),
        "tokens_per_step": sum(int(tokens_of(t).ne(PAD).sum()) for t, _ in timed) / len(timed),
        "padded_tokens_per_step": sum(tokens_of(t).numel() for t, _ in timed) / len(timed),
        "peak_memory_bytes": peak, "saved_activation_bytes_first_timed_batch": saved, "losses": losses,
        "parameters": sum(p.numel() for p in params), "trainable_parameters": sum(p.numel() for p in trainable),
    })


def run_in_child(impl, model_dir, args) -> dict:
    """run_impl in a fresh process (its peak memory is its own); an error as soon as it dies."""
    return in_child(impl, run_impl, impl, model_dir, args)


def bf16_matmul_flops(device, n: int = 8192, reps: int = 20) -> float:
    """Measured bf16 matmul rate (FLOP/s) of an n x n x n torch.matmul."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


# ---------------------------------------------------------------- the run


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    try:
        make_data(args)  # refuses a pool too small for the steps now, not in a child minutes later
    except DataTooSmall as e:
        print(f"bench_train: error: {e}", file=sys.stderr)
        return 2
    print(f"{', '.join(args.arch)}: LoRA r={args.rank} alpha={args.alpha:g}, {args.precision} on {device}, "
          f"{args.batch_tokens} tokens/batch, {args.warmup} warm-up + {args.steps} timed steps"
          + (f", {args.threads} thread(s)" if device.type == "cpu" else ""), flush=True)
    doc = start_doc(args, device)
    if device.type == "cuda":
        doc["bf16_matmul_flops"] = bf16_matmul_flops(device)
        doc["compile"] = warm_up(args)
    for arch in args.arch:
        doc["results"][arch] = results = {}
        with tempfile.TemporaryDirectory() as model_dir:
            make_checkpoint(arch, model_dir, args.seed, device=device,
                            dtype=torch.bfloat16 if device.type == "cuda" else None)
            for impl in IMPLS:
                try:
                    results[impl] = r = run_in_child(impl, model_dir, args_for(args, arch))
                    r["tokens_per_s"] = r["tokens_per_step"] / r["step_s_median"]
                    print(f"{arch} {impl}: median step {r['step_s_median']:.3f}s, {r['tokens_per_s']:.0f} tokens/s",
                          flush=True)
                except Exception as e:  # recorded; the other implementation and architectures still run
                    results[impl] = {"error": f"{type(e).__name__}: {e}"}
                    print(f"{arch} {impl}: {results[impl]['error']}", flush=True)
                compare(arch, results, doc.get("bf16_matmul_flops"))
                doc["headline"] = headline(doc["results"])
                write_json(doc["out"], doc)
        print_table(arch, results)
    print(f"\n{doc['headline']}\nwrote {doc['out']}")
    return 0


def args_for(args, arch):
    """The settings one implementation's process runs with: one architecture."""
    return argparse.Namespace(**{**vars(args), "arch": arch})


def warm_up(args):
    """Compile the fused LoRA kernels of every architecture's six adapted linears, in parallel processes."""
    from benchmarks.warm import model_launches, warm
    dtype = "bf16" if args.precision == "bf16" else "fp32"
    launches = []
    for arch in args.arch:
        config = ESM2Config.from_name(arch)
        launches += model_launches(config.d_model, config.ffn_dim, args.rank, dtype)
    return warm(launches, args.compile_workers, say=lambda m: print(m, flush=True))


def compare(arch, results, matmul) -> None:
    """Ratios against transformers + peft (when both ran) and MFU, in place."""
    ref = results.get("transformers+peft", {})
    for r in results.values():
        if "tokens_per_s" not in r:
            continue
        if "tokens_per_s" in ref:
            r["speedup_vs_transformers"] = r["tokens_per_s"] / ref["tokens_per_s"]
            if r["peak_memory_bytes"] and ref["peak_memory_bytes"]:
                r["peak_memory_ratio_vs_transformers"] = r["peak_memory_bytes"] / ref["peak_memory_bytes"]
        if matmul:  # encoder weights only: the (tiny) heads and LoRA factors are left out
            r["mfu"] = 4 * ESM2Config.from_name(arch).num_parameters() * r["tokens_per_s"] / matmul


def headline(all_results) -> str:
    parts = []
    for arch, results in all_results.items():
        size = arch.split("_")[2]
        r = results.get("esm2lite", {})
        if "speedup_vs_transformers" in r:
            mem = (f", {r['peak_memory_ratio_vs_transformers']:.2f}x peak memory"
                   if "peak_memory_ratio_vs_transformers" in r else "")
            mfu = f", MFU {100 * r['mfu']:.0f}%" if "mfu" in r else ""
            parts.append(f"{size}: {r['speedup_vs_transformers']:.2f}x tokens/s of transformers+peft{mem}{mfu}")
        else:
            failed = [impl for impl, x in results.items() if "error" in x]
            parts.append(f"{size}: " + (f"{', '.join(failed)} failed" if failed else "incomplete"))
    return "; ".join(parts) or "nothing measured"


def print_table(arch, results) -> None:
    print(f"\n{arch}\n{'implementation':<18} {'step s':>8} {'tokens/s':>9} {'vs HF':>7} {'peak MiB':>9} {'mem vs HF':>9} "
          f"{'saved MiB':>9} {'MFU':>6}")
    for impl, r in results.items():
        if "error" in r:
            print(f"{impl:<18} {r['error']}")
            continue
        mib = f"{r['peak_memory_bytes'] / 2**20:.0f}" if r["peak_memory_bytes"] is not None else "n/a"
        mem = f"{r['peak_memory_ratio_vs_transformers']:.2f}x" if "peak_memory_ratio_vs_transformers" in r else "n/a"
        vs = f"{r['speedup_vs_transformers']:.2f}x" if "speedup_vs_transformers" in r else "n/a"
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
        print(f"{impl:<18} {r['step_s_median']:>8.3f} {r['tokens_per_s']:>9.0f} {vs:>7} "
              f"{mib:>9} {mem:>9} {r['saved_activation_bytes_first_timed_batch'] / 2**20:>9.0f} {mfu:>6}")


def start_doc(args, device) -> dict:
    import peft
    import transformers

    return {
        "benchmark": "LoRA fine-tuning step (regression): esm2lite vs transformers EsmForSequenceClassification + peft",
        **run_info(device, transformers=transformers.__version__, peft=peft.__version__),
        "out": args.out or os.path.join(RESULTS, f"train_{device.type}.json"),
        "settings": {**vars(args), "lora_dropout": 0.0, "hf_target_modules": HF_TARGETS, "optimizer": "AdamW",
                     "cpu_count": os.cpu_count()},
        "tokens_counted": "non-pad tokens (residues + <cls> + <eos>) of the timed batches",
        "memory_method": ("torch.cuda.max_memory_allocated over the timed steps" if device.type == "cuda"
                          else "peak RSS (VmHWM after /proc/self/clear_refs) over the timed steps minus RSS before "
                               "them, one fresh process per implementation"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "note": ("timings on a shared 2-core machine (other jobs running)" if device.type == "cpu" else ""),
        "bf16_matmul_flops": None, "compile": [], "results": {}, "headline": "nothing measured yet",
    }


if __name__ == "__main__":
    sys.exit(main())
