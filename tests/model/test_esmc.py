"""esm2lite's ESM C against transformers' Esmc classes (the reference; never our own code): logits and
every hidden state on random weights, padded and unpadded, loaded from a directory saved by each of the
four classes. fp32 comparisons: oracles.assert_fp32_agrees, against a float64 run of the reference."""

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

import oracles
from esm2lite import Tokenizer
from esm2lite.model.esmc import ESMC, ESMCConfig, swiglu_width
from esm2lite.weights.pretrained import load_pretrained

CLASSES = ("EsmcForMaskedLM", "EsmcModel", "EsmcForSequenceClassification", "EsmcForTokenClassification")


def esmc_config(layers=3, d=96, heads=6, ffn=160):
    return transformers.EsmcConfig(vocab_size=64, hidden_size=d, intermediate_size=ffn, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_labels=3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random EsmcForMaskedLM (every weight far from its default) saved by each class's save_pretrained;
    the task classes keep its encoder and add their own random head."""
    root = tmp_path_factory.mktemp("esmc")
    torch.manual_seed(0)
    reference = transformers.EsmcForMaskedLM(esmc_config()).eval()
    oracles.randomize_(reference, seed=1)
    out = {}
    for name in CLASSES:
        model = getattr(transformers, name)(reference.config).eval()
        encoder = model if name == "EsmcModel" else model.esmc
        encoder.load_state_dict(reference.esmc.state_dict())
        if name == "EsmcForMaskedLM":
            model.lm_head.load_state_dict(reference.lm_head.state_dict())
        model.save_pretrained(root / name)
        out[name] = str(root / name)
    return reference, out


def batches():
    tok = Tokenizer()
    padded = tok.batch_encode(oracles.random_sequences(5, 3, 45, seed=7))  # mixed lengths, <mask> inside
    return {"padded": padded, "unpadded": tok.batch_encode(oracles.random_sequences(3, 30, 30, seed=8))}


def reference_outputs(model, tokens):
    """transformers' logits (None for EsmcModel) and its hidden states, embeddings first."""
    with torch.no_grad():
        out = model(input_ids=tokens, attention_mask=(tokens != 1).long(), output_hidden_states=True)
    return getattr(out, "logits", None), out.hidden_states


@pytest.mark.parametrize("shape", ["padded", "unpadded"])
def test_masked_lm_logits_and_every_hidden_state(saved, shape):
    reference, dirs = saved
    tokens = batches()[shape]
    ours = load_pretrained(dirs["EsmcForMaskedLM"])
    assert isinstance(ours, ESMC) and ours.config.lm_head
    hf = oracles.load_hf(dirs["EsmcForMaskedLM"], "EsmcForMaskedLM")
    (logits, hidden), (logits64, hidden64) = reference_outputs(hf, tokens), reference_outputs(
        oracles.float64_copy(hf), tokens)
    L = ours.config.num_layers
    with torch.no_grad():
        out = ours(tokens, repr_layers=range(L + 1))
    keep = tokens != 1
    oracles.assert_fp32_agrees(out["logits"], logits, logits64, keep, what="logits")
    assert len(hidden) == L + 1
    for i in range(L):  # transformers: the embeddings, then each block's output; its last is after the final norm
        oracles.assert_fp32_agrees(out["hidden_states"][i], hidden[i], hidden64[i], keep, what=f"hidden_states[{i}]")
    oracles.assert_fp32_agrees(out["hidden_states"][L], hidden[L], hidden64[L], keep, what="after the final norm")
    oracles.assert_fp32_agrees(out["last_hidden_state"], hidden[L], hidden64[L], keep, what="last_hidden_state")
    assert (out["logits"][keep] - logits[keep]).abs().max() <= 5e-5  # the bar, on top of the oracle's


@pytest.mark.parametrize("name", CLASSES[1:])
def test_every_class_loads_the_same_encoder(saved, name, capsys):
    """EsmcModel (no prefix) and the two task classes: the encoder only; a trained task head is left
    out and named in one line."""
    reference, dirs = saved
    capsys.readouterr()
    ours = load_pretrained(dirs[name])
    out = capsys.readouterr().out
    heads = {"EsmcModel": [], "EsmcForSequenceClassification": ["classifier.dense.bias", "classifier.dense.weight",
                                                                 "classifier.out_proj.bias", "classifier.out_proj.weight"],
             "EsmcForTokenClassification": ["score.bias", "score.weight"]}[name]
    assert out == (f"warning: {dirs[name]}: ignored {len(heads)} task-head weights that are not part of the "
                   f"encoder: {', '.join(heads)}\n" if heads else "")
    assert not ours.config.lm_head
    tokens = batches()["padded"]
    hf = oracles.load_hf(dirs[name], name).esmc if name != "EsmcModel" else oracles.load_hf(dirs[name], name)
    with torch.no_grad():
        want = hf(input_ids=tokens, attention_mask=(tokens != 1).long()).last_hidden_state
        want64 = oracles.float64_copy(hf)(input_ids=tokens, attention_mask=(tokens != 1).long()).last_hidden_state
        got = ours(tokens, logits=False)["last_hidden_state"]
    oracles.assert_fp32_agrees(got, want, want64, tokens != 1, what=name)
    with pytest.raises(Exception, match="no LM head"):
        ours(tokens)


def test_released_sizes_and_parameter_count():
    """The three open-weights sizes (EvolutionaryScale's model cards: 300M d960 30 layers 15 heads, 600M d1152
    36/18, 6B d2560 80/40); the SwiGLU width transformers' default config gives 6B (6912); and the parameter
    count against transformers' own model built on the meta device."""
    assert swiglu_width(2560) == transformers.EsmcConfig().intermediate_size == 6912
    for name, (layers, d, heads) in {"esmc_300m": (30, 960, 15), "esmc_600m": (36, 1152, 18),
                                     "esmc_6b": (80, 2560, 40)}.items():
        cfg = ESMCConfig.from_name(name)
        assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.ffn_dim) == (layers, d, heads, swiglu_width(d))
        with torch.device("meta"):
            hf = transformers.EsmcForMaskedLM(transformers.EsmcConfig(**{
                k: v for k, v in cfg.to_hf_config().items() if k not in ("architectures", "model_type")}))
        assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())
    assert math.isclose(ESMCConfig.from_name("esmc_300m").num_parameters() / 1e6, 333, rel_tol=0.02)


