"""torchrun + FSDP2 on CPU (gloo, 2 processes): same trajectory as one process, resumable
across rank counts, and errors end every rank."""

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import oracles
from esm2lite.errors import CheckpointError
from esm2lite.checkpoints.loading import load_model
from test_train import trained

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "train.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    seqs = oracles.random_sequences(40, 15, 50, seed=1, with_mask=False)
    with open(d / "d.csv", "w") as f:
        f.write("sequence,target,split\n")
        for i, s in enumerate(seqs):
            f.write(f"{s},{(s.count('K') + s.count('R')) / len(s)},{'train' if i < 30 else 'valid'}\n")
    return d


def common(hf, data, mode, out, steps=6):
    return ["--csv", str(data / "d.csv"), "--checkpoint", hf, "--mode", mode, "--steps", str(steps),
            "--batch-tokens", "400", "--lr", "3e-3", "--eval-every", "3", "--log-every", "1", "--head-dropout", "0",
            "--seed", "1", "--device", "cpu", "--keep-last", "100", "--out", str(out)]


def torchrun(args, nproc=2, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", TRAIN, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def single(args, timeout=240):
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=timeout)


def log(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def assert_same_trajectory(a, b, rel=1e-5):
    """Relative to the loss: the same gradients summed in another fp32 order (all-reduced over 2 ranks vs
    2 micro-batches accumulated), the difference carried through up to 6 optimizer steps: measured
    <= 8 eps32 relative; rel 1e-5 is ~84 eps32."""
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= rel * abs(x["loss"]), (x, y)


def two_ranks_and_one(base, data, mode, tmp_path):
    """The same run under torchrun on 2 ranks (tmp_path/two) and in one process with --grad-accum 2
    (tmp_path/one), which must follow the same trajectory."""
    r = torchrun(common(base, data, mode, tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = single(common(base, data, mode, tmp_path / "one") + ["--grad-accum", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_trajectory(log(tmp_path / "two"), log(tmp_path / "one"))


@pytest.mark.parametrize("mode", ["lora", "full", "head"])
def test_two_ranks_follow_the_single_process_trajectory(hf_tiny, data, tmp_path, mode):
    two_ranks_and_one(hf_tiny, data, mode, tmp_path)
    s2, s1 = (json.load(open(tmp_path / d / "summary.json")) for d in ("two", "one"))
    assert s2["world_size"] == 2 and s2["best_step"] == s1["best_step"]
    for k, v in s1["valid"].items():  # float64 metrics of the trajectories above: ~84 eps32 of their scale
        # (the value, or 1 for correlations and r2, bounded and possibly near 0); measured <= 12 eps32
        assert abs(s2["valid"][k] - v) <= 1e-5 * max(1.0, abs(v)), k


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_esm_c_two_ranks_follow_the_single_process_trajectory(esmc_tiny, data, tmp_path, mode):
    """ESM C under FSDP2 (one unit per block, as ESM-2): 2 ranks equal 1 process with --grad-accum 2."""
    two_ranks_and_one(esmc_tiny, data, mode, tmp_path)
    assert json.load(open(tmp_path / "two" / "best" / "config.json"))["model_config"]["family"] == "esmc"


def test_bf16_mixed_precision_keeps_fp32_weights_and_the_trajectory(hf_tiny, data, tmp_path):
    """FSDP2's MixedPrecisionPolicy (bf16 compute, fp32 reduction) as on GPUs, here under gloo."""
    from esm2lite.checkpoints.sharded import stored_tensors

    bf16 = ["--precision", "bf16", "--mode", "full"]
    r = torchrun(common(hf_tiny, data, "full", tmp_path / "two") + bf16)
    assert r.returncode == 0, r.stderr[-3000:]
    r = single(common(hf_tiny, data, "full", tmp_path / "one") + bf16 + ["--grad-accum", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(common(hf_tiny, data, "full", tmp_path / "fp32"))
    assert r.returncode == 0, r.stderr[-3000:]
    two, one, fp32 = (log(tmp_path / d) for d in ("two", "one", "fp32"))
    # both bf16, rounded in different places (FSDP casts the parameters, one process autocasts):
    # measured ~2% of the loss scale apart, as far as either is from fp32. Exactness of the
    # reduction itself is the fp32 test's job; this one shows the bf16 path trains alike.
    scale = max(r["loss"] for r in one)
    assert [(r["step"], r["split"]) for r in two] == [(r["step"], r["split"]) for r in one]
    assert all(abs(a["loss"] - b["loss"]) <= 5e-2 * scale for a, b in zip(two, one)), (two, one)
    assert abs(two[0]["loss"] - fp32[0]["loss"]) > 1e-6 * fp32[0]["loss"]  # bf16 compute really ran
    dtypes = {t.dtype for t in stored_tensors(str(tmp_path / "two" / "best")).values()}
    assert dtypes == {__import__("torch").float32}  # the sharded master weights stay fp32


def partial_copy(src, dst, step):
    """What a run interrupted after `step` leaves on disk."""
    os.makedirs(dst / "checkpoints")
    shutil.copy(src / "config.json", dst / "config.json")
    shutil.copytree(src / "checkpoints" / f"step_{step}", dst / "checkpoints" / f"step_{step}")
    shutil.copytree(src / "checkpoints" / f"step_{step}", dst / "best")
    (dst / "metrics.jsonl").write_text((src / "metrics.jsonl").read_text())


def assert_close_weights(a, b, rel=1e-5):
    """Relative to each tensor's norm (as assert_same_trajectory: other fp32 summation orders carried through
    the steps; measured <= 0.5 eps32). Equal tensors, zero ones included, pass; no absolute floor."""
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).norm() <= rel * a[k].norm(), k


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_under_two_ranks_and_from_two_onto_one(hf_tiny, data, tmp_path, mode):
    full = tmp_path / "full"
    r = torchrun(common(hf_tiny, data, mode, full) + ["--save-every", "3"])
    assert r.returncode == 0, r.stderr[-3000:]
    step_3 = full / "checkpoints" / "step_3"
    if mode == "full":  # sharded: each rank wrote its own shard file, nothing was gathered
        assert len(os.listdir(step_3 / "dcp")) == 2  # one safetensors file per rank, nothing pickled
        assert all(name.endswith(".safetensors") for name in os.listdir(step_3 / "dcp"))
        lost = tmp_path / "lost"  # rank 0's shard file lost: a hole, found from the headers alone
        shutil.copytree(step_3, lost)
        os.remove(min((lost / "dcp").iterdir()))
        with pytest.raises(CheckpointError, match=r"lost/dcp: the shards of model\..* do not cover it"):
            load_model(str(lost))
        assert not (step_3 / "model.safetensors").exists()
    final = trained(full / "checkpoints" / "step_6")

    two = tmp_path / "two"
    partial_copy(full, two, 3)
    r = torchrun(common(hf_tiny, data, mode, two) + ["--save-every", "3", "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = trained(two / "checkpoints" / "step_6")
    assert resumed.keys() == final.keys()
    for k in final:  # same ranks, same RNG streams: exactly the uninterrupted weights
        assert (resumed[k] == final[k]).all(), k

    one = tmp_path / "one"
    partial_copy(full, one, 3)
    r = single(common(hf_tiny, data, mode, one) + ["--save-every", "3", "--resume", "--grad-accum", "1"])
    assert r.returncode == 2 and "changed: grad_accum x ranks (was 1 x 2)" in r.stderr
    # on 1 rank the same global batch is 2 micro-batches per step: --resume chooses that itself
    r = single(["--out", str(one), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"--resume: {one} ran on 2 rank(s), this on 1: --grad-accum 2 keeps its batch per step" in r.stdout
    assert_close_weights(final, trained(one / "checkpoints" / "step_6"))
    assert_same_trajectory(log(one), log(full))


def test_full_fine_tune_from_one_process_resumes_on_two_ranks_and_predicts(hf_tiny, data, tmp_path):
    one = tmp_path / "one"
    r = single(common(hf_tiny, data, "full", one) + ["--save-every", "3", "--grad-accum", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"
    partial_copy(one, two, 3)
    r = torchrun(common(hf_tiny, data, "full", two) + ["--save-every", "3", "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_close_weights(trained(one / "checkpoints" / "step_6"), trained(two / "checkpoints" / "step_6"))
    assert_same_trajectory(log(two), log(one))
    # the sharded best checkpoint serves predictions in a plain process: they reproduce the
    # validation MSE the 2-rank run reported for it
    valid = [line.split(",") for line in (data / "d.csv").read_text().splitlines()[1:] if line.endswith(",valid")]
    (tmp_path / "valid.csv").write_text("id,sequence\n" + "".join(f"v{i},{s}\n" for i, (s, _, _) in enumerate(valid)))
    r = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--checkpoint", str(two / "best"), "--input",
                        str(tmp_path / "valid.csv"), "--output", str(tmp_path / "pred.csv")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    preds = [float(line.split(",")[2]) for line in (tmp_path / "pred.csv").read_text().splitlines()[1:]]
    mse = sum((p - float(t)) ** 2 for p, (_, t, _) in zip(preds, valid)) / len(valid)
    reported = json.load(open(two / "summary.json"))["valid"]["mse"]
    # each prediction is off the 2-rank evaluation's by fp32 rounding only (other batches, another process):
    # delta = 64 eps32 x max|prediction|; the mse (float64) then moves by at most 2 mean|residual| delta + delta^2
    delta = 64 * oracles.EPS32 * max(map(abs, preds))
    mean_residual = sum(abs(p - float(t)) for p, (_, t, _) in zip(preds, valid)) / len(valid)
    assert abs(mse - reported) <= 2 * mean_residual * delta + delta ** 2, (mse, reported)


def test_bad_row_ends_every_rank_with_the_same_error(hf_tiny, data, tmp_path):
    bad = tmp_path / "bad.csv"
    lines = (data / "d.csv").read_text().splitlines()
    lines[5] = lines[5].replace(",", "J,", 1)  # unknown residue at the end of row 6's sequence
    bad.write_text("\n".join(lines) + "\n")
    args = common(hf_tiny, data, "lora", tmp_path / "o")
    args[args.index("--csv") + 1] = str(bad)
    r = torchrun(args, timeout=120)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and errors[0] == errors[1], r.stderr[-2000:]
    assert "bad.csv, row 6, column 'sequence': unknown residue 'J'" in errors[0]
    assert not (tmp_path / "o").exists()


def test_data_parallel_inference_keeps_order_and_values(hf_tiny, data, tmp_path):
    run = tmp_path / "run"
    r = single(common(hf_tiny, data, "lora", run, steps=2))
    assert r.returncode == 0, r.stderr[-3000:]
    seqs = oracles.random_sequences(9, 5, 80, seed=9, with_mask=False)
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(seqs)))
    # torchrun's own parser takes "--run" for an abbreviation of its --run-path: --run-dir is infer's same option
    args = ["--run-dir", str(run), "--input", str(fasta), "--batch-tokens", "200"]
    infer = str(ROOT / "infer.py")
    one = subprocess.run([sys.executable, infer, *args, "--output", str(tmp_path / "one.csv"),
                          "--embeddings", str(tmp_path / "one.safetensors")], capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", infer,
                          *args, "--output", str(tmp_path / "two.csv"), "--embeddings", str(tmp_path / "two.safetensors")],
                         capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    rows1, rows2 = (list(csv.DictReader(open(tmp_path / name))) for name in ("one.csv", "two.csv"))
    assert [r["id"] for r in rows2] == [f"s{i}" for i in range(9)]
    assert [(r["id"], r["sequence"]) for r in rows1] == [(r["id"], r["sequence"]) for r in rows2]
    # the same forwards in other batches on each rank: rounding only (equal here); two fp32 forwards of the
    # tiny model, each a few eps32 x max|h| from float64 (test_parity), 64 leaves room for other machines
    oracles.assert_fp32_close([float(r["prediction"]) for r in rows2], [float(r["prediction"]) for r in rows1],
                              64, what="predictions")
    e1, e2 = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert e1.keys() == e2.keys()
    for k in e1:
        oracles.assert_fp32_close(e2[k], e1[k], 64, what=k)


# ---------------------------------------------------------------- ranks that disagree, stop or die (issue 25 B)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(nodes, args, timeout=180) -> list[tuple[str, int]]:
    """One torchrun per "node" (--nnodes 2, one process each) started in that node's directory, as on
    two machines: relative paths in `args` name each node's own copies. [(stderr, exit status)] per node."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={i}",
                               "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}", TRAIN, *args],
                              cwd=node, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
             for i, node in enumerate(nodes)]
    try:
        return [(p.communicate(timeout=timeout)[1], p.returncode) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.mark.parametrize("differs", ["data", "base"])
def test_ranks_that_read_different_inputs_stop_naming_the_rank(hf_tiny, data, tmp_path, differs):
    """Node-local copies under the same relative paths, one of them different (node 1's data file has a
    row fewer, or its base model other weights): every rank exits before step 1 with the same one line
    naming rank 1 and what differs, and no run directory is made."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
        shutil.copy(data / "d.csv", node / "d.csv")
        shutil.copytree(hf_tiny, node / "base")
    if differs == "data":
        lines = (nodes[1] / "d.csv").read_text().splitlines(keepends=True)
        (nodes[1] / "d.csv").write_text("".join(lines[:-1]))
        expected = ["rank 1's d.csv differs from rank 0's (rank 0: sha256 ", ", train 30 rows, valid 10 rows; rank 1: "
                    "sha256 ", ", train 30 rows, valid 9 rows)"]
    else:
        shutil.rmtree(nodes[1] / "base")
        oracles.make_hf_checkpoint(nodes[1] / "base", **oracles.TINY, seed=3)
        expected = ["rank 1's base model differs from rank 0's (rank 0: encoder weights sha256 "]
    results = two_nodes(nodes, common("base", Path("."), "lora", tmp_path / "out"))
    errors = [line for err, _ in results for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and errors[0] == errors[1], [err[-2000:] for err, _ in results]
    assert errors[0].startswith("error: the ranks did not read the same inputs: ")
    assert all(e in errors[0] for e in expected), errors[0]
    assert all(status != 0 for _, status in results)
    assert not (tmp_path / "out").exists()


def workers(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of a torchrun's worker processes (its children, known by their RANK)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if parent == launcher.pid else []
        except (OSError, IndexError, ValueError):
            continue
        found.update({int(e[5:]): int(pid) for e in env if e.startswith(b"RANK=")})
    return found


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_a_rank_that_stops_or_dies_ends_the_others_in_one_line(hf_tiny, data, tmp_path, how):
    """Rank 1 paused (SIGSTOP) or killed (SIGKILL) while training: rank 0 ends with one line saying so, within
    --dist-timeout (15 s here; gloo's own default is 30 minutes) for a paused rank, at once for a dead one;
    no traceback of esm2lite's (torchrun's own report follows, as for any failed worker)."""
    out = tmp_path / "run"
    args = common(hf_tiny, data, "lora", out, steps=100000) + ["--dist-timeout", "15"]
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 TRAIN, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    lines = []  # (seconds since the signal, line)
    reader = threading.Thread(target=lambda: lines.extend((time.time(), line.rstrip("\n")) for line in launcher.stderr))
    reader.start()
    try:
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
            assert launcher.poll() is None, "\n".join(line for _, line in lines)[-3000:]
            time.sleep(0.05)  # both ranks train
        victim, sent = workers(launcher)[1], time.time()
        os.kill(victim, signal.SIGSTOP if how == "stopped" else signal.SIGKILL)
        while not any(line.startswith("error: rank 0: ") for _, line in lines) and time.time() - sent < 120:
            time.sleep(0.1)
        reported = next((t - sent for t, line in lines if line.startswith("error: rank 0: ")), None)
        if how == "stopped":
            os.kill(victim, signal.SIGCONT)  # it finds rank 0 gone (or torchrun ends it)
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        reader.join(timeout=10)
    text = [line for _, line in lines]
    errors = [line for line in text if line.startswith("error: ")]
    if how == "stopped":
        assert reported is not None and 10 < reported < 15 + 30, (reported, text[-40:])
        assert errors[0] == "error: rank 0: rank 1 stopped responding (no message from it within --dist-timeout 15 s: " \
                            "paused, hung or overloaded?); every rank stops", errors
        # rank 1, continued, finds rank 0 gone (or, its own wait having run past the timeout while it was
        # paused, silent); or torchrun has ended it
        assert all(e == errors[0] or e.startswith(("error: rank 1: rank 0 ended (its connection closed)",
                                                   "error: rank 1: rank 0 stopped responding")) for e in errors), errors
    else:
        assert reported is not None and reported < 30, (reported, text[-40:])
        assert errors == ["error: rank 0: rank 1 ended (its connection closed); its own message, or torchrun's report, "
                          "says why; every rank stops"], text[-40:]
    assert launcher.returncode != 0
    assert not [line for line in text if line.strip().startswith('File "') and ("esm2lite" in line or "train.py" in line)]
