"""ESM C (ESM Cambrian), from scratch beside ESM-2 (see docs/model.md). Reads like the architecture:

    x = embed(tokens)                        a 64-row table over ESM-2's token ids; no token dropout
    for each of L blocks:                    pre-LN; each residual branch divided by s = sqrt(L / 36)
        h = LN(x)
        q, k = LN_q(W_q h), LN_k(W_k h)      bias-free projections; QK-LayerNorm over all of d, no bias
        x = x + W_o Attention(rotary(q), rotary(k), W_v h) / s
        h = LN(x)
        x = x + down(silu(gate(h)) * up(h)) / s        SwiGLU, no biases
    h = LN(x)                                "last hidden state" (no bias)
    logits = decoder(LN(gelu(dense(h))))     untied, with biases

Shapes: B sequences, T tokens, d = d_model, H heads of size hd = d / H, f = SwiGLU width.
Shared with ESM-2: the token ids, the Batch, rotary (rotate-half, base 10000) and the attention call.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from esm2lite.errors import CheckpointError, Esm2liteError
from esm2lite.model.batch import Batch
from esm2lite.model.attention import attend, merge_heads, split_heads
from esm2lite.model.esm2 import NoLMHead, apply_rotary, checked_request, rotary_cos_sin, run_blocks

# name -> (layers, d_model, heads): the open-weights sizes EvolutionaryScale released.
RELEASED = {"esmc_300m": (30, 960, 15), "esmc_600m": (36, 1152, 18), "esmc_6b": (80, 2560, 40)}
MAX_PARAMETERS, MAX_LAYERS = 50e9, 512  # as ESM2Config: a config asking for more is corrupt
HF_FIELDS = {"num_layers": "num_hidden_layers", "d_model": "hidden_size", "num_heads": "num_attention_heads",
             "ffn_dim": "intermediate_size"}


def inv_freq(head_dim: int, device) -> torch.Tensor:
    """[hd/2] fp32 rotary frequencies, base 10000: computed, never stored (no ESM C file holds them)."""
    return 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def swiglu_width(d_model: int) -> int:
    """ESM C's feed-forward width: 8/3 of d_model rounded up to a multiple of 256."""
    return -(-(8 * d_model) // (3 * 256)) * 256


@dataclass
class ESMCConfig:
    num_layers: int = 30
    d_model: int = 960
    num_heads: int = 15
    ffn_dim: int = 2560
    vocab_size: int = 64
    layer_norm_eps: float = 1e-5
    lm_head: bool = True  # False: the checkpoint holds the encoder only (EsmcModel, EsmcFor*Classification)

    def __post_init__(self):
        for name in ("num_layers", "d_model", "num_heads", "ffn_dim", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise Esm2liteError(f"config field {name} must be a positive integer, got {value!r}")
        if self.vocab_size < 33:
            raise Esm2liteError(f"config field vocab_size must hold the 33 ESM tokens, got {self.vocab_size}")
        if self.d_model % self.num_heads or self.head_dim % 2:
            raise Esm2liteError(f"config fields d_model={self.d_model}, num_heads={self.num_heads}: d_model must "
                                "be num_heads times an even head size")
        if self.num_layers > MAX_LAYERS or self.num_parameters() > MAX_PARAMETERS:
            raise Esm2liteError(f"config asks for {self.num_layers} layers and {self.num_parameters():.3g} "
                                f"parameters, more than esm2lite builds (is the config.json corrupt?)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def max_residues(self) -> int:
        """The longest protein read in one piece: ESM C's 2048 positions, <cls> and <eos> included."""
        return 2046

    @property
    def residual_scale(self) -> float:
        return math.sqrt(self.num_layers / 36)

    def num_parameters(self) -> int:
        d, f = self.d_model, self.ffn_dim
        per_layer = 4 * d * d + 2 * d + 3 * d * f + 4 * d  # q,k,v,o; q/k norms; gate, up, down; two LNs
        lm_head = (d * d + d + 2 * d + d * self.vocab_size + self.vocab_size) if self.lm_head else 0
        return self.vocab_size * d + self.num_layers * per_layer + d + lm_head

    @classmethod
    def from_name(cls, name: str) -> "ESMCConfig":
        key = name.split("/")[-1].lower()
        if key not in RELEASED:
            raise Esm2liteError(f"unknown ESM C model name {name!r}; known: {', '.join(RELEASED)}")
        layers, d, heads = RELEASED[key]
        return cls(num_layers=layers, d_model=d, num_heads=heads, ffn_dim=swiglu_width(d))

    @classmethod
    def from_hf_config(cls, hf: dict, source: str = "config.json") -> "ESMCConfig":
        """From a transformers EsmcConfig dict; what this architecture cannot compute is refused."""
        missing = [k for k in HF_FIELDS.values() if k not in hf]
        if missing:
            raise CheckpointError(f"{source}: missing field(s) {', '.join(missing)}")
        rope = hf.get("rope_parameters") or {}
        fixed = {"hidden_act": ("silu", hf.get("hidden_act", "silu")),
                 "attention_bias": (False, hf.get("attention_bias", False)), "mlp_bias": (False, hf.get("mlp_bias", False)),
                 "num_key_value_heads": (hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]),
                 "head_dim": (hf["hidden_size"] // max(hf["num_attention_heads"], 1),
                              hf.get("head_dim") or hf["hidden_size"] // max(hf["num_attention_heads"], 1)),
                 "rope_parameters": ({"rope_theta": 10000.0, "rope_type": "default"},
                                     {"rope_theta": float(rope.get("rope_theta", 10000.0)),
                                      "rope_type": rope.get("rope_type", "default")})}
        for field, (want, got) in fixed.items():
            if got != want:
                raise CheckpointError(f"{source}: field {field} is {got!r}; ESM C as released has {want!r}")
        try:
            return cls(**{ours: hf[theirs] for ours, theirs in HF_FIELDS.items()}, vocab_size=hf.get("vocab_size", 64))
        except Esm2liteError as e:
            raise CheckpointError(f"{source}: {e}") from None

    def to_hf_config(self) -> dict:
        """The config.json transformers needs for EsmcForMaskedLM (EsmcModel without an LM head)."""
        return {"architectures": ["EsmcForMaskedLM" if self.lm_head else "EsmcModel"], "model_type": "esmc",
                **{theirs: getattr(self, ours) for ours, theirs in HF_FIELDS.items()},
                "num_key_value_heads": self.num_heads, "head_dim": self.head_dim, "vocab_size": self.vocab_size,
                "hidden_act": "silu", "max_position_embeddings": 2048, "attention_bias": False, "mlp_bias": False,
                "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "pad_token_id": 1,
                "bos_token_id": 0, "eos_token_id": 2, "mask_token_id": 32, "tie_word_embeddings": False}

    def to_dict(self) -> dict:
        """Stored in checkpoints as model_config; "family" tells it from an ESM2Config (which has none)."""
        return {"family": "esmc", **asdict(self)}


class Attention(nn.Module):
    def __init__(self, cfg: ESMCConfig):
        super().__init__()
        d = cfg.d_model
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.q_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps, bias=False)
        self.k_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps, bias=False)

    def forward(self, x, rotary, attn_mask):  # x: [B, T, d]; rotary: (cos, sin) [B, 1, T, hd]
        split = lambda t: split_heads(t, self.num_heads)  # noqa: E731  [B, H, T, hd]
        q, k, v = split(self.q_norm(self.q(x))), split(self.k_norm(self.k(x))), split(self.v(x))
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        o = attend(q, k, v, attn_mask, scale=self.head_dim**-0.5)  # [B, H, T, hd]
        return self.o(merge_heads(o))


class Block(nn.Module):
    def __init__(self, cfg: ESMCConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.gate, self.up = (nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False) for _ in range(2))
        self.down = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)
        self.scale = cfg.residual_scale

    def forward(self, x, rotary, attn_mask):
        x = x + self.attn(self.attn_norm(x), rotary, attn_mask) / self.scale
        h = self.ffn_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h)) / self.scale


