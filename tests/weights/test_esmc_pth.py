"""EvolutionaryScale's ESM C weights files (.pth state dicts of the `esm` package's ESMC), held to
EvolutionaryScale's own code (issue 26): the wheel's TransformerStack and RegressionHead, which is what
esm.models.esmc.ESMC is made of (embed, transformer, sequence_head), build a small random model whose
state dict esm2lite loads; logits and final hidden states agree to fp32 rounding with that code's
float64 run. The `esm` package installs a module named esm, as fair-esm does: it runs in a subprocess
from its unpacked wheel (pip download, no dependencies; its layers need only einops, zstd and
cloudpathlib besides torch), so neither package ever sees the other."""

import os
import subprocess
import sys
import zipfile

import pytest
import torch

import oracles
from esm2lite import Tokenizer
from esm2lite.model.esmc import ESMC
from esm2lite.weights.pretrained import load_pretrained

pytestmark = pytest.mark.slow
WHEEL = "esm==3.2.1.post1"

REFERENCE = r'''
import sys, torch
from torch import nn
from esm.layers.regression_head import RegressionHead
from esm.layers.transformer_stack import TransformerStack

class ESMC(nn.Module):  # esm.models.esmc.ESMC's modules and forward (that module imports the whole SDK)
    def __init__(self, d_model, n_heads, n_layers):
        super().__init__()
        self.embed = nn.Embedding(64, d_model)
        self.transformer = TransformerStack(d_model, n_heads, None, n_layers, n_layers_geom=0, use_flash_attn=False)
        self.sequence_head = RegressionHead(d_model, 64)

    def forward(self, tokens):
        x = self.embed(tokens)
        x, _, _ = self.transformer(x, sequence_id=tokens != 1)
        return self.sequence_head(x), x

out, tokens = sys.argv[1], torch.load(sys.argv[2])
torch.manual_seed(0)
model = ESMC(128, 2, 3).eval()
g = torch.Generator().manual_seed(1)
with torch.no_grad():  # every weight far from its default, so that any mapping mistake shows
    for name, p in model.named_parameters():
        if p.dim() == 2:
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
        else:
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
torch.save(model.state_dict(), f"{out}/esmc.pth")
with torch.no_grad():
    logits, hidden = model(tokens)
    logits64, hidden64 = model.double()(tokens)
torch.save({"logits": logits, "hidden": hidden, "logits64": logits64, "hidden64": hidden64}, f"{out}/ref.pt")
'''


@pytest.fixture(scope="session")
def evolutionaryscale(tmp_path_factory):
    """PYTHONPATH for EvolutionaryScale's `esm` (its wheel unpacked) and the three packages its layers import."""
    root = tmp_path_factory.mktemp("evolutionaryscale")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["download", WHEEL, "--no-deps", "-d", str(root / "wheel")], check=True, timeout=600)
    zipfile.ZipFile(next((root / "wheel").glob("esm-*.whl"))).extractall(root / "src")
    subprocess.run(pip + ["install", "--target", str(root / "deps"), "einops", "zstd", "cloudpathlib"],
                   check=True, timeout=600)
    return os.pathsep.join([str(root / "src"), str(root / "deps")])


@pytest.fixture(scope="module")
def reference(evolutionaryscale, tmp_path_factory):
    d = tmp_path_factory.mktemp("esmc_pth")
    tokens = Tokenizer().batch_encode(oracles.random_sequences(4, 5, 40, seed=21))  # padded, <mask> inside
    torch.save(tokens, d / "tokens.pt")
    env = {**os.environ, "PYTHONPATH": evolutionaryscale}
    r = subprocess.run([sys.executable, "-c", REFERENCE, str(d), str(d / "tokens.pt")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return d, tokens, torch.load(d / "ref.pt", weights_only=True)


def test_esmc_pth_loads_and_matches_evolutionaryscale(reference, capsys):
    d, tokens, ref = reference
    capsys.readouterr()
    ours = load_pretrained(str(d / "esmc.pth"))
    assert capsys.readouterr() == ("", "")
    assert isinstance(ours, ESMC) and (ours.config.num_layers, ours.config.d_model, ours.config.num_heads,
                                       ours.config.ffn_dim) == (3, 128, 2, 512)  # 8/3 * 128 rounded up to 256
    with torch.no_grad():
        out = ours(tokens)
    keep = tokens != 1
    oracles.assert_fp32_agrees(out["logits"], ref["logits"], ref["logits64"], keep, what="logits")
    oracles.assert_fp32_agrees(out["last_hidden_state"], ref["hidden"], ref["hidden64"], keep, what="hidden")


def test_a_pth_that_is_not_a_model_is_one_line(tmp_path):
    torch.save({"embed.weight": torch.zeros(64, 128), "transformer.blocks.0.attn.out_proj.weight": "x"},
               tmp_path / "bad.pth")
    with pytest.raises(Exception, match=r"bad\.pth: entry 'transformer\.blocks\.0\.attn\.out_proj\.weight' is a "
                                        r"str, not a tensor under a name"):
        load_pretrained(str(tmp_path / "bad.pth"))
