"""Bad input through the real command-line tools (train.py, infer.py, esm2lite-convert,
esm2lite-export), each in its own process (tests/forkrun.py).

Every case is one row: a name, the files to create, the command line and the substrings the error
must contain (file name, row / FASTA record, column / field). One helper checks what every bad input
must give: exit status 2, exactly one non-empty line on stderr, no traceback, the substrings, and no
output left behind. A few rows are inputs that must be accepted (BOM, CRLF, truncation when asked).

Starting a CLI costs a few seconds (torch import), so the cases are started together, two at a time,
by a module fixture; each parametrised test then checks its own result.
"""

import argparse
import concurrent.futures
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import oracles

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOOLS = {"train": [str(ROOT / "train.py")], "infer": [str(ROOT / "infer.py")],
         "convert": ["-m", "esm2lite.commands.convert"], "export": ["-m", "esm2lite.commands.export"]}
WORKERS = 2  # this machine has 2 cores; each CLI start is mostly CPU-bound


# ---------------------------------------------------------------------------- file contents

def csv_text(header, *rows, eol="\n"):
    return eol.join([header, *rows]) + eol


GOOD = ["MKTAYIAKQRQISFVKSHFSRQ,0.5", "MKVLAAGIVGLLLAAC,1.5", "MSTNPKPQRKTKRNTNRRPQDVKFPGG,2.0",
        "MGSSHHHHHHSSGLVPRGSH,0.1"]
TRAIN = csv_text("sequence,target", *GOOD)
CLASSES = csv_text("sequence,target", "MKTAYIAKQR,a", "MKVLAAGIVG,b", "MSTNPKPQRK,a", "MGSSHHHHHH,b")
LONG = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMK"


class Payload:
    """Unpickling this runs `touch <marker>`: a .pt that would execute code if loaded unsafely."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def evil_pt(path, ctx):
    torch.save({"model": {}, "cfg": {"model": Payload(os.path.join(os.path.dirname(path), "PWNED"))}}, path)


def huge_pt(path, ctx):
    cfg = argparse.Namespace(encoder_layers=10**5, encoder_embed_dim=10**5, encoder_attention_heads=4)
    torch.save({"model": {}, "cfg": {"model": cfg}}, path)


def non_tensor_pt(path, ctx):
    cfg = argparse.Namespace(encoder_layers=2, encoder_embed_dim=64, encoder_attention_heads=4)
    torch.save({"model": {"encoder.embed_tokens.weight": [1, 2, 3]}, "cfg": {"model": cfg}}, path)


def truncated_copy(src):
    def make(path, ctx):
        data = Path(src.format(**ctx)).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
    return make


def hf_copy(drop=(), config=None, truncate=None):
    """A copy of the tiny HF checkpoint, with files dropped, config.json fields changed, or a file cut short."""
    def make(path, ctx):
        shutil.copytree(ctx["hf"], path)
        for name in drop:
            os.remove(os.path.join(path, name))
        if config is not None:
            cfg_path = os.path.join(path, "config.json")
            cfg = json.load(open(cfg_path))
            cfg.update(config)
            json.dump(cfg, open(cfg_path, "w"))
        if truncate is not None:
            f = os.path.join(path, truncate)
            data = open(f, "rb").read()
            open(f, "wb").write(data[: len(data) // 2])
    return make


def best_copy(drop=(), config=None, garbage=None, damage=None):
    """A copy of the trained run's best/ checkpoint, damaged."""
    def make(path, ctx):
        shutil.copytree(os.path.join(ctx["run"], "best"), path)
        if damage is not None:
            damage(Path(path) / "model.safetensors")
        for name in drop:
            os.remove(os.path.join(path, name))
        if config is not None:
            cfg_path = os.path.join(path, "config.json")
            cfg = json.load(open(cfg_path))
            config(cfg)
            json.dump(cfg, open(cfg_path, "w"))
        if garbage is not None:
            open(os.path.join(path, garbage), "wb").write(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    make.needs_run = True
    return make


def run_copy(damage):
    """A copy of the trained run directory (to --resume), one of its files damaged."""
    def make(path, ctx):
        shutil.copytree(ctx["run"], path, symlinks=True)
        damage(Path(path))
    make.needs_run = True
    return make


def flip_a_bit(path):
    """One bit of the last weight in a safetensors file: still a valid file, other numbers."""
    data = bytearray(path.read_bytes())
    data[-4] ^= 1  # the lowest mantissa byte of the last float32: finite, just different
    path.write_bytes(bytes(data))


def plant_nan(path):
    from safetensors.torch import load_file

    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, path, metadata={"format": "esm2lite-finetuned"})


def weights_of(step_or_best, how):
    return lambda run: how(run / step_or_best / "model.safetensors")


def fasta_of(n):
    return "".join(f">s{i}\n{GOOD[i % len(GOOD)].split(',')[0]}\n" for i in range(n))


def set_head_hidden(cfg):
    cfg["head"]["hidden"] = 10**12  # 64 * 1e12 floats: must be refused, not allocated


def add_target_name(cfg):
    cfg["labels"]["target_names"].append("extra")  # 2 targets named, the head has 1 output


def set_full_huge(cfg):
    cfg["mode"] = "full"
    cfg["model_config"].update(num_layers=10**5, d_model=10**5, ffn_dim=4 * 10**5)


# ---------------------------------------------------------------------------- the cases

@dataclass
class Case:
    name: str
    files: dict  # name (in the case directory) -> str | bytes | callable(path, ctx)
    argv: list  # tool name, then arguments; {d} = case directory, {hf} {hf2} {pt} {run} = shared inputs
    expect: list  # substrings of stderr ({d} etc. are filled in)
    outputs: list = field(default_factory=list)  # paths that must not exist afterwards (ok=True: must exist)
    ok: bool = False  # an input that must be accepted
    debug: bool = False  # --debug: the traceback is shown
    fsize: int | None = None  # a file-size limit (RLIMIT_FSIZE): writes beyond it fail, as on a full disk
    xfail: str | None = None

    def __repr__(self):
        return self.name


TRAIN_ARGS = ["--checkpoint", "{hf}", "--steps", "1", "--batch-tokens", "600", "--out", "{d}/out"]


def train(*args):
    return ["train", *args, *TRAIN_ARGS]


def train_ckpt(ckpt):  # good data, the given checkpoint
    return ["train", "--train-csv", "{d}/train.csv", "--checkpoint", ckpt, "--steps", "1",
            "--batch-tokens", "600", "--out", "{d}/out"]


def infer(*args, output="{d}/pred.csv"):
    return ["infer", *args, "--output", output]


def resume(out="{d}/run"):  # the trained run's own settings (RUN_CASE), continued in a copy
    return ["train", "--train-csv", "{rundir}/train.csv", "--checkpoint", "{hf}", "--steps", "1", "--batch-tokens",
            "600", "--max-residues", "60", "--truncate", "--lora-rank", "2", "--out", out, "--resume"]


def train_without_steps(*args):
    return ["train", "--train-csv", "{d}/train.csv", "--checkpoint", "{hf}", *args, "--out", "{d}/out"]