class LMHead(nn.Module):
    def __init__(self, cfg: ESMCConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(self, h, embedding=None):  # h: [B, T, d] -> [B, T, vocab]; not tied to the embedding
        return self.decoder(self.norm(F.gelu(self.dense(h))))


class ESMC(nn.Module):
    def __init__(self, config: ESMCConfig, source: str | None = None):
        """source: where the weights come from, named by errors (the model does not load it)."""
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model, _weight=torch.empty(config.vocab_size,
                                                                                                  config.d_model))
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=False)
        self.lm_head = LMHead(config) if config.lm_head else NoLMHead(source)
        self.activation_checkpointing = False

    def forward(self, batch, repr_layers=(), logits: bool = True) -> dict:
        """As ESM2.forward: a Batch (or tokens [B, T] right-padded with <pad>) -> "last_hidden_state"
        [B, T, d], "logits" [B, T, vocab] unless logits=False, "hidden_states" {layer: [B, T, d]} for
        repr_layers (0 = embeddings, i = output of block i, L = after the final LayerNorm)."""
        repr_layers = checked_request(self, repr_layers, logits)
        batch = Batch.of(batch)
        x = self.embed_tokens(batch.tokens)  # [B, T, d]
        rotary = rotary_cos_sin(batch.positions, inv_freq(self.config.head_dim, x.device))  # once, for every block
        out = run_blocks(self, x, (rotary, batch.attention_mask), repr_layers)
        if logits:
            out["logits"] = self.lm_head(out["last_hidden_state"])
        return out

    def init_weights(self, seed: int = 0) -> "ESMC":
        """Random initialisation (normal 0.02, LayerNorms 1, biases 0), reproducible from the seed."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if "norm" in name.split(".")[-2]:
                    p.copy_(torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))
                elif p.dim() == 1:
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        return self
