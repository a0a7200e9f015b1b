"""ESM-2, from scratch. Reads like the architecture (see docs/model.md):

    x = embed(tokens)                  token dropout: <mask> rows zeroed, rescaled
    for each of L blocks:              pre-LN
        x = x + Attention(LN(x))       q scaled by head_dim^-0.5, rotary on q and k
        x = x + fc2(gelu(fc1(LN(x))))
    h = LN(x)                          "last hidden state"
    logits = LMHead(h)                 dense, gelu, LN, tied embedding matrix + bias

Shapes: B sequences, T tokens, d = d_model, H heads of size hd = d / H.
"""


import torch
import torch.nn.functional as F
from torch import nn

from esm2lite.errors import Esm2liteError
from esm2lite.model.attention import attend, merge_heads, split_heads
from esm2lite.model.batch import Batch
from esm2lite.model.config import ESM2Config
from esm2lite.model.tokenizer import MASK, PAD

MASK_RATIO_TRAIN = 0.15 * 0.8  # fraction of tokens ESM-2 saw as <mask> in training


def rotary_inv_freq(head_dim: int) -> torch.Tensor:
    """[hd/2] fp32 rotary frequencies from the formula (checkpoints that store none: random
    init, BioNeMo's TransformerEngine files, whose RotaryPositionEmbedding computes these).
    Computed on the CPU, then put on the default device: under `torch.device("meta")` the same
    arithmetic would import torch._dynamo, seconds of every command's start-up."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))
    return inv_freq.to(torch.get_default_device())


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor):
    """positions: [B, T] (0 at <cls>), inv_freq: [hd/2] -> cos, sin: [B, 1, T, hd] in fp32.

    Always fp32: bf16 cannot represent positions above 256 exactly."""
    freqs = positions[..., None].float() * inv_freq.float()  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half (GPT-NeoX) pairing
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd] rotated by position, computed in fp32, returned in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ESM2Config):
        super().__init__()
        d = cfg.d_model
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        # Loaded from the checkpoint: ESM-2's stored values carry fp16 rounding.
        self.register_buffer("inv_freq", rotary_inv_freq(self.head_dim))

    def forward(self, x, positions, attn_mask):  # x: [B, T, d]
        split = lambda t: split_heads(t, self.num_heads)  # noqa: E731  [B, H, T, hd]
        q = split(self.query(x) * self.head_dim**-0.5)  # scaled before rotary, as in ESM-2
        k, v = split(self.key(x)), split(self.value(x))
        cos, sin = rotary_cos_sin(positions, self.inv_freq)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = attend(q, k, v, attn_mask)  # [B, H, T, hd]
        return self.out(merge_heads(o))


class Block(nn.Module):
    def __init__(self, cfg: ESM2Config):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)

    def forward(self, x, positions, attn_mask):
        x = x + self.attn(self.attn_norm(x), positions, attn_mask)
        return x + self.fc2(F.gelu(self.fc1(self.ffn_norm(x))))  # exact erf GELU


class LMHead(nn.Module):
    def __init__(self, cfg: ESM2Config):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h, embedding):  # h: [B, T, d], embedding: [33, d] (tied)
        return F.linear(self.norm(F.gelu(self.dense(h))), embedding) + self.bias


class NoLMHead(nn.Module):
    """Stands in for the LM head of a checkpoint saved without one (EsmModel, EsmFor*Classification):
    no parameters; asking it for logits is a one-line error naming the checkpoint."""

    def __init__(self, source: str | None = None):
        super().__init__()
        self.source = source

    def error(self) -> Esm2liteError:
        where = f"{self.source}: " if self.source else ""
        return Esm2liteError(
            f"{where}this checkpoint has no LM head (saved from EsmModel or a task model such as "
            "EsmForSequenceClassification), so it gives no logits; use hidden states (logits=False)")

    def forward(self, h, embedding):
        raise self.error()


def checked_request(model, repr_layers, logits: bool) -> set:
    """repr_layers as a set, checked against the depth, and logits refused without an LM head: before any work."""
    repr_layers = set(repr_layers)
    bad = [i for i in repr_layers if not 0 <= i <= model.config.num_layers]
    if bad:
        raise ValueError(f"repr_layers {bad} out of range 0..{model.config.num_layers}")
    if logits and isinstance(model.lm_head, NoLMHead):
        raise model.lm_head.error()
    return repr_layers


def run_blocks(model, x, block_args: tuple, repr_layers: set) -> dict:
    """The blocks and the final LayerNorm over x [B, T, d] (ESM-2's and ESM C's alike): block(x, *block_args),
    recomputed in backward with activation checkpointing. -> {"last_hidden_state"[, "hidden_states"]}."""
    hidden = {0: x} if 0 in repr_layers else {}
    for i, block in enumerate(model.layers):
        if model.activation_checkpointing and model.training and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(block, x, *block_args, use_reentrant=False)
        else:
            x = block(x, *block_args)
        if i + 1 in repr_layers:
            hidden[i + 1] = x
    h = model.final_norm(x)
    if model.config.num_layers in repr_layers:
        hidden[model.config.num_layers] = h
    return {"last_hidden_state": h, **({"hidden_states": hidden} if repr_layers else {})}


class ESM2(nn.Module):
    def __init__(self, config: ESM2Config, source: str | None = None):
        """source: where the weights come from, named by errors (the model does not load it)."""
        super().__init__()
        self.config = config
        # weights come from a checkpoint or init_weights: no default init (normal_ on the meta device
        # would import torch._dynamo, seconds of every command's start-up)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model, padding_idx=PAD,
                                         _weight=torch.empty(config.vocab_size, config.d_model))
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.lm_head = LMHead(config) if config.lm_head else NoLMHead(source)
        self.activation_checkpointing = False

    def embed(self, batch: Batch):
        """batch.tokens: [B, T] (packed: [1, N]) -> x: [B, T, d] with token dropout (per sequence) and
        zeroed padding rows."""
        tokens = batch.tokens
        x = self.embed_tokens(tokens)
        if self.config.token_dropout:  # applied at inference too
            is_mask = tokens.eq(MASK)
            x = x.masked_fill(is_mask[..., None], 0.0)
            observed = batch.per_sequence_sum(is_mask.to(x.dtype)) / batch.lengths  # [B]: each sequence's <mask> share
            x = x * (1 - MASK_RATIO_TRAIN) / (1 - batch.per_token(observed))[..., None]  # as ESM-2: this order
        return x * (~batch.padding)[..., None].to(x.dtype)

    def forward(self, batch, repr_layers=(), logits: bool = True) -> dict:
        """batch: a Batch, or its tokens [B, T] right-padded with <pad>.

        Returns "last_hidden_state" [B, T, d] (after the final LayerNorm), "logits"
        [B, T, 33] unless logits=False (an error when config.lm_head is False), and with repr_layers (fair-esm's convention:
        0 = embeddings, i = output of block i, L = after the final LayerNorm)
        "hidden_states" {layer: [B, T, d]}. Rows at padding positions are garbage."""
        repr_layers = checked_request(self, repr_layers, logits)
        batch = Batch.of(batch)
        positions = batch.positions  # [B, T], <cls> at 0 (packed: [1, N], restarting at each sequence)
        out = run_blocks(self, self.embed(batch), (positions, batch.attention_mask), repr_layers)
        if logits:
            out["logits"] = self.lm_head(out["last_hidden_state"], self.embed_tokens.weight)
        return out

    def init_weights(self, seed: int = 0) -> "ESM2":
        """Random initialisation (BERT-style, as HF does) for training from scratch."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif p.dim() == 1:
                nn.init.zeros_(p)
            else:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        return self