def test_a_config_esm_c_cannot_compute_is_refused(tmp_path, saved):
    import json
    import shutil

    _, dirs = saved
    bad = tmp_path / "bad"
    shutil.copytree(dirs["EsmcModel"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["num_key_value_heads"] = 2
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match=r"config.json: field num_key_value_heads is 2; ESM C as released has 6"):
        load_pretrained(str(bad))


def run_infer(forkrun, tmp_path, seqs: dict, base: str, *args):
    """infer.py --base BASE --input (seqs as FASTA) ARGS -> its completed process (asserted to succeed)."""
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{k}\n{s}\n" for k, s in seqs.items()))
    infer = str(Path(__file__).resolve().parents[2] / "infer.py")
    r = forkrun.run([infer, "--base", base, "--input", str(fasta), *map(str, args)])
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.mark.slow
def test_infer_embeds_and_scores_esm_c(saved, tmp_path, forkrun):
    """infer.py --base on an EsmcForMaskedLM directory: mean embeddings equal transformers' last hidden
    state averaged over residues; PLL equals the sum, over positions, of the log-probability transformers
    gives the true residue with that one position masked (written out here)."""
    import csv

    from safetensors.torch import load_file

    _, dirs = saved
    seqs = {"a": "MKTAYIAKQRQISFVKSHFSRQ", "b": "GSHMLEDPVAGG"}
    run_infer(forkrun, tmp_path, seqs, dirs["EsmcForMaskedLM"], "--embeddings", tmp_path / "emb.safetensors",
              "--layers", "3")
    run_infer(forkrun, tmp_path, seqs, dirs["EsmcForMaskedLM"], "--score", "pll", "--output", tmp_path / "pll.csv")
    emb = load_file(tmp_path / "emb.safetensors")
    scores = {row["id"]: float(row["pll"]) for row in csv.DictReader(open(tmp_path / "pll.csv"))}
    hf = oracles.load_hf(dirs["EsmcForMaskedLM"], "EsmcForMaskedLM")
    tok = Tokenizer()
    for sid, seq in seqs.items():
        tokens = tok.batch_encode([seq])
        with torch.no_grad():
            hidden = hf.esmc(input_ids=tokens).last_hidden_state[0, 1:-1]
            hidden64 = oracles.float64_copy(hf).esmc(input_ids=tokens).last_hidden_state[0, 1:-1]
            oracles.assert_fp32_agrees(emb[f"mean/3/{sid}"], hidden.mean(0), hidden64.mean(0), what=f"mean {sid}")
            masked = tokens.repeat(len(seq), 1)
            positions = torch.arange(len(seq))
            masked[positions, positions + 1] = 32  # <mask>, one position per row
            logp = hf(input_ids=masked).logits.log_softmax(-1)[positions, positions + 1, tokens[0, 1:-1]]
            logp64 = oracles.float64_copy(hf)(input_ids=masked).logits.log_softmax(-1)[positions, positions + 1,
                                                                                        tokens[0, 1:-1]]
        oracles.assert_fp32_agrees([scores[sid]], [logp.sum().item()], [logp64.sum().item()], what=f"pll {sid}")


def test_convert_writes_what_transformers_loads(saved, tmp_path):
    """esm2lite-convert on an EsmcModel directory: an EsmcModel directory with the same tensors."""
    from esm2lite.commands import convert
    from safetensors.torch import load_file

    _, dirs = saved
    convert.main([dirs["EsmcModel"], str(tmp_path / "out")])
    got, want = load_file(tmp_path / "out" / "model.safetensors"), load_file(f"{dirs['EsmcModel']}/model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert type(transformers.AutoModel.from_pretrained(tmp_path / "out")).__name__ == "EsmcModel"


@pytest.mark.slow
def test_model_name_builds_random_esm_c():
    """--model esmc_300m (weights.pretrained.random_base): an ESMC of the released 300M shape, seeded."""
    from esm2lite.weights.pretrained import random_base

    model, sha = random_base("esmc_300m", seed=0)
    assert isinstance(model, ESMC) and model.config == ESMCConfig.from_name("esmc_300m")
    assert sum(p.numel() for p in model.parameters()) == model.config.num_parameters()
    assert random_base("esmc_300m", seed=0)[1] == sha != random_base("esmc_300m", seed=1)[1]


@pytest.mark.slow
def test_infer_reads_esm_c_in_its_own_context(saved, tmp_path, forkrun):
    """ESM C's context is 2048 positions: infer.py embeds a 1,500-residue protein in one piece (as
    transformers does: ESM-2's 1,022-residue windows would change it) and windows only past 2,046."""
    import random

    from safetensors.torch import load_file

    _, dirs = saved
    rng = random.Random(5)
    seqs = {"mid": "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(1500)),
            "long": "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(2100))}
    r = run_infer(forkrun, tmp_path, seqs, dirs["EsmcModel"], "--embeddings", tmp_path / "emb.safetensors",
                  "--batch-tokens", "4096")
    assert "1 sequence over 2046 residues embedded in overlapping windows of 2048 tokens" in r.stdout
    emb = load_file(tmp_path / "emb.safetensors")
    hf = oracles.load_hf(dirs["EsmcModel"], "EsmcModel")
    tokens = Tokenizer().batch_encode([seqs["mid"]])
    with torch.no_grad():
        want = hf(input_ids=tokens).last_hidden_state[0, 1:-1].mean(0)
        want64 = oracles.float64_copy(hf)(input_ids=tokens).last_hidden_state[0, 1:-1].mean(0)
    layer = ESMCConfig.from_hf_config(json.loads(Path(dirs["EsmcModel"], "config.json").read_text())).num_layers
    oracles.assert_fp32_agrees(emb[f"mean/{layer}/mid"], want, want64, what="1,500 residues in one piece")


@pytest.mark.slow
def test_infer_scores_esm_c_mutants_by_masked_marginals(saved, tmp_path, forkrun):
    """infer.py --score masked-marginal with an ESM C: each mutant's score is the sum over its
    substitutions of log p(mutant) - log p(wild type) at that position masked (ProteinGym's recipe,
    written out here with transformers' EsmcForMaskedLM)."""
    import csv
    _, dirs = saved
    wt = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIE"
    mutants = ["K2A", "A4G:Q9W", "E25D", "M1L:I30V"]
    (tmp_path / "dms.csv").write_text("mutant\n" + "\n".join(mutants) + "\n")
    infer = str(Path(__file__).resolve().parents[2] / "infer.py")
    r = forkrun.run([infer, "--base", dirs["EsmcForMaskedLM"], "--input", str(tmp_path / "dms.csv"), "--wildtype",
                     wt, "--score", "masked-marginal", "--output", str(tmp_path / "scores.csv")])
    assert r.returncode == 0, r.stderr[-2000:]
    got = [float(row["masked-marginal"]) for row in csv.DictReader(open(tmp_path / "scores.csv"))]
    hf = oracles.load_hf(dirs["EsmcForMaskedLM"], "EsmcForMaskedLM")
    tok = Tokenizer()
    ids = {a: tok.batch_encode([a])[0, 1].item() for a in "ACDEFGHIKLMNPQRSTVWY"}
    tokens = tok.batch_encode([wt])

    def scores(model):
        out = []
        with torch.no_grad():
            for m in mutants:
                total = 0.0
                for sub in m.split(":"):
                    pos = int(sub[1:-1])  # 1-based; <cls> is token 0
                    masked = tokens.clone()
                    masked[0, pos] = 32
                    logp = model(input_ids=masked).logits[0, pos].log_softmax(-1)
                    total += (logp[ids[sub[-1]]] - logp[ids[sub[0]]]).item()
                out.append(total)
        return out

    oracles.assert_fp32_agrees(got, scores(hf), scores(oracles.float64_copy(hf)), what="masked marginals")
