"""Issue 25 C, unit level: reading is bounded and never blocks (regular files only where a checkpoint
or model directory is read, size caps, a file changing or still being written refused), every config
is checked against a parameter and layer budget, numbers that are not finite in the precision they are
used in are refused, out-of-memory is one line, and BioNeMo's ambiguous qkv_weight_interleaved is
refused. The same cases through the real commands are rows of tests/commands/test_bad_input.py."""

import argparse
import json
import math
import os
import signal
import time

import pytest
import torch

import oracles
from esm2lite.checkpoints import checkpoint_dir as ckpt_dir
from esm2lite.files import textfiles
from esm2lite.cli import run_main
from esm2lite.model.config import MAX_LAYERS, ESM2Config
from esm2lite.runtime.distributed import Dist
from esm2lite.errors import CheckpointError, DataError, Esm2liteError
from esm2lite.inference.evaluate import finite
from esm2lite.tasks import LabelSpace
from esm2lite.tasks.base import STATISTIC_LIMIT, TARGET_LIMIT, target_error
from esm2lite.data.records import records_from_pairs
from esm2lite import load_pretrained


@pytest.fixture(autouse=True)
def no_hang():
    """A test here that blocks (the bug these tests are about) fails after 60 s instead of hanging."""
    def stop(*_):
        raise TimeoutError("blocked for 60 s")
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- textfiles: regular files, caps, changing files


def test_fifo_and_devices_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: a plain open() for reading would block forever
    with pytest.raises(Esm2liteError, match=r"fifo: not a regular file: it is a FIFO \(named pipe\)"):
        textfiles.open_file(fifo)
    with pytest.raises(Esm2liteError, match=r"fifo: not a text file: it is a FIFO"):
        textfiles.read_json(fifo, regular=True)
    link = tmp_path / "zero"
    link.symlink_to("/dev/zero")
    with pytest.raises(Esm2liteError, match=r"zero: not a text file: it is a character device \(a link to /dev/zero\)"):
        textfiles.read_bytes(link, regular=True)
    with pytest.raises(Esm2liteError, match="is a directory"):
        textfiles.read_bytes(tmp_path, regular=True)


