"""esm2lite LoRA against HF peft on the same HF ESM model, and against float64 maths."""

import json
import math
import shutil

import pytest
import torch

import oracles
from esm2lite import Tokenizer
from esm2lite.errors import CheckpointError
from esm2lite.model.lora import (INITS, LoRAConfig, LoRALinear, apply_lora, count_trainable, load_lora_state_dict,
                           lora_state_dict, merge_lora, unmerge_lora)
from esm2lite.weights.peft import load_peft_adapter, save_peft_adapter
from esm2lite import load_pretrained

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # raised inside peft

ALL = ("query", "key", "value", "out", "fc1", "fc2")
# The oracle's own map of our targets onto HF EsmModel module paths.
HF_PATH = {
    "query": "encoder.layer.{i}.attention.self.query",
    "key": "encoder.layer.{i}.attention.self.key",
    "value": "encoder.layer.{i}.attention.self.value",
    "out": "encoder.layer.{i}.attention.output.dense",
    "fc1": "encoder.layer.{i}.intermediate.dense",
    "fc2": "encoder.layer.{i}.output.dense",
}
OUR_PATH = {t: ("layers.{i}.attn." if t in ("query", "key", "value", "out") else "layers.{i}.") + t for t in ALL}


@pytest.fixture(scope="module")
def batch():
    return Tokenizer().batch_encode(oracles.random_sequences(4, 5, 30, seed=11))  # padded, with <mask>


def hf_encoder(path, cls="EsmModel", **kw):
    return getattr(transformers, cls).from_pretrained(path, **kw).eval()


def hf_hidden(encoder, tokens):
    return encoder(input_ids=tokens, attention_mask=(tokens != 1).long()).last_hidden_state


def nonpad(t, tokens):
    return t[tokens != 1]


def hidden_agrees(ours, theirs, tokens):
    """ours' final hidden states against peft + transformers' `theirs`: within theirs' own fp32 error,
    both measured against theirs in float64 (no fixed fp32 tolerance: they do not travel)."""
    with torch.no_grad():
        h_ours = ours.eval()(tokens, logits=False)["last_hidden_state"]
        h_theirs, h_exact = (hf_hidden(m, tokens) for m in (theirs, oracles.float64_copy(theirs)))
    oracles.assert_fp32_agrees(h_ours, h_theirs, h_exact, tokens.ne(1), what="last_hidden_state")


def randomize_adapters_(model, seed=0, std=0.3):
    """Non-zero A and B everywhere (B's default zero init would hide a wrong A)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(lora_state_dict(model).items()):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def peft_model(path, config: LoRAConfig, layers=(0, 1)):
    """peft's LoRA on HF EsmModel for the same modules, with our adapter values copied in."""
    layers = layers if config.layers is None else config.layers
    paths = [HF_PATH[t].format(i=i) for t in config.targets for i in layers]
    cfg = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=paths)
    return peft.get_peft_model(hf_encoder(path), cfg)


def copy_adapters(ours, theirs, config, layers=(0, 1)):
    named = dict(theirs.named_parameters())
    with torch.no_grad():
        for t in config.targets:
            for i in layers if config.layers is None else config.layers:
                mod = ours.get_submodule(OUR_PATH[t].format(i=i))
                hf = "base_model.model." + HF_PATH[t].format(i=i)
                named[f"{hf}.lora_A.default.weight"].copy_(mod.lora_a)
                named[f"{hf}.lora_B.default.weight"].copy_(mod.lora_b)


# ------------------------------------------------------------------- against peft


@pytest.mark.parametrize("config", [
    LoRAConfig(rank=4, alpha=8.0),
    LoRAConfig(rank=3, alpha=5.0, targets=("value", "fc2", "out"), layers=(1,)),
])
def test_forward_and_grads_match_peft(hf_tiny, batch, config):
    ours = apply_lora(load_pretrained(hf_tiny), config)
    randomize_adapters_(ours, seed=1)
    theirs = peft_model(hf_tiny, config)
    copy_adapters(ours, theirs, config)
    exact = oracles.float64_copy(theirs)  # the yardstick of both fp32 runs: peft + transformers in float64

    w = torch.randn(*batch.shape, 64, generator=torch.Generator().manual_seed(2))  # loss weights [B, T, d]
    h_ours = ours(batch, logits=False)["last_hidden_state"]
    h_theirs, h_exact = hf_hidden(theirs, batch), hf_hidden(exact, batch)
    oracles.assert_fp32_agrees(h_ours, h_theirs, h_exact, batch.ne(1), what="last_hidden_state")
    nonpad(h_ours * w, batch).mean().backward()
    nonpad(h_theirs * w, batch).mean().backward()
    nonpad(h_exact * w.double(), batch).mean().backward()

    named, named64 = dict(theirs.named_parameters()), dict(exact.named_parameters())
    layers = (0, 1) if config.layers is None else config.layers
    for t in config.targets:
        for i in layers:
            mod = ours.get_submodule(OUR_PATH[t].format(i=i))
            hf = "base_model.model." + HF_PATH[t].format(i=i)
            for ours_grad, name in ((mod.lora_a.grad, f"{hf}.lora_A.default.weight"),
                                    (mod.lora_b.grad, f"{hf}.lora_B.default.weight")):
                oracles.assert_fp32_agrees(ours_grad, named[name].grad, named64[name].grad, what=f"grad of {name}")


