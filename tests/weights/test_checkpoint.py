"""Every loading error path, asserting what the message says."""

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from esm2lite import CheckpointError, Esm2liteError, ESM2Config, load_pretrained


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def edit_weights(directory, fn):
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def test_missing_keys_listed(hf_tiny, tmp_path):
    d = copy_dir(hf_tiny, tmp_path / "m")
    edit_weights(d, lambda t: t.pop("esm.encoder.layer.1.intermediate.dense.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing keys: layers\.1\.fc1\.weight"):
        load_pretrained(d)


def test_unexpected_keys_listed_but_legacy_and_contact_ignored(hf_tiny, tmp_path):
    d = copy_dir(hf_tiny, tmp_path / "u")
    def add(t):
        t["esm.embeddings.position_embeddings.weight"] = torch.zeros(1026, 64)  # legacy: ignored
        t["esm.embeddings.position_ids"] = torch.arange(1026)[None]  # legacy: ignored
        t["esm.something_new.weight"] = torch.zeros(3)
    edit_weights(d, add)
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: esm\.something_new\.weight"):
        load_pretrained(d)
    edit_weights(d, lambda t: t.pop("esm.something_new.weight"))
    load_pretrained(d)  # contact head + legacy keys are fine


def test_shape_mismatch_and_config_disagreeing_with_weights(hf_tiny, tmp_path):
    d = copy_dir(hf_tiny, tmp_path / "s")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["intermediate_size"] = 100
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"shape mismatches: layers\.0\.fc1\.bias file \(256,\) vs model \(100,\)"):
        load_pretrained(d)
    cfg["intermediate_size"], cfg["num_hidden_layers"] = 256, 3
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"missing keys: layers\.2\."):
        load_pretrained(d)