FASTA = ">s1 first\nMKTAYIAKQR\n>s2\nMKVLA\nAGIVG\n"


# ---------------------------------------------------------------- helpers of the never-destroy cases (issue 25 A)

def symlink(target):
    """A symbolic link to `target` ({d} etc. filled in; a bare name: relative to the link)."""
    def make(path, ctx):
        os.symlink(_fill(target, ctx), path)
    return make


def hardlink(target):
    def make(path, ctx):
        os.link(_fill(target, ctx), path)
    return make


def copy_of(src):
    def make(path, ctx):
        shutil.copy(_fill(src, ctx), path)
    return make


def empty_dir(path, ctx):
    os.makedirs(path)


def unchanged(run):
    """run_copy's damage that is none: the trained run as it is."""


def without_run_format(run):
    """The run's config.json as the version before the run format id wrote it."""
    cfg = json.loads((run / "config.json").read_text())
    del cfg["format"]
    (run / "config.json").write_text(json.dumps(cfg))


def finished_without_checkpoints(run):
    """A finished run whose step checkpoints the user deleted, with a file of the user's own."""
    shutil.rmtree(run / "checkpoints")
    (run / "notes.txt").write_text("x")
    (run / ".mine.tmp").write_text("x")


def best_based_on_a_copy(path, ctx):
    """The trained run's best/, its recorded base model moved to the case's own copy, base/."""
    shutil.copytree(os.path.join(ctx["run"], "best"), path)
    cfg = json.loads(Path(path, "config.json").read_text())
    cfg["base"]["path"] = os.path.join(ctx["d"], "base")
    Path(path, "config.json").write_text(json.dumps(cfg))
    digest = hashlib.sha256(Path(path, "config.json").read_bytes()).hexdigest()  # SHA256SUMS vouches for it
    sums = Path(path, "SHA256SUMS").read_text().splitlines()
    Path(path, "SHA256SUMS").write_text("".join(f"{digest}  config.json\n" if line.endswith("  config.json")
                                                else line + "\n" for line in sums))


best_based_on_a_copy.needs_run = True
# config.json of a run from before the format id: a run's settings, with its (empty) log beside it
LEGACY_RUN_CONFIG = json.dumps({"out": "out", "task": "regression", "mode": "lora", "grad_accum": 1, "world_size": 1})

