"""Attention of packed batches (model/attention.py): the varlen_attn call's launch side on CPU, the
whole encoder through that call with a stand-in kernel written here (dense, float64, block-diagonal
mask from cu_seqlens: independent of both of our paths), and the real kernel on a GPU when there is one.

Tolerance: the stand-in computes in float64, so the encoder through it differs from the padded fp32
encoder only by the padded path's own fp32 rounding: test_packed.py's budget (64 eps32 x magnitude)."""

import math

import pytest
import torch

import oracles
from esm2lite.model import attention
from esm2lite.model.attention import Spans, varlen_arguments
from esm2lite.model.batch import Batch
from esm2lite.model.config import ESM2Config
from esm2lite.model.esm2 import ESM2
from esm2lite.model.esmc import ESMC, ESMCConfig
from esm2lite.weights.pretrained import load_pretrained
from test_packed import ULPS, layouts, sequences

GPU = torch.cuda.is_available()


def dense_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None):
    """What varlen_attn computes, written plainly: [N, H, hd] inputs, token i attends to token j iff
    both lie in the same [cu[s], cu[s+1]); float64 softmax; scale None = 1/sqrt(hd)."""
    assert torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32
    N = query.shape[0]
    seq = torch.bucketize(torch.arange(N), cu_seq_q[1:].long(), right=True)  # [N]: each token's sequence
    assert int((cu_seq_q[1:] - cu_seq_q[:-1]).max()) == max_q == max_k
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (t.double().transpose(0, 1) for t in (query, key, value))  # [H, N, hd]
    scores = (q @ k.transpose(1, 2)) * scale  # [H, N, N]
    scores = scores.masked_fill(seq[:, None] != seq[None, :], -math.inf)
    return (scores.softmax(-1) @ v).transpose(0, 1).to(query.dtype)  # [N, H, hd]


def dense_varlen_without_scale(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
    """PyTorch 2.10's signature: no scale keyword, 1/sqrt(hd) always."""
    assert not is_causal
    return dense_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)


def test_spans_and_the_varlen_arguments_built_from_a_batch():
    _, packed = layouts(["MK", "A", "GSHMW"])  # 4, 3 and 7 tokens
    spans = packed.attention_mask
    assert isinstance(spans, Spans) and spans.lengths == (4, 3, 7) and spans.max_len == 7
    assert spans.cu_seqlens.dtype == torch.int32 and spans.cu_seqlens.tolist() == [0, 4, 7, 14]
    assert spans.cu_seqlens.device == packed.tokens.device
    H, N, hd = 5, 14, 8
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        q, k, v = (torch.randn(1, H, N, hd).to(dtype) for _ in range(3))
        qf, kf, vf, cu_q, cu_k, max_q, max_k = varlen_arguments(q, k, v, spans)
        for flat, t in ((qf, q), (kf, k), (vf, v)):
            assert flat.shape == (N, H, hd) and flat.dtype == dtype and flat.is_contiguous()
            assert torch.equal(flat, t[0].transpose(0, 1))  # token-major, the heads in the middle
        assert cu_q is cu_k is spans.cu_seqlens and max_q == max_k == 7


def test_the_varlen_path_only_where_its_kernel_runs():
    q = torch.zeros(1, 2, 3, 8, dtype=torch.bfloat16)
    assert not attention.uses_varlen(q)  # a CPU tensor: the reference, whatever the dtype
    if GPU:
        assert attention.uses_varlen(q.cuda()) == (attention.varlen_kernel() is not None)
        assert not attention.uses_varlen(q.float().cuda())  # fp32: flash kernels take bf16/fp16 only


@pytest.mark.parametrize("kernel", [dense_varlen, dense_varlen_without_scale], ids=["scale=", "no-scale"])
@pytest.mark.parametrize("family", ["esm2", "esmc"])
def test_the_encoder_through_the_varlen_call_equals_the_padded_layout(family, kernel, hf_tiny, esmc_tiny,
                                                                      monkeypatch):
    """Everything our varlen path does around the kernel (the layout, cu_seqlens, ESM-2's scale 1 and ESM C's
    1/sqrt(hd), with and without a scale keyword), with a stand-in for the kernel, against padded SDPA."""
    encoder = load_pretrained(hf_tiny if family == "esm2" else esmc_tiny)
    monkeypatch.setattr(attention, "varlen_kernel", lambda: kernel)
    padded, packed = layouts(sequences())
    with torch.no_grad():
        want = encoder(padded)["logits"]
        monkeypatch.setattr(attention, "uses_varlen", lambda q: True)
        got = packed.unpack(encoder(packed)["logits"])
    keep = ~padded.padding
    oracles.assert_fp32_close(got[keep], want[keep], ULPS, what="logits through varlen_attn")


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["esm2", "esmc"])
def test_gpu_varlen_attn_equals_padded_sdpa(family):
    """The real kernel: packed bf16 logits and gradients against the padded layout, both under bf16
    autocast on the GPU, at real head sizes (ESM-2 8M's 16, ESM C's 64; random weights, no transformers
    needed). Tolerance: bf16 has 8 bits of mantissa; two bf16 paths of a 2-block model differ by a few
    bf16 eps of the magnitude (5e-2 relative, against 4e-3 per rounding)."""
    if attention.varlen_kernel() is None:
        pytest.fail("this PyTorch has no torch.nn.attention.varlen (>= 2.10 needed)")
    torch.manual_seed(0)
    encoder = (ESM2(ESM2Config(num_layers=2)) if family == "esm2" else
               ESMC(ESMCConfig(num_layers=2, d_model=256, num_heads=4, ffn_dim=512))).init_weights().cuda()
    assert attention.uses_varlen(torch.zeros(1, device="cuda", dtype=torch.bfloat16))
    padded, packed = (b.to("cuda") for b in layouts(sequences()))
    results = []
    for batch in (padded, packed):
        encoder.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = Batch.of(batch).unpack(encoder(batch)["logits"]).float()
        logits[~padded.padding].square().mean().backward()
        results.append((logits.detach(), encoder.layers[0].ffn_norm.weight.grad.clone()))
    (a, ga), (b, gb) = results
    keep = ~padded.padding
    assert (b[keep] - a[keep]).abs().max() <= 5e-2 * a[keep].abs().max()
    assert (gb - ga).abs().max() <= 5e-2 * ga.abs().max()