def test_sharded_directory(hf_tiny, tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(os.path.join(hf_tiny, "config.json"), d)
    tensors = load_file(os.path.join(hf_tiny, "model.safetensors"))
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in halves.items():
        save_file({k: tensors[k] for k in ks}, str(d / name))
    json.dump({"metadata": {}, "weight_map": {k: n for n, ks in halves.items() for k in ks}},
              open(d / "model.safetensors.index.json", "w"))
    a, b = load_pretrained(hf_tiny), load_pretrained(d)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k
    os.remove(d / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: file not found"):
        load_pretrained(d)


def test_missing_and_corrupt_files(hf_tiny, tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_pretrained(tmp_path / "nope")
    d = copy_dir(hf_tiny, tmp_path / "c")
    weights = os.path.join(d, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated safetensors"):
        load_pretrained(d)
    open(weights, "wb").write(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_pretrained(d)
    os.remove(weights)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_pretrained(d)
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
        load_pretrained(d)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"bad\.pt: not a readable PyTorch checkpoint"):
        load_pretrained(bad)


def test_corrupt_config_json(hf_tiny, tmp_path):
    d = copy_dir(hf_tiny, tmp_path / "j")
    open(os.path.join(d, "config.json"), "w").write("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_pretrained(d)
    json.dump({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256,
               "position_embedding_type": "absolute"}, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="position_embedding_type is 'absolute'"):
        load_pretrained(d)


def test_crafted_config_cannot_ask_for_terabytes(hf_tiny, tmp_path):
    d = copy_dir(hf_tiny, tmp_path / "huge")
    json.dump({"num_hidden_layers": 10**6, "hidden_size": 10**5, "num_attention_heads": 4,
               "intermediate_size": 4 * 10**5, "position_embedding_type": "rotary"},
              open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="parameters, more than the"):
        load_pretrained(d)
    with pytest.raises(Esm2liteError, match="num_layers must be a positive integer"):
        ESM2Config(num_layers=-1)


def test_hf_default_eps_is_read_from_the_file(hf_tiny, tmp_path):
    d = copy_dir(hf_tiny, tmp_path / "eps")
    cfg = json.load(open(os.path.join(d, "config.json")))
    assert load_pretrained(d).config.layer_norm_eps == 1e-5
    del cfg["layer_norm_eps"]  # transformers' class default applies: 1e-12
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    assert load_pretrained(d).config.layer_norm_eps == 1e-12


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_malicious_pickle_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "cfg": {"model": Boom()}}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused to unpickle \(it needs (posix|os)\.system\)"):
        load_pretrained(path)
    assert not (tmp_path / "pwned.txt").exists()


def test_fair_esm_without_cfg_and_with_dict_cfg(fair_tiny, tmp_path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(fair_tiny, weights_only=True)
    torch.save({"model": data["model"]}, tmp_path / "nocfg.pt")
    with pytest.raises(CheckpointError, match="not a fair-esm ESM-2 checkpoint"):
        load_pretrained(tmp_path / "nocfg.pt")
    data["cfg"]["model"] = vars(data["cfg"]["model"])  # a plain dict config loads too
    torch.save(data, tmp_path / "dictcfg.pt")
    assert load_pretrained(tmp_path / "dictcfg.pt").config.num_layers == 2


def test_hub_id_resolved_with_snapshot_download(hf_tiny, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: calls.append(repo_id) or hf_tiny)
    model = load_pretrained("facebook/esm2_t6_8M_UR50D")
    assert calls == ["facebook/esm2_t6_8M_UR50D"] and model.config.num_layers == 2


def test_hub_id_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(CheckpointError, match=r"install the hub extra"):
        load_pretrained("facebook/esm2_t6_8M_UR50D")


def test_dtype_and_device_choice(hf_tiny):
    m = load_pretrained(hf_tiny, dtype="fp16", device="cpu")
    assert m.layers[0].fc1.weight.dtype == torch.float16 and m.layers[0].fc1.weight.device.type == "cpu"
    assert not any(p.is_meta for p in m.parameters()) and not any(b.is_meta for b in m.buffers())
    with pytest.raises(CheckpointError, match="unsupported dtype"):
        load_pretrained(hf_tiny, dtype="int8")


def test_pytorch_model_bin_only_directory_refused(hf_tiny, tmp_path):
    """A directory with only pytorch_model.bin: the message names it and says to re-save."""
    d = copy_dir(hf_tiny, tmp_path / "bin")
    tensors = load_file(os.path.join(d, "model.safetensors"))
    os.remove(os.path.join(d, "model.safetensors"))
    torch.save(tensors, os.path.join(d, "pytorch_model.bin"))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(d)
    msg = str(e.value)
    assert msg.startswith(f"{d}: ") and "has pytorch_model.bin but no model.safetensors" in msg
    assert "safetensors only" in msg and "save_pretrained" in msg


def test_untied_lm_head_refused_hf(hf_tiny, tmp_path):
    """An HF lm_head.decoder.weight that differs from the embedding is refused, naming the key."""
    d = copy_dir(hf_tiny, tmp_path / "untied")
    def untie(t):
        t["lm_head.decoder.weight"] = t["esm.embeddings.word_embeddings.weight"] + 1
    edit_weights(d, untie)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(d)
    assert str(e.value) == f"{d}: lm_head.decoder.weight differs from the token embedding; ESM-2's LM head is tied"
    edit_weights(d, lambda t: t.update({"lm_head.decoder.weight": t["esm.embeddings.word_embeddings.weight"].clone()}))
    load_pretrained(d)  # an equal copy is accepted


def test_untied_lm_head_refused_fair_esm(fair_tiny, tmp_path):
    """The same for a fair-esm file's lm_head.weight."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(fair_tiny, weights_only=True)
    key = "encoder.sentence_encoder.lm_head.weight"
    assert torch.equal(data["model"][key], data["model"]["encoder.sentence_encoder.embed_tokens.weight"])
    data["model"][key] = data["model"][key] * 2
    path = tmp_path / "untied.pt"
    torch.save(data, path)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path)
    assert str(e.value) == f"{path}: lm_head.weight differs from the token embedding; ESM-2's LM head is tied"


def test_fair_esm_cfg_lacking_fields(fair_tiny, tmp_path):
    """A cfg.model Namespace without the size fields: every missing field is named."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(fair_tiny, weights_only=True)
    data["cfg"]["model"] = argparse.Namespace(encoder_layers=2, token_dropout=True)
    path = tmp_path / "lacking.pt"
    torch.save(data, path)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path)
    assert str(e.value) == f"{path}: cfg.model lacks encoder_embed_dim, encoder_attention_heads"


def test_safetensors_file_instead_of_directory(hf_tiny):
    """Pointing at model.safetensors itself: the message names the file and asks for the directory."""
    path = os.path.join(hf_tiny, "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path)
    assert str(e.value) == f"{path}: give the directory that holds config.json, not the safetensors file"


def test_unknown_model_name():
    """from_name names the bad name and lists the released ones."""
    with pytest.raises(Esm2liteError) as e:
        ESM2Config.from_name("facebook/esm2_t7_9M_UR50D")
    msg = str(e.value)
    assert "unknown ESM-2 model name 'facebook/esm2_t7_9M_UR50D'" in msg
    assert "known: esm2_t6_8M_UR50D, " in msg and "esm2_t48_15B_UR50D" in msg


def test_hub_download_failure(monkeypatch):
    """A failing snapshot_download: the message names the repo id and carries the cause."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    def fail(repo_id, **kw):
        raise OSError("connection refused\n  (offline)")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(CheckpointError) as e:
        load_pretrained("facebook/esm2_t6_8M_UR50D")
    assert str(e.value) == ("facebook/esm2_t6_8M_UR50D: download from the HuggingFace hub failed "
                            "(connection refused (offline))")


def sharded_dir(hf_tiny, d, weight_map):
    """A directory with config.json, the weights as one shard, and an index with this weight_map."""
    d.mkdir()
    shutil.copy(os.path.join(hf_tiny, "config.json"), d)
    shutil.copy(os.path.join(hf_tiny, "model.safetensors"), d / "model-00001-of-00001.safetensors")
    json.dump({"metadata": {}, "weight_map": weight_map}, open(d / "model.safetensors.index.json", "w"))
    return d / "model.safetensors.index.json"


@pytest.mark.parametrize("weight_map", [["model-00001-of-00001.safetensors"], "x", None, 3])
def test_index_weight_map_not_a_mapping(hf_tiny, tmp_path, weight_map):
    """A weight_map that is not a {key: file} mapping: the index file is named as invalid."""
    index = sharded_dir(hf_tiny, tmp_path / "idx", weight_map)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path / "idx")
    assert str(e.value).startswith(f"{index}: not a valid safetensors index (")


def test_index_malformed_or_without_weight_map(hf_tiny, tmp_path):
    """An index that is not JSON, or has no weight_map, is named as invalid."""
    index = sharded_dir(hf_tiny, tmp_path / "idx", {})
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors index") as e:
        load_pretrained(tmp_path / "idx")
    assert str(e.value).startswith(f"{index}: ")
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path / "idx")
    assert str(e.value) == f"{index}: not a valid safetensors index ('weight_map')"


@pytest.mark.parametrize("shard", ["../x.safetensors", "sub/x.safetensors", "/etc/passwd", "..", ".", "", 7])
def test_index_shard_outside_the_directory(hf_tiny, tmp_path, shard):
    """A shard name that is not a plain file name in the directory is refused before any read."""
    outside = tmp_path / "x.safetensors"  # a real file the escaping name would reach
    shutil.copy(os.path.join(hf_tiny, "model.safetensors"), outside)
    index = sharded_dir(hf_tiny, tmp_path / "idx", {"esm.embeddings.word_embeddings.weight": shard})
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path / "idx")
    assert str(e.value) == f"{index}: weight_map names {shard!r}, not a file name in the directory"


def test_convert_cli_errors(tmp_path, fair_tiny, forkrun):
    r = forkrun.run(["-m", "esm2lite.commands.convert", tmp_path / "missing.pt", tmp_path / "o"])
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "missing.pt: no such file or directory" in r.stderr
    assert not (tmp_path / "o").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    r = forkrun.run(["-m", "esm2lite.commands.convert", fair_tiny, tmp_path / "full"])
    assert r.returncode == 2 and "exists and is not empty" in r.stderr
    assert os.listdir(tmp_path / "full") == ["x"]


def test_config_json_that_is_a_device_is_one_line(tmp_path):
    """A config.json that is /dev/zero ends in a one-line error naming it, not a MemoryError."""
    from esm2lite.weights.pretrained import load_pretrained
    from esm2lite.errors import CheckpointError
    (tmp_path / "config.json").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match=r"config\.json: not a text file"):
        load_pretrained(str(tmp_path))


def test_loading_a_checkpoint_does_not_import_torch_dynamo(hf_tiny, tmp_path):
    """Building the model on the meta device runs no torch op whose meta kernel is Python (those
    import torch._dynamo: about 2.5 s of every infer.py start here). A fresh interpreter, so that
    nothing imported it before."""
    code = ("import sys; from esm2lite import load_pretrained; m = load_pretrained(sys.argv[1]); "
            "print('torch._dynamo' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, hf_tiny], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == "False"