def test_data_may_come_from_a_pipe_but_never_blocks(tmp_path):
    """A data file named on the command line may be a pipe (`<(zcat x.csv.gz)`): read to its end. A
    FIFO without a writer reads as empty instead of blocking; /dev/zero stops at its first NUL byte."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert textfiles.read_bytes(fifo) == b""
    r, w = os.pipe()
    os.write(w, b"sequence\nMKV")  # no line end, but a pipe's end is its writer closing it: complete
    os.close(w)
    assert textfiles.read_text(f"/dev/fd/{r}", complete=True) == "sequence\nMKV"
    os.close(r)
    with pytest.raises(Esm2liteError, match="/dev/zero: not a text file"):
        textfiles.read_bytes("/dev/zero")


def test_size_cap_is_checked_before_reading(tmp_path):
    big = tmp_path / "config.json"
    with open(big, "wb") as f:
        f.truncate(10 << 30)  # sparse: 10 GiB of size, nothing to read
    with pytest.raises(Esm2liteError, match=r"config\.json: 10737418240 bytes, larger than the 64 MiB"):
        textfiles.read_json(big, regular=True)


def test_a_file_that_changes_while_read_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "a.csv"
    path.write_text("sequence\nMKV\n")
    real = textfiles.changed_while_read
    monkeypatch.setattr(textfiles, "changed_while_read", lambda st, f: (path.write_text("sequence\nMKVL\n"), real(st, f))[1])
    with pytest.raises(Esm2liteError, match=r"a\.csv: changed while it was being read"):
        textfiles.read_text(path)


def test_an_unended_last_line_is_refused_only_while_the_file_is_fresh(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("sequence,target\nMKV,1\nMKVL,0.")
    with pytest.raises(Esm2liteError, match=r"a\.csv, line 3: the last line has no line end .* still being written"):
        textfiles.read_text(path, complete=True)
    assert textfiles.read_text(path).endswith("0.")  # only data readers ask for complete=True
    old = time.time() - 2 * textfiles.FRESH_SECONDS
    os.utime(path, (old, old))  # the writer is long gone: a file that just lacks its last newline
    assert textfiles.read_text(path, complete=True).endswith("MKVL,0.")
    path.write_text("sequence,target\nMKV,1\n")  # ended: read at once
    assert textfiles.read_text(path, complete=True).endswith("MKV,1\n")


# ---------------------------------------------------------------- a checkpoint directory: what is hashed and read


def checkpoint_like(d):
    """A directory with two files and the SHA256SUMS esm2lite writes for them."""
    os.makedirs(d / "dcp")
    (d / "config.json").write_text("{}")
    (d / "dcp" / "shard.safetensors").write_bytes(b"x" * 1000)
    ckpt_dir._write_sums(str(d), Dist())
    return str(d)


def add_entry(d, name):
    with open(os.path.join(d, "SHA256SUMS"), "a") as f:
        f.write("0" * 64 + f"  {name}\n")


def test_verify_hashes_regular_files_inside_the_directory_only(tmp_path):
    d = checkpoint_like(tmp_path / "ck")
    ckpt_dir.verify(d)
    assert sorted(ckpt_dir.read_sums(d)) == ["config.json", "dcp/shard.safetensors"]
    os.mkfifo(os.path.join(d, "fifo"))
    add_entry(d, "fifo")
    with pytest.raises(CheckpointError, match=r"ck/fifo: not a regular file: it is a FIFO"):
        ckpt_dir.verify(d)

    d = checkpoint_like(tmp_path / "ck2")
    os.symlink("/dev/zero", os.path.join(d, "zero"))
    add_entry(d, "zero")
    with pytest.raises(CheckpointError, match=r"ck2/zero: outside the checkpoint directory"):
        ckpt_dir.verify(d)

    d = checkpoint_like(tmp_path / "ck3")
    (tmp_path / "secret").write_text("not the checkpoint's")
    os.symlink(tmp_path / "secret", os.path.join(d, "escape"))
    add_entry(d, "escape")
    with pytest.raises(CheckpointError, match=r"ck3/escape: outside the checkpoint directory"):
        ckpt_dir.verify(d)


def test_a_link_inside_the_directory_is_followed(tmp_path):
    d = checkpoint_like(tmp_path / "ck")
    os.symlink("config.json", os.path.join(d, "same"))
    with open(os.path.join(d, "SHA256SUMS"), "a") as f:
        f.write(ckpt_dir._sha256(os.path.join(d, "config.json")) + "  same\n")
    ckpt_dir.verify(d)


def test_sums_that_name_outside_or_are_a_device_are_refused(tmp_path):
    for name in ("../x", "/etc/passwd"):
        d = checkpoint_like(tmp_path / f"ck{len(name)}")
        add_entry(d, name)
        with pytest.raises(CheckpointError, match="SHA256SUMS: damaged"):
            ckpt_dir.read_sums(d)
    d = checkpoint_like(tmp_path / "zero")
    os.remove(os.path.join(d, "SHA256SUMS"))
    os.symlink("/dev/zero", os.path.join(d, "SHA256SUMS"))
    with pytest.raises(CheckpointError, match=r"SHA256SUMS: not a text file: it is a character device"):
        ckpt_dir.read_sums(d)
    d = checkpoint_like(tmp_path / "huge")
    with open(os.path.join(d, "SHA256SUMS"), "ab") as f:
        f.truncate(1 << 30)
    with pytest.raises(CheckpointError, match=r"SHA256SUMS: 1073741824 bytes, larger than the 16 MiB"):
        ckpt_dir.read_sums(d)


# ---------------------------------------------------------------- the parameter and layer budget


def test_layer_budget_before_anything_is_built(tmp_path, hf_tiny):
    assert ESM2Config(num_layers=MAX_LAYERS, d_model=64, num_heads=4, ffn_dim=256).num_layers == MAX_LAYERS
    with pytest.raises(Esm2liteError, match=f"config field num_layers is {MAX_LAYERS + 1}, more than the {MAX_LAYERS}"):
        ESM2Config(num_layers=MAX_LAYERS + 1, d_model=64, num_heads=4, ffn_dim=256)
    cfg = json.load(open(os.path.join(hf_tiny, "config.json")))
    path = tmp_path / "config.json"
    for field, value, message in (("num_hidden_layers", 10**6, "field num_hidden_layers is 1000000, more than"),
                                  ("hidden_size", 10**6, "parameters, more than the 5e\\+10 limit"),
                                  ("num_attention_heads", 3, "fields hidden_size=64, num_attention_heads=3")):
        json.dump({**cfg, field: value}, open(path, "w"))
        start = time.time()
        with pytest.raises(CheckpointError, match=f"config.json: .*{message}"):
            ESM2Config.from_json_file(str(path))
        assert time.time() - start < 1


def test_fair_esm_args_are_checked_against_the_budget(tmp_path):
    from esm2lite.weights.pretrained import read_checkpoint

    path = tmp_path / "deep.pt"
    cfg = argparse.Namespace(encoder_layers=10**6, encoder_embed_dim=64, encoder_attention_heads=4)
    torch.save({"model": {}, "cfg": {"model": cfg}}, path)
    with pytest.raises(CheckpointError, match=r"deep\.pt: cfg\.model: .*num_layers is 1000000, more than the 512"):
        read_checkpoint(str(path))


# ---------------------------------------------------------------- BioNeMo's qkv_weight_interleaved


@pytest.mark.parametrize("value", [False, "true", None])
def test_bionemo_qkv_flag_other_than_true_is_refused(hf_tiny, tmp_path, value):
    """NVIDIA's converter writes per-head interleaved rows whatever the flag says; TransformerEngine
    reads [q; k; v] rows when it is false; the file cannot tell which, so only true (or absent) loads."""
    d = oracles.make_bionemo_checkpoint(tmp_path / "nv", hf_tiny)
    load_pretrained(d)  # true: NVEsmConfig's default
    cfg = json.load(open(os.path.join(d, "config.json")))
    json.dump({**cfg, "qkv_weight_interleaved": value}, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=f"nv: config.json field qkv_weight_interleaved is "
                                              f"{json.dumps(value)}, which does not say how"):
        load_pretrained(d)
    del cfg["qkv_weight_interleaved"]  # absent: NVEsmConfig's default, true
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    load_pretrained(d)


# ---------------------------------------------------------------- numbers


def test_target_limits():
    assert target_error(1e38) is None and target_error(-TARGET_LIMIT) is None
    assert "beyond float32's range" in target_error(1e39) and "not a finite number" in target_error(math.nan)
    assert target_error(1e19, STATISTIC_LIMIT) is None
    assert "its square is not a finite float32 number" in target_error(1e20, STATISTIC_LIMIT)


def test_label_space_refuses_targets_and_statistics_it_cannot_use():
    big = records_from_pairs([("MKV", 1e300), ("MKVL", 1.0)])  # in-memory data: no reader checked it
    with pytest.raises(DataError, match=r"<memory>, item 0, column 'target': target 1e\+300 is too large"):
        LabelSpace.fit("regression", big, ["target"])
    spread = records_from_pairs([("MKV", 3e38), ("MKVL", -3e38)])
    LabelSpace.fit("regression", spread, ["target"])  # each value fits float32
    with pytest.raises(DataError, match=r"the mean or standard deviation of the training targets \(0, 3e\+38\)"):
        LabelSpace.fit("regression", spread, ["target"], standardize=True)
    space = LabelSpace.fit("regression", records_from_pairs([("MKV", 1.0), ("MKVL", 3.0)]), ["target"], standardize=True)
    with pytest.raises(DataError, match="target 1e\\+300 is too large"):
        space.check(big)
    for field, value in (("mean", [math.inf]), ("std", [0.0]), ("std", [1.0, 2.0])):
        with pytest.raises(DataError, match=f"the label space's {field}"):
            LabelSpace.from_dict({**space.to_dict(), field: value})


def test_metrics_that_are_not_finite_are_refused_saying_why():
    assert finite("valid", {"loss": 0.5, "mse": 1.0}, [torch.ones(1)]) == {"loss": 0.5, "mse": 1.0}
    with pytest.raises(Esm2liteError, match="scoring the valid split: loss nan, accuracy nan, macro_f1 nan: not "
                                            "finite; it has no labelled residues"):
        finite("valid", {"loss": math.nan, "accuracy": math.nan, "macro_f1": math.nan}, [torch.ones(3, 2)])
    with pytest.raises(Esm2liteError, match="test split: mse inf: not finite; the model's outputs"):
        finite("test", {"loss": 1.0, "mse": math.inf}, [torch.tensor([math.inf])])
    with pytest.raises(Esm2liteError, match="too large for the metrics"):
        finite("test", {"loss": math.inf}, [torch.tensor([1e38])])


# ---------------------------------------------------------------- out of memory: one line


def oom_in_esm2lite():
    """A real allocation failure of torch's CPU allocator, inside esm2lite's code (a head 2^40 wide)."""
    from esm2lite.tasks import TASKS

    TASKS["regression"].head(64, 1, hidden=1 << 40, dropout=0.0)


def raises(e):
    def f():
        raise e
    return f


@pytest.mark.parametrize("fail, line", [
    (oom_in_esm2lite, "error: out of memory in esm2lite/model/heads.py:"),
    (raises(MemoryError()), "error: out of memory: MemoryError; a smaller --batch-tokens"),
    (raises(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                   "79 GiB")),
     "error: out of GPU memory: CUDA out of memory. Tried to allocate 2.00 GiB; a smaller --batch-tokens"),
])
def test_out_of_memory_is_one_line(fail, line, capsys):
    def main(argv):
        fail()

    assert run_main(main, []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(line) and "Traceback" not in err, err
    with pytest.raises((MemoryError, RuntimeError)):  # --debug: the exception itself, traceback and all
        run_main(main, ["--debug"])


def test_other_runtime_errors_are_not_called_out_of_memory():
    def main(argv):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_main(main, [])
