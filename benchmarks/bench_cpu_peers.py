"""CPU benchmark against the peers: esm2lite fp32 (padded and packed batches), int8 (--precision
int8, model/int8.py) and bf16 (--precision bf16: autocast, packed), transformers sdpa fp32, and
esm-cpp fp32 and int8 (`quantize_weights()`: per-channel symmetric int8 linears), on the same real
proteins, with the same random weights.

Sequences: the first --num-seqs proteins of examples/secondary_structure_flip_sampled.csv
(FLIP, AFL-3.0) of at most --max-residues residues. Weights: a random transformers EsmForMaskedLM
of each --arch, saved once in the layout of transformers 4 (what esm-cpp reads: LayerNorm
weight/bias, one rotary inv_freq per layer, computed by the formula every implementation uses);
esm2lite, transformers and esm-cpp all load that file. Every system computes the logits of every
sequence. esm2lite and transformers get the same length-sorted token-budget batches
(esm2lite.data.batching.make_batches); esm2lite-packed gets them end to end, no padding; esm-cpp
gets the list of sequences (`forward_scheduled`: its own packed, length-bucketed batches), in its
own venv (numpy < 2; --esmcpp-python) through a small server process, so that the systems are
timed interleaved: every repeat runs each system once. Medians over --repeats, at 1 thread and at
all threads (torch.set_num_threads; esm-cpp: ESM_NUM_THREADS, one server per thread count).

Reported per system: tokens/s (<cls> and <eos> counted), the ratio to esm2lite fp32 (padded), and
the max and mean absolute logit error against transformers sdpa fp32 over every token of every
sequence, all 33 columns (from the first repeat's outputs).

    python benchmarks/bench_cpu_peers.py                         # the README's table: 34 minutes on 2 cores (measured)
    python benchmarks/bench_cpu_peers.py --num-seqs 24 --arch esm2_t6_8M_UR50D --threads 1   # a minute
"""

import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # after PYTHONPATH: see gpu_check.py

from benchmarks.common import OneLineParser, make_checkpoint, read_sequences, run_info  # noqa: E402
from esm2lite import load_pretrained  # noqa: E402
from esm2lite.data.batching import make_batches  # noqa: E402
from esm2lite.files.atomic import write_json  # noqa: E402
from esm2lite.model.batch import Batch  # noqa: E402
from esm2lite.model.int8 import quantize_int8  # noqa: E402
from esm2lite.model.tokenizer import PAD, Tokenizer  # noqa: E402
from esm2lite.runtime.cpu_memory import keep_freed_memory  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "examples", "secondary_structure_flip_sampled.csv")  # FLIP, AFL-3.0 (examples/README.md)
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SYSTEMS = ("esm2lite-fp32", "esm2lite-fp32-packed", "esm2lite-int8-packed", "esm2lite-bf16-packed",
           "transformers-sdpa-fp32", "esm-cpp-fp32", "esm-cpp-int8")
