"""Fine-tuning ESM C through train.py (issue 26): a tiny random ESM C (saved by transformers'
EsmcForMaskedLM) learns a synthetic property with LoRA on all seven of its linears; a SIGKILL at a
random moment, then --resume, gives exactly the uninterrupted weights; full and head modes train and
infer.py reproduces their validation metrics."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from esm2lite.demo import gravy, make_data

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TRAIN, INFER = str(ROOT / "train.py"), str(ROOT / "infer.py")
STEPS = 30


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("esmc_train")
    torch.manual_seed(0)
    model = transformers.EsmcForMaskedLM(transformers.EsmcConfig(
        vocab_size=64, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4)).eval()
    model.save_pretrained(d / "esmc")
    rng = random.Random(12)
    seqs = [make_data.sequence(rng, rng.random(), rng.randint(15, 40)) for _ in range(64)]  # 20 standard residues
    with open(d / "d.csv", "w") as f:  # the demo's property: mean hydropathy, learnable from a mean-pooled head
        f.write("sequence,target,split\n")
        f.writelines(f"{s},{gravy(s)},{'train' if i < 48 else 'valid'}\n" for i, s in enumerate(seqs))
    args = lambda out, mode="lora": [  # noqa: E731
        "--csv", str(d / "d.csv"), "--checkpoint", str(d / "esmc"), "--mode", mode, "--steps", str(STEPS),
        "--batch-tokens", "400", "--lr", "5e-3", "--eval-every", "10", "--save-every", "2", "--log-every", "1",
        *(["--lora-dropout", "0.1"] if mode == "lora" else []), "--seed", "2", "--keep-last", "100", "--schedule", "constant", "--device", "cpu",
        "--out", str(out)]
    ref = d / "reference"
    t0 = time.time()
    r = subprocess.run([sys.executable, TRAIN, *args(ref)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return args, ref, time.time() - t0


def valid_losses(out):
    return [x["loss"] for x in map(json.loads, open(out / "metrics.jsonl")) if x["split"] == "valid"]


def test_lora_on_every_esm_c_linear_learns(setup):
    _, ref, _ = setup
    config = json.loads((ref / "best" / "config.json").read_text())
    assert config["lora"]["targets"] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert config["model_config"]["family"] == "esmc"
    adapters = load_file(ref / "best" / "model.safetensors")
    assert {k.split(".")[-2] for k in adapters if k.startswith("encoder.")} == {"q", "k", "v", "o", "gate", "up", "down"}
    losses = valid_losses(ref)
    assert losses[-1] < 0.5 * losses[0], losses  # held-out rows: it learned GRAVY, not the rows


def test_sigkill_then_resume_gives_the_uninterrupted_weights(setup, tmp_path, forkrun):
    args, ref, duration = setup
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, TRAIN, *args(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(3).uniform(0.4, 0.9) * duration)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = forkrun.run([TRAIN, *args(out), "--resume"])  # the whole command: a kill may come before config.json
    assert r.returncode == 0, r.stderr[-2000:]
    a = load_file(ref / "checkpoints" / f"step_{STEPS}" / "model.safetensors")
    b = load_file(out / "checkpoints" / f"step_{STEPS}" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("mode", ["full", "head"])
def test_full_and_head_modes_train_and_predict(setup, tmp_path, mode, forkrun):
    args, _, _ = setup
    out = tmp_path / mode
    r = forkrun.run([TRAIN, *args(out, mode)[:-2], "--steps", "4", "--eval-every", "4", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    data = args(out)[1]
    r = forkrun.run([INFER, "--run", str(out), "--input", data, "--output", str(tmp_path / "p.csv")])
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((tmp_path / "p.metrics.json").read_text())["splits"]["valid"]
    summary = json.loads((out / "summary.json").read_text())["valid"]
    # the same rows scored by training and by infer.py (merged or not: rounding only, 1e-5 relative)
    assert metrics["loss"] == pytest.approx(summary["loss"], rel=1e-5)


def test_merged_and_peft_exports_load_in_transformers(setup, tmp_path, forkrun):
    """esm2lite-export --merged of the LoRA run: an EsmcForMaskedLM directory whose hidden states and
    logits, in transformers, are the fine-tuned encoder's (esm2lite's, adapters unmerged), to fp32
    rounding against transformers' float64 run; the --peft export, loaded by peft onto EsmcForMaskedLM
    of the base, gives the merged export's hidden states."""
    import oracles
    from esm2lite import Tokenizer
    from esm2lite.checkpoints.loading import load_model

    _, ref, _ = setup
    out = tmp_path / "merged"
    r = forkrun.run([str(ROOT / "esm2lite" / "commands" / "export.py"), "--run", str(ref), "--merged", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    hf = transformers.EsmcForMaskedLM.from_pretrained(out).eval()
    ours = load_model(str(ref / "best"), merge=False).encoder
    tokens = Tokenizer().batch_encode(["MKTAYIAKQRQISFVKSHFSRQ", "GSHMLEDPVAGG"])
    mask = (tokens != 1).long()
    with torch.no_grad():
        want, want64 = (m(input_ids=tokens, attention_mask=mask) for m in (hf, oracles.float64_copy(hf)))
        got = ours(tokens)
    oracles.assert_fp32_agrees(got["logits"], want.logits, want64.logits, tokens != 1, what="merged logits")
    peft_dir = tmp_path / "peft"
    r = forkrun.run([str(ROOT / "esm2lite" / "commands" / "export.py"), "--run", str(ref), "--peft", str(peft_dir)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "checked with peft" in r.stdout and "for transformers' EsmcForMaskedLM" in r.stdout
    import peft

    base_dir = json.loads((ref / "best" / "config.json").read_text())["base"]["path"]  # the ESM C it was tuned from
    base = transformers.EsmcForMaskedLM.from_pretrained(base_dir).eval()
    adapted = peft.PeftModel.from_pretrained(base, str(peft_dir)).eval()
    with torch.no_grad():
        hidden = adapted.base_model.model.esmc(input_ids=tokens, attention_mask=mask).last_hidden_state
        merged = hf.esmc(input_ids=tokens, attention_mask=mask).last_hidden_state
        merged64 = oracles.float64_copy(hf).esmc(input_ids=tokens, attention_mask=mask).last_hidden_state
    # peft adds x A^T B^T beside the frozen W; the merged export holds W + s B A: rounding apart
    oracles.assert_fp32_agrees(hidden, merged, merged64, tokens != 1, what="peft vs merged hidden states")


@pytest.mark.parametrize("task", ["classification", "token-classification"])
def test_every_task_trains_on_esm_c_and_predicts(setup, tmp_path, task, forkrun):
    """The other two tasks on ESM C: train.py runs, and infer.py on the same rows reproduces the
    validation loss training reported (per class and confusion matrix included)."""
    rng = random.Random(4)
    rows = []
    for i in range(40):
        s = make_data.sequence(rng, rng.random(), rng.randint(12, 30))
        ss = "".join("H" if c in "AELMQKR" else "E" if c in "VIYFWT" else "C" for c in s)
        rows.append(f"{s},{'oily' if gravy(s) > 0 else 'polar'},{ss},{'train' if i < 30 else 'valid'}\n")
    data = tmp_path / "d.csv"
    data.write_text("sequence,kind,ss,split\n" + "".join(rows))
    esmc = json.loads((setup[1] / "best" / "config.json").read_text())["base"]["path"]
    out = tmp_path / "run"
    r = forkrun.run([TRAIN, "--csv", str(data), "--checkpoint", esmc, "--task", task, "--target-column",
                     "kind" if task == "classification" else "ss", "--steps", "4", "--eval-every", "4",
                     "--batch-tokens", "400", "--lr", "5e-3", "--device", "cpu", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    r = forkrun.run([INFER, "--run", str(out), "--input", str(data), "--output", str(tmp_path / "p.csv")])
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((tmp_path / "p.metrics.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert metrics["splits"]["valid"]["loss"] == pytest.approx(summary["valid"]["loss"], rel=1e-5)  # rounding only
    assert metrics["confusion_matrix"]["valid"] == summary["confusion_matrix"]["valid"]


def test_bionemo_lora_options_on_esm_c(setup, tmp_path, forkrun):
    """--lora-layers, --lora-init-a/-b and --lora-tie-weights on ESM C, as on ESM-2: one adapter pair
    per target, shared by the selected blocks, stored once under the first; B starts at zero."""
    args, _, _ = setup
    out = tmp_path / "tied"
    r = forkrun.run([TRAIN, *args(out)[:-2], "--steps", "2", "--lora-layers", "0", "1", "--lora-init-a", "xavier",
                     "--lora-tie-weights", "--lora-targets", "q", "down", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    stored = load_file(out / "best" / "model.safetensors")
    assert sorted(k for k in stored if k.startswith("encoder.")) == [
        "encoder.layers.0.attn.q.lora_a", "encoder.layers.0.attn.q.lora_b",
        "encoder.layers.0.down.lora_a", "encoder.layers.0.down.lora_b"]
    r = forkrun.run([TRAIN, *args(tmp_path / "bad")[:-2], "--steps", "1", "--lora-targets", "query",
                     "--out", str(tmp_path / "bad")])
    assert r.returncode != 0 and r.stderr.strip() == \
        "error: --lora-targets: query not linears of this model (its targets: q k v o gate up down)"
