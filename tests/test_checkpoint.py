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

from esm2lite import ESM2, CheckpointError, Esm2liteError, ESM2Config


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
        ESM2.from_pretrained(d)


def test_unexpected_keys_listed_but_legacy_and_contact_ignored(hf_tiny, tmp_path):
    d = copy_dir(hf_tiny, tmp_path / "u")
    def add(t):
        t["esm.embeddings.position_embeddings.weight"] = torch.zeros(1026, 64)  # legacy: ignored
        t["esm.embeddings.position_ids"] = torch.arange(1026)[None]  # legacy: ignored
        t["esm.something_new.weight"] = torch.zeros(3)
    edit_weights(d, add)
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: esm\.something_new\.weight"):
        ESM2.from_pretrained(d)
    edit_weights(d, lambda t: t.pop("esm.something_new.weight"))
    ESM2.from_pretrained(d)  # contact head + legacy keys are fine


def test_shape_mismatch_and_config_disagreeing_with_weights(hf_tiny, tmp_path):
    d = copy_dir(hf_tiny, tmp_path / "s")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["intermediate_size"] = 100
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"shape mismatches: layers\.0\.fc1\.bias file \(256,\) vs model \(100,\)"):
        ESM2.from_pretrained(d)
    cfg["intermediate_size"], cfg["num_hidden_layers"] = 256, 3
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"missing keys: layers\.2\."):
        ESM2.from_pretrained(d)


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
    a, b = ESM2.from_pretrained(hf_tiny), ESM2.from_pretrained(d)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k
    os.remove(d / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: file not found"):
        ESM2.from_pretrained(d)


def test_missing_and_corrupt_files(hf_tiny, tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        ESM2.from_pretrained(tmp_path / "nope")
    d = copy_dir(hf_tiny, tmp_path / "c")
    weights = os.path.join(d, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated safetensors"):
        ESM2.from_pretrained(d)
    open(weights, "wb").write(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        ESM2.from_pretrained(d)
    os.remove(weights)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        ESM2.from_pretrained(d)
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
        ESM2.from_pretrained(d)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"bad\.pt: not a readable PyTorch checkpoint"):
        ESM2.from_pretrained(bad)


def test_corrupt_config_json(hf_tiny, tmp_path):
    d = copy_dir(hf_tiny, tmp_path / "j")
    open(os.path.join(d, "config.json"), "w").write("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        ESM2.from_pretrained(d)
    json.dump({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256,
               "position_embedding_type": "absolute"}, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="position_embedding_type is 'absolute'"):
        ESM2.from_pretrained(d)


def test_crafted_config_cannot_ask_for_terabytes(hf_tiny, tmp_path):
    d = copy_dir(hf_tiny, tmp_path / "huge")
    json.dump({"num_hidden_layers": 10**6, "hidden_size": 10**5, "num_attention_heads": 4,
               "intermediate_size": 4 * 10**5, "position_embedding_type": "rotary"},
              open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="parameters, more than the"):
        ESM2.from_pretrained(d)
    with pytest.raises(Esm2liteError, match="num_layers must be a positive integer"):
        ESM2Config(num_layers=-1)


def test_hf_default_eps_is_read_from_the_file(hf_tiny, tmp_path):
    d = copy_dir(hf_tiny, tmp_path / "eps")
    cfg = json.load(open(os.path.join(d, "config.json")))
    assert ESM2.from_pretrained(d).config.layer_norm_eps == 1e-5
    del cfg["layer_norm_eps"]  # transformers' class default applies: 1e-12
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    assert ESM2.from_pretrained(d).config.layer_norm_eps == 1e-12


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_malicious_pickle_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "cfg": {"model": Boom()}}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused to unpickle \(it needs (posix|os)\.system\)"):
        ESM2.from_pretrained(path)
    assert not (tmp_path / "pwned.txt").exists()


def test_fair_esm_without_cfg_and_with_dict_cfg(fair_tiny, tmp_path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(fair_tiny, weights_only=True)
    torch.save({"model": data["model"]}, tmp_path / "nocfg.pt")
    with pytest.raises(CheckpointError, match="not a fair-esm ESM-2 checkpoint"):
        ESM2.from_pretrained(tmp_path / "nocfg.pt")
    data["cfg"]["model"] = vars(data["cfg"]["model"])  # a plain dict config loads too
    torch.save(data, tmp_path / "dictcfg.pt")
    assert ESM2.from_pretrained(tmp_path / "dictcfg.pt").config.num_layers == 2


def test_hub_id_resolved_with_snapshot_download(hf_tiny, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: calls.append(repo_id) or hf_tiny)
    model = ESM2.from_pretrained("facebook/esm2_t6_8M_UR50D")
    assert calls == ["facebook/esm2_t6_8M_UR50D"] and model.config.num_layers == 2


def test_hub_id_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(CheckpointError, match=r"install the hub extra"):
        ESM2.from_pretrained("facebook/esm2_t6_8M_UR50D")


def test_dtype_and_device_choice(hf_tiny):
    m = ESM2.from_pretrained(hf_tiny, dtype="fp16", device="cpu")
    assert m.layers[0].fc1.weight.dtype == torch.float16 and m.layers[0].fc1.weight.device.type == "cpu"
    assert not any(p.is_meta for p in m.parameters()) and not any(b.is_meta for b in m.buffers())
    with pytest.raises(CheckpointError, match="unsupported dtype"):
        ESM2.from_pretrained(hf_tiny, dtype="int8")


def test_convert_cli_errors(tmp_path, fair_tiny):
    r = subprocess.run([sys.executable, "-m", "esm2lite.convert", str(tmp_path / "missing.pt"), str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "missing.pt: no such file or directory" in r.stderr
    assert not (tmp_path / "o").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    r = subprocess.run([sys.executable, "-m", "esm2lite.convert", fair_tiny, str(tmp_path / "full")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "exists and is not empty" in r.stderr
    assert os.listdir(tmp_path / "full") == ["x"]