CASES = [
    # ---------------------------------------------------------------- data files (train.py)
    Case("missing_file", {}, train("--train-csv", "{d}/nope.csv"), ["nope.csv", "no such file"], ["{d}/out"]),
    Case("empty_file", {"train.csv": ""}, train("--train-csv", "{d}/train.csv"), ["train.csv", "empty file"],
         ["{d}/out"]),
    Case("binary_file", {"train.csv": b"PK\x03\x04\x00\x00\x14\x00binary"}, train("--train-csv", "{d}/train.csv"),
         ["train.csv", "binary"], ["{d}/out"]),
    Case("non_utf8", {"train.csv": csv_text("sequence,target", "MKV,1", "MKV,caf\xe9").encode("latin-1")},
         train("--train-csv", "{d}/train.csv"), ["train.csv", "not UTF-8", "line 3"], ["{d}/out"]),
    Case("missing_column", {"train.csv": csv_text("sequence,label", "MKV,1")}, train("--train-csv", "{d}/train.csv"),
         ["train.csv", "no column 'target'", "'label'"], ["{d}/out"]),
    Case("duplicated_column", {"train.csv": csv_text("sequence,target,target", "MKV,1,2")},
         train("--train-csv", "{d}/train.csv"), ["train.csv", "row 1", "'target'", "more than once"], ["{d}/out"]),
    Case("unknown_residue", {"train.csv": csv_text("sequence,target", GOOD[0], "MKJL,1")},
         train("--train-csv", "{d}/train.csv"), ["train.csv", "row 3", "column 'sequence'", "'J'", "position 3"],
         ["{d}/out"]),
    Case("empty_sequence", {"train.csv": csv_text("sequence,target", GOOD[0], ",1")},
         train("--train-csv", "{d}/train.csv"), ["train.csv", "row 3", "column 'sequence'", "empty sequence"],
         ["{d}/out"]),
    Case("too_long", {"train.csv": TRAIN}, train("--train-csv", "{d}/train.csv", "--max-residues", "20"),
         ["train.csv", "row 2", "column 'sequence'", "22 residues", "maximum 20"], ["{d}/out"]),
    Case("nan_target", {"train.csv": csv_text("sequence,target", GOOD[0], "MKV,nan")},
         train("--train-csv", "{d}/train.csv"), ["train.csv", "row 3", "column 'target'", "'nan'", "finite"],
         ["{d}/out"]),
    Case("text_target", {"train.csv": csv_text("sequence,target", GOOD[0], "MKV,high")},
         train("--train-csv", "{d}/train.csv"), ["train.csv", "row 3", "column 'target'", "'high' is not a number"],
         ["{d}/out"]),
    Case("unseen_class", {"train.csv": CLASSES, "valid.csv": csv_text("sequence,target", "MKV,a", "MKV,c")},
         train("--train-csv", "{d}/train.csv", "--valid-csv", "{d}/valid.csv", "--task", "classification"),
         ["valid.csv", "row 3", "column 'target'", "'c'", "not seen in training"], ["{d}/out"]),
    Case("per_residue_labels_wrong_length",
         {"train.csv": csv_text("sequence,labels", "MKVLA,HHHEE", "MKVLA,HHEE")},
         train("--train-csv", "{d}/train.csv", "--task", "token-classification", "--target-column", "labels"),
         ["train.csv", "row 3", "column 'labels'", "4 per-residue labels", "5 residues"], ["{d}/out"]),
    Case("split_file_without_rows", {"train.csv": TRAIN, "valid.csv": "sequence,target\r\n\r\n"},
         train("--train-csv", "{d}/train.csv", "--valid-csv", "{d}/valid.csv"), ["valid.csv", "no data rows"],
         ["{d}/out"]),
    Case("split_column_without_train_rows",
         {"all.csv": csv_text("sequence,target,split", "MKV,1,valid", "MKV,2,test")},
         train("--csv", "{d}/all.csv"), ["all.csv", "split 'train' has no rows"], ["{d}/out"]),
    # ---------------------------------------------------------------- options (train.py)
    Case("lora_rank_zero", {"train.csv": TRAIN}, train("--train-csv", "{d}/train.csv", "--lora-rank", "0"),
         ["--lora-rank = 0", "1..128"], ["{d}/out"]),
    Case("head_dropout_above_one", {"train.csv": TRAIN}, train("--train-csv", "{d}/train.csv", "--head-dropout", "2"),
         ["--head-dropout must be in [0, 1)"], ["{d}/out"]),
    Case("negative_warmup", {"train.csv": TRAIN}, train("--train-csv", "{d}/train.csv", "--warmup-steps", "-3"),
         ["--warmup-steps must be 0 or more"], ["{d}/out"]),
    Case("best_metric_of_another_task", {"train.csv": TRAIN},
         train("--train-csv", "{d}/train.csv", "--best-metric", "accuracy"),
         ["--best-metric 'accuracy'", "task regression", "spearman"], ["{d}/out"]),
    Case("standardize_a_class_label", {"train.csv": CLASSES},
         train("--train-csv", "{d}/train.csv", "--task", "classification", "--standardize-targets"),
         ["--standardize-targets", "--task classification has labels"], ["{d}/out"]),
    Case("debug_shows_traceback", {"train.csv": csv_text("sequence,target", "MKJL,1")},
         train("--train-csv", "{d}/train.csv", "--debug"), ["Traceback", "DataError", "train.csv, row 2"],
         ["{d}/out"], debug=True),

    # ---------------------------------------------------------------- pretrained checkpoints (train.py, convert)
    Case("ckpt_missing_weights", {"train.csv": TRAIN, "ck": hf_copy(drop=["model.safetensors"])},
         train_ckpt("{d}/ck"), ["ck", "no model.safetensors"], ["{d}/out"]),
    Case("ckpt_missing_config", {"train.csv": TRAIN, "ck": hf_copy(drop=["config.json"])},
         train_ckpt("{d}/ck"), ["ck/config.json", "file not found"], ["{d}/out"]),
    Case("ckpt_truncated_safetensors", {"train.csv": TRAIN, "ck": hf_copy(truncate="model.safetensors")},
         train_ckpt("{d}/ck"), ["ck/model.safetensors", "corrupt or truncated"], ["{d}/out"]),
    Case("ckpt_config_disagrees_with_weights", {"train.csv": TRAIN, "ck": hf_copy(config={"intermediate_size": 100})},
         train_ckpt("{d}/ck"), ["ck", "do not fit the config", "layers.0.fc1.bias file (256,) vs model (100,)"],
         ["{d}/out"]),
    Case("ckpt_huge_config", {"train.csv": TRAIN, "ck": hf_copy(
        config={"num_hidden_layers": 10**6, "hidden_size": 10**5, "intermediate_size": 4 * 10**5})},
         train_ckpt("{d}/ck"), ["ck/config.json", "parameters, more than the"], ["{d}/out"]),
    Case("ckpt_malicious_pt", {"train.csv": TRAIN, "evil.pt": evil_pt}, train_ckpt("{d}/evil.pt"),
         ["evil.pt", "refused to unpickle", "system"], ["{d}/out", "{d}/PWNED"]),
    Case("train_out_unwritable", {"train.csv": TRAIN, "afile": "x"},
         train("--train-csv", "{d}/train.csv")[:-1] + ["{d}/afile/run"], ["afile"], ["{d}/afile/run"]),
    Case("convert_malicious_pt", {"evil.pt": evil_pt}, ["convert", "{d}/evil.pt", "{d}/out"],
         ["evil.pt", "refused to unpickle", "system"], ["{d}/out", "{d}/PWNED"]),
    Case("convert_truncated_pt", {"tiny.pt": truncated_copy("{pt}")}, ["convert", "{d}/tiny.pt", "{d}/out"],
         ["tiny.pt", "not a readable PyTorch checkpoint"], ["{d}/out"]),
    Case("convert_huge_config_pt", {"huge.pt": huge_pt}, ["convert", "{d}/huge.pt", "{d}/out"],
         ["huge.pt", "cfg.model", "parameters, more than the"], ["{d}/out"]),
    Case("convert_pt_with_non_tensor_entry", {"odd.pt": non_tensor_pt}, ["convert", "{d}/odd.pt", "{d}/out"],
         ["odd.pt", "'encoder.embed_tokens.weight'", "not a tensor"], ["{d}/out"]),
    Case("convert_out_unwritable", {"afile": "x"}, ["convert", "{pt}", "{d}/afile/out"], ["afile"],
         ["{d}/afile/out"]),

    # ---------------------------------------------------------------- inputs to predict (infer.py)
    Case("infer_missing_input", {}, infer("--run", "{run}", "--input", "{d}/nope.fasta"),
         ["nope.fasta", "no such file"], ["{d}/pred.csv"]),
    Case("infer_fasta_without_header", {"in.fasta": "MKTAYIAKQR\n>s2\nMKV\n"},
         infer("--run", "{run}", "--input", "{d}/in.fasta"), ["in.fasta", "line 1", "before the first '>'"],
         ["{d}/pred.csv"]),
    Case("infer_fasta_unknown_residue", {"in.fasta": ">s1\nMKTAYIAKQR\n>s2\nMKVLA\nAG*VG\n"},
         infer("--run", "{run}", "--input", "{d}/in.fasta"), ["in.fasta", "record 2", "'s2'", "line 5", "'*'"],
         ["{d}/pred.csv"]),
    Case("infer_csv_too_long", {"in.csv": csv_text("name,sequence", "a,MKV", f"b,{LONG}")},
         infer("--run", "{run}", "--input", "{d}/in.csv", "--id-column", "name", "--max-residues", "50"),
         ["in.csv", "row 3", "column 'sequence'", "maximum 50"], ["{d}/pred.csv"]),
    Case("infer_output_unwritable", {"in.fasta": FASTA, "afile": "x"},
         infer("--run", "{run}", "--input", "{d}/in.fasta", output="{d}/afile/pred.csv"), ["afile"],
         ["{d}/afile/pred.csv"]),
    Case("infer_other_base_model", {"in.fasta": FASTA},
         infer("--run", "{run}", "--base-path", "{hf2}", "--input", "{d}/in.fasta"),
         ["hf2", "another base model"], ["{d}/pred.csv"]),
    Case("infer_ckpt_missing_weights", {"in.fasta": FASTA, "ck": best_copy(drop=["model.safetensors"])},
         infer("--checkpoint", "{d}/ck", "--input", "{d}/in.fasta"), ["ck/model.safetensors", "not found"],
         ["{d}/pred.csv"]),
    Case("infer_ckpt_corrupt_safetensors", {"in.fasta": FASTA, "ck": best_copy(garbage="model.safetensors")},
         infer("--checkpoint", "{d}/ck", "--input", "{d}/in.fasta"), ["ck/model.safetensors", "corrupt"],
         ["{d}/pred.csv"]),
    Case("infer_ckpt_huge_head_in_config", {"in.fasta": FASTA, "ck": best_copy(config=set_head_hidden)},
         infer("--checkpoint", "{d}/ck", "--input", "{d}/in.fasta"), ["ck/config.json", "hidden"],
         ["{d}/pred.csv"]),
    Case("infer_ckpt_huge_full_model_config", {"in.fasta": FASTA, "ck": best_copy(config=set_full_huge)},
         infer("--checkpoint", "{d}/ck", "--input", "{d}/in.fasta"), ["ck/config.json", "parameters, more than"],
         ["{d}/pred.csv"]),
    Case("infer_ckpt_labels_disagree_with_head", {"in.fasta": FASTA, "ck": best_copy(config=add_target_name)},
         infer("--checkpoint", "{d}/ck", "--input", "{d}/in.fasta"), ["ck/config.json", "head.num_outputs is 1"],
         ["{d}/pred.csv"]),
    Case("infer_layers_too_deep", {"in.fasta": FASTA},
         ["infer", "--run", "{run}", "--input", "{d}/in.fasta", "--embeddings", "{d}/emb.safetensors", "--layers", "9"],
         ["--layers 9:", "layers are 0 (input embeddings) to 2"], ["{d}/emb.safetensors"]),
    Case("infer_batch_tokens_zero", {"in.fasta": FASTA},
         infer("--run", "{run}", "--input", "{d}/in.fasta", "--batch-tokens", "0"), ["--batch-tokens", "positive"],
         ["{d}/pred.csv"]),
    Case("infer_base_malicious_pt", {"in.fasta": FASTA, "evil.pt": evil_pt},
         ["infer", "--base", "{d}/evil.pt", "--input", "{d}/in.fasta", "--embeddings", "{d}/emb.safetensors"],
         ["evil.pt", "refused to unpickle"], ["{d}/emb.safetensors", "{d}/PWNED"]),

    # ---------------------------------------------------------------- export
    Case("export_missing_run", {}, ["export", "--run", "{d}/norun", "--merged", "{d}/m"], ["norun", "no best/"],
         ["{d}/m"]),
    Case("export_other_base_model", {}, ["export", "--run", "{run}", "--base-path", "{hf2}", "--merged", "{d}/m"],
         ["hf2", "another base model"], ["{d}/m"]),
    Case("export_out_unwritable", {"afile": "x"}, ["export", "--run", "{run}", "--merged", "{d}/afile/m"],
         ["afile"], ["{d}/afile/m"]),

    # ---------------------------------------------------------------- hostile environments and absurd options
    Case("train_disk_full_at_checkpoint", {"train.csv": TRAIN}, train("--train-csv", "{d}/train.csv"),
         ["{d}/out/checkpoints/step_1", "cannot write"], ["{d}/out/checkpoints/step_1", "{d}/out/best"], fsize=4096),
    Case("infer_disk_full_embeddings", {"in.fasta": fasta_of(40)},
         ["infer", "--run", "{run}", "--input", "{d}/in.fasta", "--embeddings", "{d}/emb.safetensors",
          "--per-residue"], ["{d}/emb.safetensors", "cannot write"], ["{d}/emb.safetensors"], fsize=4096),
    Case("infer_disk_full_predictions", {"in.fasta": fasta_of(300)}, infer("--run", "{run}", "--input", "{d}/in.fasta"),
         ["{d}/pred.csv", "cannot write"], ["{d}/pred.csv"], fsize=4096),
    Case("train_input_is_dev_zero", {}, train("--train-csv", "/dev/zero"), ["/dev/zero", "binary"], ["{d}/out"]),
    Case("infer_input_is_dev_zero", {}, infer("--run", "{run}", "--input", "/dev/zero"), ["/dev/zero", "binary"],
         ["{d}/pred.csv"]),
    Case("epochs_inf", {"train.csv": TRAIN}, train_without_steps("--epochs", "inf"), ["--epochs", "(0, 1e6]"],
         ["{d}/out"]),
    Case("lr_huge", {"train.csv": TRAIN}, train("--train-csv", "{d}/train.csv", "--lr", "1e300"),
         ["--lr must be a number in (0, 1]"], ["{d}/out"]),
    Case("head_hidden_huge", {"train.csv": TRAIN}, train("--train-csv", "{d}/train.csv", "--head-hidden", "100000000"),
         ["--head-hidden must be in 1..65536"], ["{d}/out"]),
    Case("seed_negative", {"train.csv": TRAIN}, train("--train-csv", "{d}/train.csv", "--seed", "-1"),
         ["--seed must be in 0 .. 2^32 - 1"], ["{d}/out"]),
    Case("device_cuda_without_gpu", {"train.csv": TRAIN}, train("--train-csv", "{d}/train.csv", "--device", "cuda"),
         ["--device cuda", "no CUDA device"], ["{d}/out"]),
    Case("device_bogus", {"train.csv": TRAIN}, train("--train-csv", "{d}/train.csv", "--device", "tpu:0"),
         ["--device 'tpu:0'", "expected cpu, cuda or cuda:N"], ["{d}/out"]),
    Case("infer_device_bogus", {"in.fasta": FASTA}, infer("--run", "{run}", "--input", "{d}/in.fasta", "--device", "gpu"),
         ["--device 'gpu'"], ["{d}/pred.csv"]),
    Case("train_out_not_utf8", {"train.csv": TRAIN}, train("--train-csv", "{d}/train.csv")[:-1] + ["{d}/out\udcff"],
         ["--out", "not valid UTF-8"], ["{d}/out\udcff"]),
    Case("infer_fasta_id_of_10_mb", {"in.fasta": ">" + "A" * 10**7 + "\nMKJL\n"},
         infer("--run", "{run}", "--input", "{d}/in.fasta"), ["in.fasta", "record 1", "characters)", "'J'"],
         ["{d}/pred.csv"]),
    Case("infer_output_is_the_input", {"in.csv": csv_text("sequence", "MKV")},
         infer("--run", "{run}", "--input", "{d}/in.csv", output="{d}/in.csv"), ["in.csv", "is also the input"]),
    Case("infer_bit_flipped_weights", {"in.fasta": FASTA, "ck": best_copy(damage=flip_a_bit)},
         infer("--checkpoint", "{d}/ck", "--input", "{d}/in.fasta"), ["{d}/ck/model.safetensors", "sha256"],
         ["{d}/pred.csv"]),
    Case("infer_nan_in_weights", {"in.fasta": FASTA, "ck": best_copy(damage=plant_nan)},
         infer("--checkpoint", "{d}/ck", "--input", "{d}/in.fasta"), ["{d}/ck/model.safetensors", "NaN"],
         ["{d}/pred.csv"]),
    Case("resume_bit_flipped_weights", {"run": run_copy(weights_of("checkpoints/step_1", flip_a_bit))}, resume(),
         ["{d}/run/checkpoints/step_1/model.safetensors", "sha256"]),
    Case("resume_nan_in_weights", {"run": run_copy(weights_of("checkpoints/step_1", plant_nan))}, resume(),
         ["{d}/run/checkpoints/step_1/model.safetensors", "NaN"]),
    Case("resume_damaged_trainer_state", {"run": run_copy(
        lambda run: (run / "checkpoints" / "step_1" / "trainer_state.json").write_text('{"step": 1, "epo'))},
         resume(), ["{d}/run/checkpoints/step_1/trainer_state.json", "not valid JSON"]),
    Case("resume_trainer_state_of_another_kind", {"run": run_copy(lambda run: save_file(
        {"rng.cpu.0": torch.zeros(3, dtype=torch.uint8)}, run / "checkpoints" / "step_1" / "trainer_state.safetensors"))},
         resume(), ["{d}/run/checkpoints/step_1/trainer_state.safetensors", "not a trainer state"]),
    Case("resume_damaged_run_config", {"run": run_copy(lambda run: (run / "config.json").write_bytes(b"\xff{"))},
         resume(), ["{d}/run/config.json", "not UTF-8"]),
    Case("resume_run_config_is_a_device", {"run": run_copy(
        lambda run: ((run / "config.json").unlink(), (run / "config.json").symlink_to("/dev/zero")))},
         resume(), ["{d}/run/config.json", "binary"]),

    # ---------------------------------------------------------------- never destroy what is not ours (issue 25 A)
    Case("train_out_holds_user_files",
         {"train.csv": TRAIN, "out/best/README.txt": "x", "out/plots/fig.png": "x", "out/config.json": "{}"},
         train("--train-csv", "{d}/train.csv"),
         ["{d}/out: is not a train.py run directory", "nothing in it was changed", "choose a new or empty --out"],
         ["{d}/out/.lock", "{d}/out/metrics.jsonl"]),
    Case("train_out_not_empty_without_config",
         {"train.csv": TRAIN, "out/notes.txt": "x", "out/.notes.txt.abcd1234.tmp": "x"},
         train("--train-csv", "{d}/train.csv"), ["{d}/out: is not empty and is not a train.py run directory"],
         ["{d}/out/.lock", "{d}/out/config.json"]),
    Case("train_out_is_the_base_model", {"train.csv": TRAIN, "base": hf_copy()},
         ["train", "--train-csv", "{d}/train.csv", "--checkpoint", "{d}/base", "--steps", "1", "--batch-tokens", "600",
          "--out", "{d}/base"], ["{d}/base: is also the base model (--checkpoint {d}/base)", "choose another --out"],
         ["{d}/base/.lock", "{d}/base/metrics.jsonl"]),
    Case("train_out_inside_the_base_model", {"train.csv": TRAIN, "base": hf_copy()},
         ["train", "--train-csv", "{d}/train.csv", "--checkpoint", "{d}/base", "--steps", "1", "--batch-tokens", "600",
          "--out", "{d}/base/../base/run"], ["{d}/base/../base/run: is inside the base model"], ["{d}/base/run"]),
    Case("train_out_is_a_link_to_the_base_model", {"train.csv": TRAIN, "base": hf_copy(), "link": symlink("{d}/base")},
         ["train", "--train-csv", "{d}/train.csv", "--checkpoint", "{d}/base", "--steps", "1", "--batch-tokens", "600",
          "--out", "{d}/link"], ["{d}/link: is also the base model (--checkpoint {d}/base)"],
         ["{d}/base/.lock", "{d}/base/metrics.jsonl"]),
    Case("train_data_file_is_a_file_of_the_run", {"train.csv": TRAIN, "out/predictions_test.csv": TRAIN},
         train("--train-csv", "{d}/train.csv", "--test-csv", "{d}/out/predictions_test.csv"),
         ["{d}/out/predictions_test.csv: is also a data file this run reads (--test-csv"],
         ["{d}/out/.lock", "{d}/out/config.json"]),
    Case("train_out_dangling_symlink",  # refused before the (broken) base model is read
         {"train.csv": TRAIN, "ck": hf_copy(drop=["model.safetensors"]), "out": symlink("nowhere")},
         train_ckpt("{d}/ck"), ["{d}/out: is a symbolic link to nowhere, which does not exist"], ["{d}/nowhere"]),
    Case("infer_output_is_a_file_of_the_checkpoint", {"in.fasta": FASTA, "run": run_copy(unchanged)},
         infer("--run", "{d}/run", "--input", "{d}/in.fasta", output="{d}/run/best/config.json"),
         ["{d}/run/best/config.json: is inside the checkpoint this command reads (--run {d}/run)",
          "choose another --output"], ["{d}/run/best/config.metrics.json"]),
    Case("infer_output_is_a_link_into_the_checkpoint",
         {"in.fasta": FASTA, "run": run_copy(unchanged), "pred.csv": symlink("{d}/run/best/config.json")},
         infer("--run", "{d}/run", "--input", "{d}/in.fasta"), ["{d}/pred.csv: is inside the checkpoint this command "
                                                                  "reads (--run {d}/run)"], ["{d}/pred.metrics.json"]),
    Case("infer_output_is_a_hard_link_to_a_file_of_the_run",
         {"in.fasta": FASTA, "run": run_copy(unchanged), "pred.csv": hardlink("{d}/run/summary.json")},
         infer("--checkpoint", "{d}/run/best", "--input", "{d}/in.fasta"),
         ["{d}/pred.csv: is also a file of the run this command reads (--checkpoint {d}/run/best)"],
         ["{d}/pred.metrics.json"]),
    Case("infer_output_inside_the_base_model", {"in.fasta": FASTA, "base": hf_copy(), "ck": best_copy()},
         infer("--checkpoint", "{d}/ck", "--base-path", "{d}/base", "--input", "{d}/in.fasta",
               output="{d}/base/pred.csv"), ["{d}/base/pred.csv: is inside the base model (--base-path {d}/base)"],
         ["{d}/base/pred.csv", "{d}/base/pred.metrics.json"]),
    Case("infer_output_inside_the_recorded_base_model", {"in.fasta": FASTA, "base": hf_copy(), "ck": best_based_on_a_copy},
         infer("--checkpoint", "{d}/ck", "--input", "{d}/in.fasta", output="{d}/base/pred.csv"),
         ["{d}/base/pred.csv: is inside the base model of the checkpoint this command reads (--checkpoint {d}/ck)"],
         ["{d}/base/pred.csv", "{d}/base/pred.metrics.json"]),
    Case("infer_embeddings_is_the_input", {"in.fasta": FASTA},
         ["infer", "--run", "{run}", "--input", "{d}/in.fasta", "--embeddings", "{d}/./in.fasta"],
         ["{d}/./in.fasta: is also the input (--input {d}/in.fasta)", "choose another --embeddings"]),
    Case("infer_score_output_is_the_wildtype_file",
         {"dms.csv": csv_text("mutant,mutated_sequence", "M1A,AKTAYIAKQR"), "wt.fasta": ">wt\nMKTAYIAKQR\n"},
         ["infer", "--base", "{pt}", "--score", "masked-marginal", "--input", "{d}/dms.csv", "--wildtype",
          "{d}/wt.fasta", "--output", "{d}/../infer_score_output_is_the_wildtype_file/wt.fasta"],
         ["wt.fasta: is also the wild-type file (--wildtype {d}/wt.fasta)"]),
    Case("infer_output_dangling_symlink",  # refused before the (wrong) base model is loaded
         {"in.fasta": FASTA, "pred.csv": symlink("nowhere.csv")},
         infer("--run", "{run}", "--base-path", "{hf2}", "--input", "{d}/in.fasta"),
         ["{d}/pred.csv: is a symbolic link to nowhere.csv, which does not exist"],
         ["{d}/nowhere.csv", "{d}/pred.metrics.json"]),
    Case("infer_embeddings_through_a_dangling_symlink", {"in.fasta": FASTA, "dl": symlink("nowhere")},
         ["infer", "--run", "{run}", "--input", "{d}/in.fasta", "--embeddings", "{d}/dl/emb.safetensors"],
         ["{d}/dl/emb.safetensors: passes through {d}/dl, a symbolic link to nowhere"], ["{d}/nowhere"]),
    Case("export_merged_replaces_the_run", {"run": run_copy(unchanged)},
         ["export", "--run", "{d}/run", "--merged", "{d}/run", "--overwrite"],
         ["{d}/run: holds the checkpoint this command reads (--run {d}/run)", "choose another --merged"]),
    Case("export_peft_inside_the_checkpoint", {"run": run_copy(unchanged)},
         ["export", "--run", "{d}/run", "--peft", "{d}/run/best/peft"],
         ["{d}/run/best/peft: is inside the checkpoint this command reads"], ["{d}/run/best/peft"]),
    Case("export_merged_is_the_base_model", {"run": run_copy(unchanged), "base": hf_copy()},
         ["export", "--run", "{d}/run", "--base-path", "{d}/base", "--merged", "{d}/base", "--overwrite"],
         ["{d}/base: is also the base model (--base-path {d}/base)"]),
    Case("export_merged_dangling_symlink", {"m": symlink("nowhere")}, ["export", "--run", "{run}", "--merged", "{d}/m"],
         ["{d}/m: is a symbolic link to nowhere"], ["{d}/nowhere"]),
    Case("convert_output_is_the_input", {"base": hf_copy()}, ["convert", "{d}/base", "{d}/./base", "--overwrite"],
         ["{d}/./base: is also the input ({d}/base)"]),
    Case("convert_output_holds_the_input", {"dir/tiny.pt": copy_of("{pt}")},
         ["convert", "{d}/dir/tiny.pt", "{d}/dir", "--overwrite"], ["{d}/dir: holds the input ({d}/dir/tiny.pt)"]),
    Case("convert_output_dangling_symlink", {"out": symlink("nowhere")}, ["convert", "{pt}", "{d}/out"],
         ["{d}/out: is a symbolic link to nowhere"], ["{d}/nowhere"]),
    # accepted: directories that are ours
    Case("train_fresh_on_an_empty_directory", {"train.csv": TRAIN, "out": empty_dir}, train("--train-csv", "{d}/train.csv"),
         [], ["{d}/out/best/model.safetensors"], ok=True),
    Case("train_fresh_on_a_finished_run_without_checkpoints", {"run": run_copy(finished_without_checkpoints)},
         resume()[:-1], [], ["{d}/run/checkpoints/step_1", "{d}/run/notes.txt", "{d}/run/.mine.tmp"], ok=True),
    Case("train_fresh_on_a_run_of_the_previous_version",
         {"train.csv": TRAIN, "out/config.json": LEGACY_RUN_CONFIG, "out/metrics.jsonl": "",
          "out/.config.json.abcd1234.tmp": "x", "out/.mine.tmp": "x"},
         train("--train-csv", "{d}/train.csv"), [], ["{d}/out/best/model.safetensors", "{d}/out/.mine.tmp"], ok=True),
    Case("resume_a_run_of_the_previous_version", {"run": run_copy(without_run_format)}, resume(), [],
         ["{d}/run/summary.json"], ok=True),

    # ---------------------------------------------------------------- inputs that changed; ranks that disagree (issue 25 B)
    # A copy of the trained run, resumed with its training CSV or base model changed since it started: the copy's
    # config.json names the case's own copy of that input ({d}/train.csv, {d}/ck), which is then changed. Refused
    # before anything is done, in one line naming the file or the base and what changed. (Kill-then-resume, a file
    # edited during a run, and ranks that disagree: tests/training/test_interrupt.py, tests/training/test_distributed.py.)
    Case("resume_train_csv_edited", {
        "run": run_copy(lambda run: json.dump({**json.load(open(run / "config.json")),
                                               "train_csv": str(run.parent / "train.csv")}, open(run / "config.json", "w"))),
        "train.csv": lambda path, ctx: Path(path).write_bytes(
            Path(ctx["rundir"], "train.csv").read_bytes().replace(b",0.5\r\n", b",0.7\r\n"))},
         [a.replace("{rundir}", "{d}") for a in resume()],
         ["{d}/train.csv: changed since this run started (was sha256 ", ", 5 rows; now sha256 ", "another --out"]),
    Case("resume_train_csv_rows_deleted", {
        "run": run_copy(lambda run: json.dump({**json.load(open(run / "config.json")),
                                               "train_csv": str(run.parent / "train.csv")}, open(run / "config.json", "w"))),
        "train.csv": lambda path, ctx: Path(path).write_bytes(b"\r\n".join(
            line for line in Path(ctx["rundir"], "train.csv").read_bytes().split(b"\r\n") if not line.endswith(b",0.1")))},
         [a.replace("{rundir}", "{d}") for a in resume()],
         ["{d}/train.csv: changed since this run started", ", 5 rows; now sha256 ", ", 4 rows)"]),
    Case("resume_base_weights_replaced", {
        "run": run_copy(lambda run: json.dump({**json.load(open(run / "config.json")), "checkpoint": str(run.parent / "ck")},
                                              open(run / "config.json", "w"))),
        "ck": lambda path, ctx: shutil.copytree(ctx["hf2"], path)},
         [{"{hf}": "{d}/ck"}.get(a, a) for a in resume()],
         ["{d}/ck: base model encoder weights differ from the ones this run started with (sha256 ", "another --out"]),
    Case("resume_base_config_changed", {
        "run": run_copy(lambda run: json.dump({**json.load(open(run / "config.json")), "checkpoint": str(run.parent / "ck")},
                                              open(run / "config.json", "w"))),
        "ck": hf_copy(config={"layer_norm_eps": 1e-6})},
         [{"{hf}": "{d}/ck"}.get(a, a) for a in resume()],
         ["{d}/ck: base model config differs from the one this run started with (layer_norm_eps is 1e-06, was 1e-05)"]),
    Case("resume_a_run_from_before_dist_timeout", {"run": run_copy(lambda run: json.dump(
        {k: v for k, v in json.load(open(run / "config.json")).items() if k != "dist_timeout"},
        open(run / "config.json", "w")))}, resume(), [], ["{d}/run/summary.json"], ok=True),
    Case("infer_base_config_token_dropout_changed", {"in.fasta": FASTA, "ck": hf_copy(config={"token_dropout": False})},
         infer("--run", "{run}", "--base-path", "{d}/ck", "--input", "{d}/in.fasta"),
         ["{d}/ck: base model config differs from the one the checkpoint was trained on (token_dropout is False, "
          "was True)"], ["{d}/pred.csv"]),
    Case("infer_base_config_layer_norm_eps_changed", {"in.fasta": FASTA, "ck": hf_copy(config={"layer_norm_eps": 1e-6})},
         infer("--run", "{run}", "--base-path", "{d}/ck", "--input", "{d}/in.fasta"),
         ["{d}/ck: base model config differs", "(layer_norm_eps is 1e-06, was 1e-05)"], ["{d}/pred.csv"]),
    Case("export_base_config_changed", {"ck": hf_copy(config={"token_dropout": False})},
         ["export", "--run", "{run}", "--base-path", "{d}/ck", "--merged", "{d}/m"],
         ["{d}/ck: base model config differs", "(token_dropout is False, was True)"], ["{d}/m"]),
    Case("dist_timeout_zero", {"train.csv": TRAIN}, train("--train-csv", "{d}/train.csv", "--dist-timeout", "0"),
         ["--dist-timeout must be a number of seconds in 1 .. 604800"], ["{d}/out"]),

    # ---------------------------------------------------------------- bounded reading, numbers, BioNeMo's QKV flag (issue 25 C)
    # Each of these hung, ran for minutes or ended in a MemoryError or a silent wrong result before; now one line,
    # in seconds (forkrun's 300 s SIGKILL bounds a regression to a hang). A checkpoint reads only regular files
    # inside its directory, hashes in bounded chunks, and checks config.json's sha256 before building from it.
    Case("ckpt_weights_link_to_dev_zero", {"in.fasta": FASTA, "ck": best_copy(
        damage=lambda p: (p.unlink(), p.symlink_to("/dev/zero")))},
         infer("--checkpoint", "{d}/ck", "--input", "{d}/in.fasta"),
         ["{d}/ck/model.safetensors", "outside the checkpoint directory"], ["{d}/pred.csv"]),
    Case("ckpt_sums_entry_is_a_fifo", {"in.fasta": FASTA, "ck": best_copy(damage=lambda p: (
        os.mkfifo(p.parent / "notes.txt"), open(p.parent / "SHA256SUMS", "a").write("0" * 64 + "  notes.txt\n")))},
         infer("--checkpoint", "{d}/ck", "--input", "{d}/in.fasta"),
         ["{d}/ck/notes.txt", "not a regular file", "FIFO"], ["{d}/pred.csv"]),
    Case("ckpt_sums_is_dev_zero", {"in.fasta": FASTA, "ck": best_copy(damage=lambda p: (
        (p.parent / "SHA256SUMS").unlink(), (p.parent / "SHA256SUMS").symlink_to("/dev/zero")))},
         infer("--checkpoint", "{d}/ck", "--input", "{d}/in.fasta"),
         ["{d}/ck/SHA256SUMS", "character device", "/dev/zero"], ["{d}/pred.csv"]),
    Case("ckpt_base_config_of_a_million_layers", {"train.csv": TRAIN, "ck": hf_copy(config={"num_hidden_layers": 10**6})},
         train_ckpt("{d}/ck"), ["ck/config.json", "field num_hidden_layers is 1000000", "512 layers"], ["{d}/out"]),
    Case("infer_ckpt_config_of_100k_layers", {"in.fasta": FASTA, "ck": best_copy(  # full: built from the config
        config=lambda cfg: (cfg.update(mode="full"), cfg["model_config"].update(num_layers=10**5)))},
         infer("--checkpoint", "{d}/ck", "--input", "{d}/in.fasta"),
         ["{d}/ck/config.json", "num_layers is 100000", "512 layers"], ["{d}/pred.csv"]),
    Case("infer_ckpt_config_changed_after_writing", {"in.fasta": FASTA, "ck": best_copy(  # within budget: its sha256
        config=lambda cfg: (cfg.update(mode="full"), cfg["model_config"].update(num_layers=400)))},  # refuses it
         infer("--checkpoint", "{d}/ck", "--input", "{d}/in.fasta"),
         ["{d}/ck/config.json", "sha256 differs", "SHA256SUMS"], ["{d}/pred.csv"]),
    Case("standardize_target_of_1e308", {"train.csv": TRAIN + "MKVLAAGIVG,1e308\n"},
         train("--train-csv", "{d}/train.csv", "--standardize-targets"),
         ["train.csv", "row 6", "column 'target'", "'1e308'", "too large", "float32"], ["{d}/out"]),
    Case("valid_target_of_1e308", {"train.csv": TRAIN, "valid.csv": csv_text("sequence,target", "MKV,1", "MKV,1e308")},
         train("--train-csv", "{d}/train.csv", "--valid-csv", "{d}/valid.csv"),
         ["valid.csv", "row 3", "column 'target'", "'1e308'", "too large"], ["{d}/out"]),
    Case("standardize_statistics_too_large", {"train.csv": csv_text("sequence,target", "MKV,3e38", "MKVL,-3e38")},
         train("--train-csv", "{d}/train.csv", "--standardize-targets"),
         ["train.csv", "column 'target'", "standard deviation", "--standardize-targets"], ["{d}/out"]),
    Case("nonfinite_loss_before_any_checkpoint", {"train.csv": csv_text("sequence,target", "MKV,1e38", "MKVL,-1e38")},
         train("--train-csv", "{d}/train.csv"),
         ["non-finite training loss at step 1", "no checkpoint had been written yet"],
         ["{d}/out/checkpoints", "{d}/out/best"]),
    Case("train_csv_last_row_partly_written", {"train.csv": TRAIN + "MKVLAAGIVG,1."},
         train("--train-csv", "{d}/train.csv"), ["train.csv", "line 6", "no line end", "still being written"],
         ["{d}/out"]),
    Case("infer_fasta_last_record_partly_written", {"in.fasta": ">s1\nMKTAYIAKQR\n>s2\nMKVL"},
         infer("--run", "{run}", "--input", "{d}/in.fasta"), ["in.fasta", "line 4", "no line end"], ["{d}/pred.csv"]),
    Case("bionemo_qkv_not_interleaved", {"train.csv": TRAIN, "nv": lambda path, ctx: oracles.make_bionemo_checkpoint(
        path, ctx["hf"], qkv_weight_interleaved=False)},
         train_ckpt("{d}/nv"), ["nv", "field qkv_weight_interleaved is false", "refuses to guess"], ["{d}/out"]),

    # ---------------------------------------------------------------- inputs that must be accepted
    Case("infer_bom_crlf_csv_and_truncation",
         {"in.csv": ("\ufeff" + csv_text("name,sequence", "a,MKV", f"b,{LONG}", eol="\r\n")).encode()},
         infer("--run", "{run}", "--input", "{d}/in.csv", "--id-column", "name", "--max-residues", "50",
               "--truncate"), [], ["{d}/pred.csv"], ok=True),
]