REFERENCE, BASELINE = "transformers-sdpa-fp32", "esm2lite-fp32"
REPLY_S = 1800.0  # one esm-cpp pass: 106 s for 35M fp32 over the 200 proteins on 1 thread (measured)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# The esm-cpp side, run by --esmcpp-python: one JSON line per command read from stdin.
SERVER = r'''
import json, sys, time
import numpy as np
import esm_cpp
model_path, ids_path = sys.argv[1], sys.argv[2]
ids = [np.asarray(x, dtype=np.int32) for x in json.load(open(ids_path))]
models = {"fp32": esm_cpp.Model.load_from_safetensors(model_path),
          "int8": esm_cpp.Model.load_from_safetensors(model_path)}
models["int8"].quantize_weights()
assert list(esm_cpp.Tokenizer().encode("MKTAYW")) == [0, 20, 15, 11, 5, 19, 22, 2]  # esm2lite's token ids
print(json.dumps({"threads": esm_cpp.Model.num_threads, "isa": esm_cpp.current_isa(),
                  "version": esm_cpp.__version__}), flush=True)
for line in sys.stdin:
    mode, dump = (line.split() + [None])[:2]
    start = time.perf_counter()
    out = models[mode].forward_scheduled(ids)
    seconds = time.perf_counter() - start
    if dump:
        np.save(dump, np.concatenate(out).astype(np.float32))
    print(json.dumps({"s": seconds}), flush=True)
'''


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                      formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["esm2_t6_8M_UR50D", "esm2_t12_35M_UR50D"])
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS),
                   help=f"{REFERENCE} (the reference) and {BASELINE} always run")
    p.add_argument("--num-seqs", type=int, default=200, help="first N proteins of the FLIP file (200: 48,641 "
                   "tokens; the README's table: 34 minutes on 2 cores for both sizes and thread counts, measured)")
    p.add_argument("--max-residues", type=int, default=1022)
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per batch (padded: padding included)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per system (median reported)")
    p.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=DATA, help="CSV with a sequence column")
    p.add_argument("--esmcpp-python", default="/work/esmcpp-venv/bin/python",
                   help="a python with esm-cpp installed, in its own venv since it needs numpy < 2: python -m venv "
                        "/work/esmcpp-venv && /work/esmcpp-venv/bin/pip install esm-cpp 'numpy<2'")
    p.add_argument("--glibc-malloc-defaults", action="store_true",
                   help="leave glibc's malloc thresholds as they are (what a program calling the library gets); "
                        "by default they are raised as esm2lite-infer does on a CPU (runtime/cpu_memory.py), for "
                        "every in-process system alike")
    p.add_argument("--out", default=os.path.join(RESULTS, "cpu_peers.json"))
    args = p.parse_args(argv)
    if min(args.num_seqs, args.repeats, args.max_residues, min(args.threads)) < 1:
        p.error("--num-seqs, --repeats, --max-residues and --threads must be positive")
    if not os.path.isfile(args.data):
        p.error(f"--data {args.data}: no such file")
    if any(s.startswith("esm-cpp") for s in args.systems) and not os.access(args.esmcpp_python, os.X_OK):
        p.error(f"--esmcpp-python {args.esmcpp_python}: not an executable python (see --help for its venv), "
                "or leave esm-cpp out of --systems")
    if args.max_residues + 2 > args.batch_tokens:
        p.error(f"--batch-tokens {args.batch_tokens} cannot hold a sequence of --max-residues {args.max_residues}")
    return args


def save_checkpoint(arch: str, out_dir: str, seed: int) -> str:
    """make_checkpoint's random EsmForMaskedLM, its safetensors rewritten in transformers 4's key
    layout (transformers 5 writes LayerNorm gamma/beta and one wildcard inv_freq; esm-cpp reads
    the released files' layout). -> the safetensors path."""
    from safetensors.torch import load_file, save_file

    from esm2lite.model.config import ESM2Config
    from esm2lite.model.esm2 import rotary_inv_freq

    make_checkpoint(arch, out_dir, seed)
    path = os.path.join(out_dir, "model.safetensors")
    rename = lambda k: k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    state = {rename(k): v.contiguous() for k, v in load_file(path).items() if "*" not in k}
    config = ESM2Config.from_name(arch)
    for i in range(config.num_layers):
        state[f"esm.encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq"] = rotary_inv_freq(config.head_dim)
    save_file(state, path, metadata={"format": "pt"})
    return path


# ---------------------------------------------------------------- the systems