# peft selects modules by suffix ("output.dense" matches out and fc2: only used with both) plus
# layers_to_transform for a layer subset.
@pytest.mark.parametrize("rank, targets, peft_targets, layers", [
    (4, ALL, ["query", "key", "value", "output.dense", "intermediate.dense"], None),
    (8, ("query", "value", "out", "fc1"), ["query", "value", "attention.output.dense", "intermediate.dense"], (1,)),
    (2, ALL, ["query", "key", "value", "output.dense", "intermediate.dense"], (0,)),
])
def test_trainable_count_matches_peft(hf_tiny, rank, targets, peft_targets, layers):
    ours = apply_lora(load_pretrained(hf_tiny), LoRAConfig(rank=rank, targets=targets, layers=layers))
    cfg = peft.LoraConfig(r=rank, lora_alpha=16, target_modules=peft_targets,
                          layers_to_transform=None if layers is None else list(layers))
    theirs = peft.get_peft_model(hf_encoder(hf_tiny), cfg)
    assert count_trainable(ours) == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("config", [
    LoRAConfig(rank=4, alpha=8.0, dropout=0.1),
    LoRAConfig(rank=2, alpha=3.0, targets=("key", "fc1"), layers=(1,)),
    LoRAConfig(rank=4, alpha=4.0, targets=("query", "fc2"), tie_weights=True),
])
def test_saved_adapter_loads_in_peft(hf_tiny, tmp_path, batch, config):
    ours = apply_lora(load_pretrained(hf_tiny), config)
    randomize_adapters_(ours, seed=3)
    save_peft_adapter(ours, tmp_path / "adapter", base_model_name_or_path=hf_tiny)
    theirs = peft.PeftModel.from_pretrained(hf_encoder(hf_tiny), tmp_path / "adapter").eval()
    assert theirs.peft_config["default"].r == config.rank
    hidden_agrees(ours, theirs, batch)
    # every adapter reached peft (a dropped key would leave B at zero and could hide in tolerance)
    layers = (0, 1) if config.layers is None else config.layers
    named = dict(theirs.named_parameters())
    for t in config.targets:
        for i in layers:
            hf = "base_model.model." + HF_PATH[t].format(i=i)
            ours_b = ours.get_submodule(OUR_PATH[t].format(i=i)).lora_b
            assert torch.equal(named[f"{hf}.lora_B.default.weight"], ours_b)


@pytest.mark.parametrize("cls, targets, kw", [
    ("EsmModel", ["query", "key", "value", "output.dense", "intermediate.dense"], dict(layers_to_transform=[1])),
    ("EsmForMaskedLM", ["query", "value"], dict(lora_dropout=0.1)),
    ("EsmForSequenceClassification", ["key", "intermediate.dense"], dict(task_type="SEQ_CLS")),
])
def test_peft_saved_adapter_loads_in_esm2lite(hf_tiny, tmp_path, batch, cls, targets, kw):
    extra = dict(num_labels=2) if cls == "EsmForSequenceClassification" else {}
    theirs = peft.get_peft_model(hf_encoder(hf_tiny, cls, **extra),
                                 peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, **kw))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    theirs.save_pretrained(tmp_path / "adapter")

    ours = load_pretrained(hf_tiny)
    heads = load_peft_adapter(ours, tmp_path / "adapter")
    assert count_trainable(ours) == sum(p.numel() for n, p in theirs.named_parameters() if "lora_" in n)
    encoder = theirs.eval().get_base_model()
    hidden_agrees(ours, encoder if cls == "EsmModel" else encoder.esm, batch)
    if cls == "EsmForSequenceClassification":  # the head (modules_to_save) comes back, not dropped
        assert sorted(heads) == ["classifier.dense.bias", "classifier.dense.weight",
                                 "classifier.out_proj.bias", "classifier.out_proj.weight"]
        head = theirs.get_base_model().classifier.modules_to_save["default"]
        assert torch.equal(heads["classifier.dense.weight"], head.dense.weight)
    else:
        assert heads == {}
    if kw.get("lora_dropout"):
        assert ours.layers[0].attn.query.dropout_p == 0.1


