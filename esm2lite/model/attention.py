"""Softmax attention over a padded or a packed batch (ESM-2's and ESM C's alike).

    padded   q, k, v [B, H, T, hd]; a bool mask [B, 1, 1, T] (True = a key that may be attended)
             or None -> scaled_dot_product_attention
    packed   q, k, v [1, H, N, hd], the sequences end to end; Spans says where each is, and each
             attends to itself alone:
               reference (CPU, fp32, and wherever varlen_attn is not there): one SDPA per sequence,
                 exact, no N x N scores
               varlen (CUDA, bf16/fp16): torch.nn.attention.varlen.varlen_attn (flash kernels), which
                 reads [N, H, hd] with cu_seqlens = offsets [B + 1] int32 and the longest length

out_s = softmax(scale * q_s k_s^T) v_s for each sequence s: the same maths on either path.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

VARLEN_DTYPES = (torch.bfloat16, torch.float16)  # what its flash kernels take


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, d] -> [B, H, T, hd] (a view)."""
    B, T, d = t.shape
    return t.view(B, T, num_heads, d // num_heads).transpose(1, 2)


def merge_heads(o: torch.Tensor) -> torch.Tensor:
    """[B, H, T, hd] -> [B, T, d]."""
    B, H, T, hd = o.shape
    return o.transpose(1, 2).reshape(B, T, H * hd)


@dataclass(frozen=True)
class Spans:
    """Where each sequence of a packed row is: lengths (ints, for the reference's split) and
    cu_seqlens [B + 1] int32 on the tokens' device (0, ends of each sequence), for the kernel."""

    lengths: tuple[int, ...]
    cu_seqlens: torch.Tensor
    max_len: int

    @classmethod
    def of(cls, lengths: torch.Tensor) -> "Spans":
        """lengths [B] (tokens of each sequence) -> Spans; one host sync, once per batch."""
        ends = lengths.cumsum(0).to(torch.int32)
        return cls(tuple(lengths.tolist()), F.pad(ends, (1, 0)), int(lengths.max()))


@functools.cache
def varlen_kernel():
    """torch.nn.attention.varlen.varlen_attn (PyTorch >= 2.10), or None. Imported on first use on a GPU:
    importing it imports torch._dynamo, seconds that a CPU run need not pay."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # older PyTorch: the reference path only
        return None
    return varlen_attn


def uses_varlen(q: torch.Tensor) -> bool:
    """The kernel where it runs: CUDA tensors in bf16/fp16 and a PyTorch that has it."""
    return q.is_cuda and q.dtype in VARLEN_DTYPES and varlen_kernel() is not None


def varlen_arguments(q, k, v, spans: Spans) -> tuple:
    """The packed [1, H, N, hd] tensors as varlen_attn reads them: ([N, H, hd] x 3, cu_seq_q, cu_seq_k,
    max_q, max_k), the same spans for queries and keys (self-attention)."""
    flat = lambda t: t[0].transpose(0, 1).contiguous()  # noqa: E731  [1, H, N, hd] -> [N, H, hd]
    return flat(q), flat(k), flat(v), spans.cu_seqlens, spans.cu_seqlens, spans.max_len, spans.max_len


@functools.cache
def scale_keyword(fn) -> bool:
    """Whether this PyTorch's varlen_attn takes scale= (2.10 had none: its scale was 1/sqrt(hd))."""
    return fn is not None and "scale" in inspect.signature(fn).parameters


def attend_varlen(q, k, v, spans: Spans, scale: float):
    """varlen_attn over the packed row -> [1, H, N, hd]."""
    args, kernel = varlen_arguments(q, k, v, spans), varlen_kernel()
    if scale_keyword(kernel):
        out = kernel(*args, scale=scale)
    else:  # its fixed 1/sqrt(hd): fold the rest of `scale` into q
        hd = q.shape[-1]
        out = kernel(args[0] * (scale * hd**0.5), *args[1:])
    return out.transpose(0, 1)[None]  # [N, H, hd] -> [1, H, N, hd]


def attend_reference(q, k, v, spans: Spans, scale: float):
    """One SDPA per sequence of the packed row -> [1, H, N, hd]: exact, no N x N scores."""
    parts = zip(q.split(spans.lengths, 2), k.split(spans.lengths, 2), v.split(spans.lengths, 2))
    return torch.cat([F.scaled_dot_product_attention(a, b, c, scale=scale) for a, b, c in parts], dim=2)


def attend(q, k, v, mask, scale: float = 1.0):
    """Softmax attention -> like q. mask: a padded bool mask [B, 1, 1, T] or None, or packed Spans.
    scale multiplies q.k (ESM-2 scales q before rotary: 1.0; ESM C: hd^-0.5)."""
    if isinstance(mask, Spans):
        return (attend_varlen if uses_varlen(q) else attend_reference)(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