class Torch:
    """An in-process system: pass() -> (seconds, logits of every sequence concatenated [sum T, 33])."""

    def __init__(self, name: str, model_dir: str, batches: list, lengths: list[int], order: list[int]):
        self.name, self.batches, self.lengths, self.order = name, batches, lengths, order
        if name.startswith("transformers"):
            from transformers import EsmForMaskedLM

            self.model = EsmForMaskedLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
        else:
            self.model = load_pretrained(model_dir).eval()
            if "int8" in name:
                quantize_int8(self.model)

    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] right-padded -> logits of the non-pad tokens [n, 33], sequence after sequence."""
        keep = tokens.ne(PAD)
        if self.name.startswith("transformers"):
            return self.model(input_ids=tokens, attention_mask=keep).logits[keep]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in self.name):  # --precision bf16
            if self.name.endswith("packed"):
                return self.model(Batch(tokens).pack())["logits"][0].float()
            return self.model(tokens)["logits"][keep]

    def run(self, keep: bool, dump_dir: str):
        start = time.perf_counter()
        outs = [self.logits(t) for t in self.batches]
        seconds = time.perf_counter() - start
        return seconds, (in_input_order(torch.cat(outs).numpy(), self.lengths, self.order) if keep else None)

    def close(self):
        pass


def in_input_order(logits: np.ndarray, lengths: list[int], order: list[int]) -> np.ndarray:
    """Rows of the sequences in batch order (`order`: their indices) -> rows in input order."""
    starts = np.concatenate([[0], np.cumsum([lengths[i] for i in order])])
    parts = {i: logits[starts[k]:starts[k + 1]] for k, i in enumerate(order)}
    return np.concatenate([parts[i] for i in range(len(lengths))])


class EsmCpp:
    """esm-cpp in its own venv: a server process per thread count, loaded once (fp32 and int8)."""

    def __init__(self, python: str, model_path: str, ids: list[list[int]], threads: int, workdir: str):
        ids_path = os.path.join(workdir, "ids.json")
        with open(ids_path, "w") as f:
            json.dump(ids, f)
        server = os.path.join(workdir, "esmcpp_server.py")
        with open(server, "w") as f:
            f.write(SERVER)
        env = {**os.environ, "ESM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen([python, server, model_path, ids_path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.info = self.reply()

    def reply(self) -> dict:
        """The server's next line (one per command, flushed: nothing is left buffered on our side), within
        REPLY_S; a server that hangs is killed and named, never waited on forever."""
        if not select.select([self.proc.stdout], [], [], REPLY_S)[0]:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"esm-cpp server: no answer in {REPLY_S:.0f} s (killed)")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"esm-cpp server exited (code {self.proc.wait()})")
        return json.loads(line)

    def runner(self, mode: str):
        def run(keep: bool, dump_dir: str):
            dump = os.path.join(dump_dir, f"esmcpp_{mode}.npy") if keep else ""
            self.proc.stdin.write(f"{mode} {dump}\n")
            self.proc.stdin.flush()
            seconds = self.reply()["s"]
            return seconds, (np.load(dump) if keep else None)
        return run

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------- the run


def measure(arch, args, seqs, threads_list) -> dict:
    """Every system at every thread count on one architecture."""
    tok = Tokenizer()
    lengths = [len(s) + 2 for s in seqs]
    groups = make_batches(lengths, args.batch_tokens, shuffle=False)
    order = [i for g in groups for i in g]
    batches = [tok.batch_encode([seqs[i] for i in g]) for g in groups]
    systems = [s for s in SYSTEMS if s in args.systems or s in (REFERENCE, BASELINE)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_path = save_checkpoint(arch, tmp, args.seed)
        torch_systems = {}
        for name in (s for s in systems if not s.startswith("esm-cpp")):
            torch_systems[name] = Torch(name, tmp, batches, lengths, order)
        for threads in threads_list:
            results[str(threads)] = run_threads(arch, args, systems, torch_systems, model_path, tmp, threads,
                                                [tok.encode(s) for s in seqs])
    return results


def run_threads(arch, args, systems, torch_systems, model_path, tmp, threads, ids) -> dict:
    torch.set_num_threads(threads)
    runners, cpp = {name: s.run for name, s in torch_systems.items()}, None
    if any(s.startswith("esm-cpp") for s in systems):
        cpp = EsmCpp(args.esmcpp_python, model_path, ids, threads, tmp)
        runners.update({s: cpp.runner(s.rsplit("-", 1)[1]) for s in systems if s.startswith("esm-cpp")})
    try:
        for s in torch_systems.values():  # warm-up: kernels, oneDNN packing, allocator
            s.logits(s.batches[-1][:1])
        times, logits = {s: [] for s in runners}, {}
        for r in range(args.repeats):
            for name, run in runners.items():
                seconds, out = run(r == 0, tmp)
                times[name].append(seconds)
                if out is not None:
                    logits[name] = out
            print(f"{arch}, {threads} thread(s), repeat {r + 1}/{args.repeats}: "
                  + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), flush=True)
    finally:
        if cpp:
            cpp.close()
    tokens = sum(len(x) for x in ids)
    out = {"esm_cpp": cpp.info if cpp else None, "systems": {}}
    ref, base = logits[REFERENCE], statistics.median(times[BASELINE])
    for name in runners:
        median = statistics.median(times[name])
        diff = np.abs(logits[name].astype(np.float64) - ref)
        out["systems"][name] = {"pass_s_median": median, "pass_s": times[name], "tokens_per_s": tokens / median,
                                "vs_esm2lite_fp32": base / median, "max_abs_logit_err_vs_transformers": float(diff.max()),
                                "mean_abs_logit_err_vs_transformers": float(diff.mean())}
    return out


def table(doc) -> str:
    lines = ["| model | threads | system | tokens/s | vs esm2lite fp32 | max abs logit error vs transformers fp32 "
             "| mean abs error |", "|---|---|---|---|---|---|---|"]
    for arch, per_threads in doc["results"].items():
        for threads, r in per_threads.items():
            for name, s in r["systems"].items():
                err = "reference" if name == REFERENCE else f"{s['max_abs_logit_err_vs_transformers']:.2g}"
                mean = "" if name == REFERENCE else f"{s['mean_abs_logit_err_vs_transformers']:.2g}"
                lines.append(f"| {arch} | {threads} | {name} | {s['tokens_per_s']:,.0f} | {s['vs_esm2lite_fp32']:.2f} "
                             f"| {err} | {mean} |")
    return "\n".join(lines)


ISA = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_identity(cpuinfo: str) -> dict:
    """/proc/cpuinfo's text -> the first CPU's model name, family and model numbers, and which of the
    instruction sets int8 and bf16 use it has (a virtual machine's model name can be as bare as
    "AMD EPYC"; family 25 model 17 says Zen 4)."""
    first = dict(line.split(":", 1) for line in cpuinfo.split("\n\n")[0].splitlines() if ":" in line)
    first = {k.strip(): v.strip() for k, v in first.items()}
    flags = set(first.get("flags", "").split())
    return {"model_name": first.get("model name", "unknown"), "family": first.get("cpu family"),
            "model": first.get("model"), "isa": [f for f in ISA if f in flags]}


def main(argv=None):
    import transformers

    args = parse_args(argv)
    kept = False if args.glibc_malloc_defaults else keep_freed_memory()
    seqs = read_sequences(args.data, args.num_seqs, 0, args.max_residues)
    tokens = sum(len(s) + 2 for s in seqs)
    print(f"{len(seqs)} sequences ({min(map(len, seqs))}-{max(map(len, seqs))} residues, {tokens} tokens), "
          f"threads {args.threads}, {args.repeats} repeats", flush=True)
    doc = {"benchmark": "CPU peers: logits of every sequence, esm2lite fp32/int8 vs transformers sdpa and esm-cpp",
           **run_info(torch.device("cpu"), transformers=transformers.__version__), "cpu": cpu_identity(open("/proc/cpuinfo").read()),
           "settings": vars(args), "cpu_count": os.cpu_count(), "keep_freed_memory": kept,
           "data": {"file": os.path.relpath(args.data, ROOT), "num_seqs": len(seqs), "tokens": tokens,
                    "residues": [min(map(len, seqs)), max(map(len, seqs))]},
           "load_average_start": os.getloadavg(), "results": {}}
    for arch in args.arch:
        doc["results"][arch] = measure(arch, args, seqs, args.threads)
        write_json(args.out, doc)
    doc["load_average_end"] = os.getloadavg()
    doc["table"] = table(doc)
    write_json(args.out, doc)
    print("\n" + doc["table"] + f"\n\nwrote {args.out}")


if __name__ == "__main__":
    main()
