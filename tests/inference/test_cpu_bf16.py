"""--precision bf16 on a CPU (autocast: bf16 matrix products with fp32 accumulation, AVX512-BF16 /
AMX where the CPU has them): its accuracy against fp32, measured as test_int8 measures int8's, on
the same random-init ESM-2 8M and the same real proteins (GB1 variants, FLIP chains; examples/).
bf16 rounding does not depend on the CPU; the order of the fp32 accumulations does, by far less
than the margins below."""

import csv

import pytest
import torch
import torch.nn.functional as F

from test_int8 import FLIP, gb1, logits_and_embeddings
from esm2lite.inference.scoring import score_mutants
from esm2lite.model.config import ESM2Config
from esm2lite.model.esm2 import ESM2
from esm2lite.tasks.metrics import spearman


@pytest.fixture(scope="module")
def fp32():
    return ESM2(ESM2Config.from_name("esm2_t6_8M_UR50D")).init_weights(seed=0).eval()


def test_bf16_logits_and_embeddings_stay_close_to_fp32(fp32):
    flip = [r["sequence"] for r in csv.DictReader(open(FLIP)) if len(r["sequence"]) <= 400][:8]
    seqs = gb1()[2][:8] + flip  # as test_int8: 8 GB1 variants and 8 FLIP chains
    lf, ef = logits_and_embeddings(fp32, seqs)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what --precision bf16 runs under
        lb, eb = logits_and_embeddings(fp32, seqs)
    assert lb.dtype == torch.float32 and not torch.equal(lb, lf)  # the LM head's output; bf16 inside
    err, cos = (lb - lf).abs(), F.cosine_similarity(eb.float(), ef, dim=-1)
    assert lf.abs().max() > 0.5  # the scale the errors are read against (measured 1.08)
    assert err.max() < 0.04, err.max()  # measured 0.016; bound 0.04 (2.5x)
    assert err.mean() < 0.008, err.mean()  # measured 0.0029; bound 0.008 (2.7x)
    assert cos.min() > 1 - 1e-4, cos.min()  # measured 0.999982 (1 - cos: 1.8e-5); bound 1e-4 (5.6x)


def test_bf16_masked_marginal_scores_of_gb1_mutants_rank_as_fp32(fp32):
    wt, mutants, _ = gb1()
    with torch.inference_mode():
        want = score_mutants(fp32, wt, mutants, precision="fp32").scores
        got = score_mutants(fp32, wt, mutants, precision="bf16").scores
    rho = spearman(torch.tensor(got).numpy(), torch.tensor(want).numpy())
    assert rho > 1 - 2e-4, rho  # measured 0.99995 (1 - rho: 5e-5); bound 2e-4 (4x)
    assert max(abs(a - b) for a, b in zip(got, want)) < 0.1  # measured 0.033 (scores -1.1 .. 3.8); bound 0.1 (3x)