@pytest.fixture(scope="module")
def peft_dir(hf_tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("peft") / "adapter"
    model = peft.get_peft_model(hf_encoder(hf_tiny), peft.LoraConfig(r=2, target_modules=["query"]))
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("field, value", [
    ("use_rslora", True), ("use_dora", True), ("bias", "all"), ("fan_in_fan_out", True),
    ("peft_type", "IA3"), ("rank_pattern", {"query": 8}), ("init_lora_weights", "pissa"),
])
def test_unsupported_peft_config_is_one_line_error(peft_dir, tmp_path, hf_tiny, field, value):
    path = tmp_path / "adapter"
    shutil.copytree(peft_dir, path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg[field] = value
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"adapter_config\.json: field {field} ") as e:
        load_peft_adapter(load_pretrained(hf_tiny), path)
    assert "\n" not in str(e.value)


def test_unmapped_peft_module_is_an_error(hf_tiny, tmp_path):
    # "dense" also matches EsmModel's pooler.dense, which esm2lite has no place for
    model = peft.get_peft_model(hf_encoder(hf_tiny), peft.LoraConfig(r=2, target_modules=["dense"]))
    model.save_pretrained(tmp_path / "adapter")
    ours = load_pretrained(hf_tiny)
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: tensor .*pooler\.dense"):
        load_peft_adapter(ours, tmp_path / "adapter")
    assert not any(isinstance(m, LoRALinear) for m in ours.modules())  # nothing applied


# ------------------------------------------------------------------- merge, freeze, tie, init


def test_merge_then_unmerge(hf_tiny, batch):
    model = apply_lora(load_pretrained(hf_tiny), LoRAConfig(rank=4, alpha=8.0))
    randomize_adapters_(model, seed=5, std=0.1)  # scale·BA ~ W/4: a large but trained-like update
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(batch)["last_hidden_state"]
        merge_lora(model)
        merge_lora(model)  # second merge is a no-op
        merged = model(batch)["last_hidden_state"]
    q = model.layers[0].attn.query
    ref = before["layers.0.attn.query.weight"].double() + 2.0 * q.lora_b.double() @ q.lora_a.double()  # float64
    # fp32 W + 2 (B A): a rank-4 product, an exact doubling and a sum, each rounded once
    oracles.assert_fp32_close(q.weight, ref, 4, what="merged weight")
    # the same function, W + s B A rounded once into W and summed in another order: two fp32 forwards of
    # the tiny model, each a few eps32 x max|h| from float64 (test_parity; measured 5 apart here)
    oracles.assert_fp32_close(merged, expected, 64, batch.ne(1), what="merged forward")
    unmerge_lora(model)
    unmerge_lora(model)
    for k, v in model.state_dict().items():  # (W + D) - D, D recomputed identically: two roundings, |D| < |W|
        oracles.assert_fp32_close(v, before[k], 2, what=k)


def test_apply_lora_freezes_everything_else(hf_tiny, batch):
    model = load_pretrained(hf_tiny)
    original = model.layers[1].fc1.weight
    apply_lora(model, LoRAConfig(rank=4, init_b="normal"))
    assert model.layers[1].fc1.weight is original  # the original tensor, not a copy
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and len(trainable) == 2 * 6 * 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    model(batch)["logits"].square().mean().backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == trainable


def test_layers_subset(hf_tiny):
    model = apply_lora(load_pretrained(hf_tiny), LoRAConfig(rank=2, targets=("key", "fc2"), layers=(1,)))
    assert sorted(lora_state_dict(model)) == ["layers.1.attn.key.lora_a", "layers.1.attn.key.lora_b",
                                              "layers.1.fc2.lora_a", "layers.1.fc2.lora_b"]
    assert type(model.layers[0].attn.key) is torch.nn.Linear
    assert count_trainable(model) == 2 * (64 + 64) + 2 * (256 + 64)


def test_tie_weights(hf_tiny, batch):
    model = apply_lora(load_pretrained(hf_tiny), LoRAConfig(rank=2, targets=("query", "fc1"), tie_weights=True))
    assert model.layers[0].attn.query.lora_a is model.layers[1].attn.query.lora_a
    assert model.layers[0].fc1.lora_b is model.layers[1].fc1.lora_b
    assert model.layers[0].fc1.weight is not model.layers[1].fc1.weight
    assert count_trainable(model) == 2 * (64 + 64) + 2 * (64 + 256)  # each shared pair once
    sd = lora_state_dict(model)
    assert sorted(sd) == ["layers.0.attn.query.lora_a", "layers.0.attn.query.lora_b",
                          "layers.0.fc1.lora_a", "layers.0.fc1.lora_b"]
    randomize_adapters_(model, seed=6)
    other = apply_lora(load_pretrained(hf_tiny), LoRAConfig(rank=2, targets=("query", "fc1"), tie_weights=True))
    load_lora_state_dict(other, lora_state_dict(model))
    assert torch.equal(other.layers[1].fc1.lora_a, model.layers[0].fc1.lora_a)
    model(batch)["last_hidden_state"].sum().backward()  # one shared gradient, both layers contribute
    assert model.layers[1].attn.query.lora_a.grad is model.layers[0].attn.query.lora_a.grad


@pytest.mark.parametrize("init", INITS)
def test_init_options(hf_tiny, init):
    other = "zero" if init != "zero" else "normal"
    torch.manual_seed(0)
    model = apply_lora(load_pretrained(hf_tiny), LoRAConfig(rank=16, init_a=init, init_b=other))
    a = model.layers[0].fc2.lora_a  # [16, 256]: fan_in 256, fan_out 16
    b = model.layers[0].fc2.lora_b  # [64, 16]
    if init == "kaiming":  # peft: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1 / math.sqrt(256)
        assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound and abs(a.mean()) < 0.1 * bound
    elif init == "xavier":  # xavier_normal_: std sqrt(2 / (fan_in + fan_out))
        assert abs(a.std().item() / math.sqrt(2 / (256 + 16)) - 1) < 0.1
    elif init == "normal":  # N(0, 0.2^2)
        assert abs(a.std().item() / 0.2 - 1) < 0.1
    else:
        assert not a.any() and abs(b.std().item() / 0.2 - 1) < 0.15
    if init != "zero":
        assert not b.any()


@pytest.mark.parametrize("kw", [
    dict(rank=0), dict(rank=2.5), dict(rank=129), dict(rank=True), dict(alpha=0), dict(alpha=-1.0),
    dict(alpha=float("nan")), dict(dropout=1.0), dict(dropout=-0.1), dict(targets=("qkv",)),
    dict(targets="query"), dict(targets=()), dict(targets=("query", "query")), dict(layers=()),
    dict(layers=(-1,)), dict(layers=(0, 0)), dict(layers=3), dict(init_a="uniform"), dict(init_b="he"),
    dict(init_a="zero", init_b="zero"), dict(tie_weights="yes"),
])
def test_bad_config_raises(kw):
    with pytest.raises(ValueError, match=r"LoRAConfig"):
        LoRAConfig(**kw)


def test_config_json_round_trip_and_layer_range(hf_tiny):
    config = LoRAConfig(rank=8, alpha=16.0, dropout=0.1, targets=("query", "fc2"), layers=(1,),
                        init_a="xavier", tie_weights=True)
    assert LoRAConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown fields"):
        LoRAConfig.from_dict({"rank": 4, "r": 4})
    with pytest.raises(ValueError, match="out of range"):
        apply_lora(load_pretrained(hf_tiny), LoRAConfig(layers=(2,)))


def test_dropout_only_in_training(hf_tiny, batch):
    model = apply_lora(load_pretrained(hf_tiny), LoRAConfig(rank=4, dropout=0.5, init_b="normal"))
    with torch.no_grad():
        a, b = model.eval()(batch)["logits"], model(batch)["logits"]
        c = model.train()(batch)["logits"]
    assert torch.equal(a, b) and not torch.allclose(nonpad(a, batch), nonpad(c, batch))


# ------------------------------------------------------------------- our state dict


def test_lora_state_dict_round_trip_and_strict_errors(hf_tiny, batch):
    config = LoRAConfig(rank=4, targets=("value", "fc1"))
    model = apply_lora(load_pretrained(hf_tiny), config)
    randomize_adapters_(model, seed=7)
    sd = {k: v.clone() for k, v in lora_state_dict(model).items()}
    assert all(k.endswith((".lora_a", ".lora_b")) for k in sd) and "layers.0.attn.value.lora_a" in sd
    other = apply_lora(load_pretrained(hf_tiny), config)
    load_lora_state_dict(other, sd)
    with torch.no_grad():
        assert torch.equal(model(batch)["logits"], other(batch)["logits"])

    bad = [({k: v for k, v in sd.items() if k != "layers.1.fc1.lora_b"}, r"1 missing keys: layers\.1\.fc1\.lora_b"),
           ({**sd, "layers.0.attn.query.lora_a": sd["layers.0.attn.value.lora_a"]},
            r"1 unexpected keys: layers\.0\.attn\.query"),
           ({**sd, "layers.0.fc1.lora_a": torch.zeros(3, 64)}, r"1 shape mismatches: layers\.0\.fc1\.lora_a file \(3, 64\)")]
    for broken, pattern in bad:
        with pytest.raises(CheckpointError, match=pattern) as e:
            load_lora_state_dict(other, broken)
        assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="no LoRA adapters"):
        load_lora_state_dict(load_pretrained(hf_tiny), sd)
