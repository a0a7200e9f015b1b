"""The benchmarks' own failure modes: nothing hangs, a bad setting is one line in seconds."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_train_benchmark_refuses_a_pool_too_small_for_its_steps_in_seconds():
    """The data pool is checked before any model or process exists (it used to hang forever: the
    child raised, the parent waited on its queue)."""
    start = time.monotonic()
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--num-seqs", "8",
                        "--steps", "20", "--warmup", "3"], capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 30
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [r.stderr.strip()] and "fewer than --warmup + --steps = 23" in r.stderr


@pytest.mark.parametrize("script,args,message", [
    ("bench_train.py", ["--min-len", "90", "--max-len", "80"], "--min-len 90 is above --max-len 80"),
    ("bench_train.py", ["--batch-tokens", "100"], "cannot hold a sequence of --max-len 600"),
    ("bench_infer.py", ["--repeats", "0"], "--repeats must be positive"),
    ("bench_lora_linear.py", ["--dtype", "int8"], "invalid choice"),
    ("bench_cpu_peers.py", ["--batch-tokens", "512"], "--batch-tokens 512 cannot hold a sequence of --max-residues"),
    ("bench_cpu_peers.py", ["--threads", "0"], "--threads must be positive"),
    ("bench_cpu_peers.py", ["--data", "no-such.csv"], "--data no-such.csv: no such file"),
    ("bench_cpu_peers.py", ["--esmcpp-python", "/no/python"], "--esmcpp-python /no/python: not an executable python"),
])
def test_bad_benchmark_settings_are_one_line(script, args, message):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and message in r.stderr, r.stderr


def test_a_benchmark_process_that_dies_is_noticed_at_once(tmp_path, monkeypatch):
    """run_in_child returns an error as soon as the child is gone, instead of waiting for a result."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import bench_train

    args = bench_train.parse_args(["--arch", "esm2_t6_8M_UR50D", "--steps", "1", "--warmup", "0"])
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"esm2lite: the benchmark process died \(exit code 1\)"):
        bench_train.run_in_child("esm2lite", str(tmp_path / "no-such-model"), bench_train.args_for(args, args.arch[0]))
    assert time.monotonic() - start < 60


def test_kernel_warm_up_runs_one_launch_per_compile_class(monkeypatch):
    """Launches that compile the same binaries are warmed once; dtype, rank, gradients and the S strategy
    each make their own class (the launchers' own choice decides the strategy)."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.warm import Launch, compile_class, distinct, model_launches

    same = [Launch(5120, 5120, 16), Launch(2560, 2560, 16)]  # both outside the loop (r_pad · N > ridge · BN)
    assert compile_class(same[0]) == compile_class(same[1]) and distinct(same) == same[:1]
    others = [Launch(320, 320, 16), Launch(5120, 5120, 8), Launch(5120, 5120, 16, "fp32"),
              Launch(5120, 5120, 16, grads=()), Launch(5120, 5120, 16, p=0.1), Launch(5120, 5120, 16, bias=False)]
    assert len(distinct(same + others)) == 1 + len(others)
    layers = model_launches(1280, 5120, 16, "bf16")
    assert {(x.N, x.K) for x in layers} == {(1280, 1280), (5120, 1280), (1280, 5120)}
    assert [x.grads for x in layers].count(("A", "B")) == 1  # the first block's q, k, v: frozen input


def test_inference_headline_names_both_families(monkeypatch):
    """bench_infer's one-line summary reads the size out of ESM-2 names and keeps ESM C names whole."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import bench_infer

    r = {"esm2lite": {"speedup_vs_sdpa": 1.5}}
    assert bench_infer.headline({"esm2_t6_8M_UR50D": r, "esmc_300m": r}) == \
        "8M: 1.50x residues/s of transformers sdpa; esmc_300m: 1.50x residues/s of transformers sdpa"


