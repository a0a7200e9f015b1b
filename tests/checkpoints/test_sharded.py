"""Full fine-tunes are stored as torch.distributed.checkpoint shards: they load back into the
same weights, in a plain process, and damaged or mismatched ones fail with one clear error."""

import os
import shutil
from pathlib import Path

import pytest
import torch

import oracles
from esm2lite.checkpoints.checkpoint_dir import load_weights
from esm2lite.checkpoints.loading import load_model
from esm2lite.errors import CheckpointError
from esm2lite.data.records import records_from_pairs
from esm2lite.training.loop import TrainConfig, train_model
from esm2lite import load_pretrained

ROOT = Path(__file__).resolve().parents[2]


def pairs(n, seed):
    return [(s, len(s) / 50) for s in oracles.random_sequences(n, 15, 50, seed=seed, with_mask=False)]


@pytest.fixture(scope="module")
def full_run(hf_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    cfg = TrainConfig(checkpoint=hf_tiny, out=str(out), mode="full", steps=3, batch_tokens=600, lr=1e-2, seed=2)
    train_model(cfg, records={"train": records_from_pairs(pairs(20, 1)), "valid": records_from_pairs(pairs(6, 2))})
    return out


def test_full_checkpoint_is_sharded_and_loads_the_trained_weights(full_run, hf_tiny):

    best = full_run / "best"
    shards = os.listdir(best / "dcp")
    assert any(n.endswith(".safetensors") for n in shards)
    assert all(n.endswith((".safetensors", ".json")) for n in shards)  # nothing pickled
    assert not (best / "model.safetensors").exists()
    tuned = load_model(str(best))
    base = load_pretrained(hf_tiny).state_dict()
    got = tuned.encoder.state_dict()
    assert got.keys() == base.keys()
    moved = [k for k in base if not torch.equal(got[k], base[k])]
    assert any(".attn." in k for k in moved)  # trained: the encoder moved off the pretrained weights
    assert not any(k.startswith("lm_head.") for k in moved)  # the unused masked-LM head stays as loaded
    bf16 = load_model(str(best), dtype="bf16")
    for k, v in bf16.encoder.state_dict().items():
        assert v.dtype == (torch.float32 if k.endswith("inv_freq") else torch.bfloat16), k
        assert torch.equal(v, got[k].to(v.dtype)), k


def damaged(full_run, tmp_path, how):
    ck = tmp_path / "ck"
    shutil.copytree(full_run / "best", ck)
    how(ck / "dcp")
    return ck


def drop_a_shard(d):  # as if one rank's file were lost: a 1-process checkpoint has one, so split it first
    from safetensors.torch import load_file, save_file

    (shard,) = [p for p in d.iterdir() if p.suffix == ".safetensors"]
    tensors = load_file(shard)
    keys = sorted(tensors)
    save_file({k: tensors[k] for k in keys[: len(keys) // 2]}, shard)


def truncate_shard(d):
    shard = next(p for p in d.iterdir() if p.suffix == ".safetensors")
    shard.write_bytes(shard.read_bytes()[:100])


def corrupt_shard_data(d):  # a valid header whose data section is cut short
    shard = next(p for p in d.iterdir() if p.suffix == ".safetensors")
    shard.write_bytes(shard.read_bytes()[:-1000])


@pytest.mark.parametrize("how, expect", [
    (drop_a_shard, "weights do not fit the config.*missing keys"),
    (truncate_shard, "unreadable sharded checkpoint"),
    (corrupt_shard_data, "unreadable sharded checkpoint|cannot read the checkpoint shards")])
def test_damaged_shards_give_one_clear_error(full_run, tmp_path, how, expect):
    ck = damaged(full_run, tmp_path, how)
    with pytest.raises(CheckpointError, match=expect) as e:
        load_model(str(ck))
    assert str(ck / "dcp") in str(e.value)


def test_shards_of_another_architecture_are_refused(full_run, tmp_path, hf_tiny):
    other = tmp_path / "other"
    cfg = TrainConfig(model="esm2_t6_8M_UR50D", out=str(other), mode="full", steps=1, batch_tokens=600, seed=2)
    train_model(cfg, records={"train": records_from_pairs(pairs(4, 3))})
    ck = tmp_path / "ck"
    shutil.copytree(full_run / "best", ck)
    shutil.rmtree(ck / "dcp")
    shutil.copytree(other / "best" / "dcp", ck / "dcp")
    model = load_model(str(full_run / "best"))
    with pytest.raises(CheckpointError, match="weights do not fit the config.*shape mismatches"):
        load_weights(model, str(ck))


@pytest.mark.slow
def test_infer_cli_on_damaged_shards_exits_2_with_one_line(full_run, tmp_path, forkrun):
    ck = damaged(full_run, tmp_path, truncate_shard)
    (tmp_path / "in.fasta").write_text(">a\nMKTAYIAKQR\n")
    r = forkrun.run([ROOT / "infer.py", "--checkpoint", ck, "--input", tmp_path / "in.fasta", "--output",
                     tmp_path / "pred.csv"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{ck / 'dcp'}: unreadable sharded checkpoint" in r.stderr
    assert not (tmp_path / "pred.csv").exists()


def test_full_fine_tune_exports_to_a_directory_transformers_loads(full_run, tmp_path):
    from transformers import EsmModel

    from esm2lite.commands.export import main as export_main
    from esm2lite.model.tokenizer import Tokenizer

    export_main(["--run", str(full_run), "--merged", str(tmp_path / "hf")])
    hf = EsmModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False).eval()
    tuned = load_model(str(full_run / "best"))
    tokens = Tokenizer().batch_encode(oracles.random_sequences(4, 5, 40, seed=8))
    with torch.no_grad():  # transformers as it runs, and in float64: the yardstick of the fp32 comparison
        theirs, exact = (m(input_ids=tokens, attention_mask=tokens.ne(1)).last_hidden_state
                         for m in (hf, oracles.float64_copy(hf)))
        ours = tuned.encoder(tokens, logits=False)["last_hidden_state"]
    oracles.assert_fp32_agrees(ours, theirs, exact, tokens.ne(1), what="last_hidden_state")