# The trained run the infer/export cases use: a BOM + CRLF training CSV with one over-long sequence
# and --truncate, which must be accepted (train.py, CSV with BOM/CRLF, truncation when asked).
RUN_CASE = Case("train_bom_crlf_and_truncation",
                {"train.csv": ("\ufeff" + csv_text("sequence,target", *GOOD, f"{LONG},3.0", eol="\r\n")).encode()},
                ["train", "--train-csv", "{d}/train.csv", "--checkpoint", "{hf}", "--steps", "1",
                 "--batch-tokens", "600", "--max-residues", "60", "--truncate", "--lora-rank", "2",
                 "--out", "{d}/run"], [], ["{d}/run/best/model.safetensors"], ok=True)


# ---------------------------------------------------------------------------- running

def _fill(s, ctx):
    return s.format(**ctx)


def _setup(case, d, ctx):
    os.makedirs(d)
    for name, content in case.files.items():
        path = os.path.join(d, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if callable(content):
            content(path, ctx)
        elif isinstance(content, bytes):
            Path(path).write_bytes(content)
        else:
            Path(path).write_bytes(content.encode())


def _run(forkrun, case, d, ctx):
    """The case's command in its own process (forkrun: a child of a process that imported torch
    once; case.fsize: writes past that many bytes fail with EFBIG, as writes to a full disk fail)."""
    ctx = {**ctx, "d": d}
    _setup(case, d, ctx)
    tool, *args = case.argv
    return forkrun.run([*TOOLS[tool], *(_fill(a, ctx) for a in args)], cwd=d, fsize=case.fsize), ctx


@pytest.fixture(scope="module")
def battery(request, tmp_path_factory, hf_tiny, fair_tiny, forkrun):
    """Start every selected case (the trained run first: the infer/export cases wait for it)."""
    base = tmp_path_factory.mktemp("bad_input")
    hf2 = oracles.make_hf_checkpoint(base / "hf2", **oracles.TINY, seed=9)
    ctx = {"hf": hf_tiny, "hf2": hf2, "pt": fair_tiny}
    selected = {item.callspec.params["case"].name for item in request.session.items
                if getattr(item, "callspec", None) and isinstance(item.callspec.params.get("case"), Case)}
    pool = concurrent.futures.ThreadPoolExecutor(WORKERS)
    run_future = pool.submit(_run, forkrun, RUN_CASE, str(base / RUN_CASE.name), ctx)

    def needs_run(case):
        return (any("{run}" in a for a in case.argv)
                or any(getattr(c, "needs_run", False) for c in case.files.values()))

    def job(case):
        c = ctx
        if needs_run(case):
            proc, run_ctx = run_future.result()
            assert proc.returncode == 0, proc.stderr[-3000:]
            c = {**ctx, "run": _fill("{d}/run", run_ctx), "rundir": run_ctx["d"]}
        return _run(forkrun, case, str(base / case.name), c)

    futures = {RUN_CASE.name: run_future}
    for case in CASES:
        if case.name in selected:
            futures[case.name] = pool.submit(job, case)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def check_result(case, proc, ctx):
    """What every rejected input must give (and what every accepted one must)."""
    where = f"[{case.name}] stderr:\n{proc.stderr[-3000:]}"
    outputs = [_fill(p, ctx) for p in case.outputs]
    if case.ok:
        assert proc.returncode == 0, where
        for p in outputs:
            assert os.path.exists(p), f"{p} not written; {where}"
        return
    if case.debug:  # the error is re-raised: Python's own exit status 1, with the traceback
        assert proc.returncode != 0 and "Traceback" in proc.stderr, where
    else:
        assert proc.returncode == 2, f"exit status {proc.returncode}; {where}"
    for p in outputs:
        assert not os.path.exists(p), f"{p} exists after a failed run; {where}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    for s in case.expect:
        assert _fill(s, ctx) in proc.stderr, f"{s!r} not in stderr; {where}"
    if case.debug:
        return
    assert len(lines) == 1, f"{len(lines)} lines on stderr; {where}"
    assert len(lines[0]) < 1000, f"an error line of {len(lines[0])} characters; {where}"
    assert "Traceback" not in proc.stderr and lines[0].startswith("error: "), where


def _param(case):
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_cli(case, battery):
    proc, ctx = battery[case.name].result()
    check_result(case, proc, ctx)
    if case.name == "infer_bom_crlf_csv_and_truncation":
        rows = Path(ctx["d"], "pred.csv").read_text().splitlines()
        assert rows[0].startswith("id,sequence,prediction") and [r.split(",")[0] for r in rows[1:]] == ["a", "b"]


def test_training_accepts_bom_crlf_and_truncates_when_asked(battery):
    proc, ctx = battery[RUN_CASE.name].result()
    check_result(RUN_CASE, proc, ctx)


# ---------------------------------------------------------------- never destroy what is not ours (issue 25 A)

def tree(top) -> dict:
    """{relative path: bytes} of every file under `top` (hidden ones included; links read through)."""
    top = Path(top)
    return {str(p.relative_to(top)): p.read_bytes() for p in sorted(top.rglob("*")) if p.is_file()}


def holds_only(sub, files):
    """The check that the case directory's `sub` holds exactly these files, as they were written."""
    def check(d, ctx):
        assert tree(d / sub) == {name: text.encode() for name, text in files.items()}
    return check


def base_as_it_was(d, ctx):
    assert tree(d / "base") == tree(ctx["hf"])


def run_as_it_was(d, ctx):
    assert tree(d / "run") == tree(ctx["run"])


def base_and_run_as_they_were(d, ctx):
    base_as_it_was(d, ctx)
    run_as_it_was(d, ctx)


def pt_as_it_was(d, ctx):
    assert tree(d / "dir") == {"tiny.pt": Path(ctx["pt"]).read_bytes()}


def user_files_kept(d, ctx):
    assert (d / "run" / "notes.txt").read_text() == "x" and (d / "run" / ".mine.tmp").read_text() == "x"


def previous_version_taken_over(d, ctx):
    assert json.loads((d / "out" / "config.json").read_text())["format"] == "esm2lite-run"
    assert not (d / "out" / ".config.json.abcd1234.tmp").exists()  # a temporary of ours: removed
    assert (d / "out" / ".mine.tmp").read_text() == "x"  # the user's own hidden file: kept


def resumed(d, ctx):
    assert "resumed from" in ctx["stdout"]


# What each case must leave as it found it (or, when accepted, what it must keep).
AFTER = {
    "train_out_holds_user_files": holds_only("out", {"best/README.txt": "x", "plots/fig.png": "x", "config.json": "{}"}),
    "train_out_not_empty_without_config": holds_only("out", {"notes.txt": "x", ".notes.txt.abcd1234.tmp": "x"}),
    "train_out_is_the_base_model": base_as_it_was,
    "train_out_inside_the_base_model": base_as_it_was,
    "train_out_is_a_link_to_the_base_model": base_as_it_was,
    "train_data_file_is_a_file_of_the_run": holds_only("out", {"predictions_test.csv": TRAIN}),
    "infer_output_is_a_file_of_the_checkpoint": run_as_it_was,
    "infer_output_is_a_link_into_the_checkpoint": run_as_it_was,
    "infer_output_is_a_hard_link_to_a_file_of_the_run": run_as_it_was,
    "infer_output_inside_the_base_model": base_as_it_was,
    "infer_output_inside_the_recorded_base_model": base_as_it_was,
    "export_merged_replaces_the_run": run_as_it_was,
    "export_peft_inside_the_checkpoint": run_as_it_was,
    "export_merged_is_the_base_model": base_and_run_as_they_were,
    "convert_output_is_the_input": base_as_it_was,
    "convert_output_holds_the_input": pt_as_it_was,
    "train_fresh_on_a_finished_run_without_checkpoints": user_files_kept,
    "train_fresh_on_a_run_of_the_previous_version": previous_version_taken_over,
    "resume_a_run_of_the_previous_version": resumed,
}


@pytest.mark.parametrize("case", [_param(c) for c in CASES if c.name in AFTER])
def test_what_is_not_ours_is_left_as_it_was(case, battery):
    """Beyond check_result: the user's files, the base model and the checkpoint read are unchanged, byte for
    byte (and an accepted directory keeps the files that are not the run's)."""
    proc, ctx = battery[case.name].result()
    check_result(case, proc, ctx)
    AFTER[case.name](Path(ctx["d"]), {**ctx, "stdout": proc.stdout})