def test_inference_benchmark_batches_in_both_orders(monkeypatch):
    """--order sorted (esm2lite's batches) and random (a loader that does not sort): every sequence once,
    every batch within the token budget (padding included), random more padded than sorted."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import bench_infer

    padded = {}
    for order in ("sorted", "random"):
        seqs = bench_infer.random_sequences(40, 20, 300, seed=0)
        batches, lengths = bench_infer.cut(seqs, 1200, order), [len(s) for s in seqs]
        assert sum(b.shape[0] for b in batches) == 40
        assert sorted(int(n) for b in batches for n in (b != 1).sum(1) - 2) == sorted(lengths)
        assert all(b.numel() <= 1200 or b.shape[0] == 1 for b in batches)
        padded[order] = sum(b.numel() for b in batches)
    assert padded["random"] > padded["sorted"]


def test_inference_benchmark_packed_batches_cut_by_real_tokens(monkeypatch):
    """esm2lite-packed's own batches: every sequence once, packed end to end, at most --batch-tokens real
    tokens each (one longer sequence alone), in both orders."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import bench_infer

    seqs = bench_infer.random_sequences(40, 20, 300, seed=1)
    for order in ("sorted", "random"):
        batches = bench_infer.cut(seqs, 1200, order, packed=True)
        assert all(b.packed and b.tokens.shape[1] <= 1200 or len(b.lengths) == 1 for b in batches)
        assert sorted(int(n) - 2 for b in batches for n in b.lengths) == sorted(len(s) for s in seqs)
        assert sorted(b.tokens.ne(1).sum().item() for b in batches) == sorted(b.tokens.shape[1] for b in batches)
        assert len(batches) <= len(bench_infer.cut(seqs, 1200, order))


def test_inference_benchmark_drops_a_failing_implementation_not_the_run(monkeypatch, tmp_path, capsys):
    """An implementation that fails (say, a kernel on a new GPU) is recorded with its error; the
    others, the baseline included, are still measured in the same run."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import bench_infer

    real = bench_infer.forward

    def failing(impl, model, batch):
        if impl == "esm2lite-packed":
            raise RuntimeError("no kernel image is available")
        return real(impl, model, batch)

    monkeypatch.setattr(bench_infer, "forward", failing)
    out = tmp_path / "r.json"
    bench_infer.main(["--num-seqs", "3", "--min-len", "10", "--max-len", "30", "--repeats", "1", "--impls",
                      "esm2lite", "esm2lite-packed", "--out", str(out)])
    results = json.loads(out.read_text())["results"]["esm2_t6_8M_UR50D"]
    assert results["esm2lite-packed"] == {"error": "RuntimeError: no kernel image is available"}
    assert results["esm2lite"]["speedup_vs_sdpa"] > 0 and results["transformers-sdpa"]["speedup_vs_sdpa"] == 1.0


def test_cpu_peers_compares_every_systems_rows_in_input_order(monkeypatch):
    """The logits of each system come back in its own batch order; every error in the table is taken
    after in_input_order has put them back in the input's. Three sequences of 2, 3 and 1 rows run in
    the order 2, 0, 1."""
    import numpy as np

    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.bench_cpu_peers import in_input_order

    lengths, order = [2, 3, 1], [2, 0, 1]
    in_batch_order = np.array([[20], [0], [1], [10], [11], [12]])  # sequence 2's row, then 0's, then 1's
    assert in_input_order(in_batch_order, lengths, order).ravel().tolist() == [0, 1, 10, 11, 12, 20]


def test_cpu_peers_names_the_cpu_by_family_model_and_instruction_sets(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.bench_cpu_peers import cpu_identity

    one = ("processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
           "flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16 avx512vl\n")
    got = cpu_identity(one.format(n=0) + "\n" + one.format(n=1))
    assert got == {"model_name": "AMD EPYC", "family": "25", "model": "17",
                   "isa": ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]}


def test_cpu_peers_kills_an_esm_cpp_server_that_never_answers(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import bench_cpu_peers

    monkeypatch.setattr(bench_cpu_peers, "SERVER", "import time\ntime.sleep(600)\n")  # loads forever
    monkeypatch.setattr(bench_cpu_peers, "REPLY_S", 1.0)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"esm-cpp server: no answer in 1 s \(killed\)"):
        bench_cpu_peers.EsmCpp(sys.executable, "model.safetensors", [[0, 2]], 1, str(tmp_path))
    assert time.monotonic() - start < 30
