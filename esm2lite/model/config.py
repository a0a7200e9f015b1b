"""ESM2Config: the numbers that define an ESM-2 architecture."""

import re
from dataclasses import asdict, dataclass

from esm2lite.errors import CheckpointError, Esm2liteError
from esm2lite.files.textfiles import read_json

# name -> (layers, d_model, heads); FFN width is 4 * d_model for every released size.
RELEASED = {
    "esm2_t6_8M_UR50D": (6, 320, 20),
    "esm2_t12_35M_UR50D": (12, 480, 20),
    "esm2_t30_150M_UR50D": (30, 640, 20),
    "esm2_t33_650M_UR50D": (33, 1280, 20),
    "esm2_t36_3B_UR50D": (36, 2560, 40),
    "esm2_t48_15B_UR50D": (48, 5120, 40),
}
# A config asking for more than these is refused before anything is built or allocated (the largest
# released ESM-2, 15B, has 48 layers and 15e9 parameters; ESM C 6B has 80 layers).
MAX_PARAMETERS = 50e9
MAX_LAYERS = 512
# ESM2Config's fields under their names in a HuggingFace / BioNeMo config.json.
HF_FIELDS = {"num_layers": "num_hidden_layers", "d_model": "hidden_size", "num_heads": "num_attention_heads",
             "ffn_dim": "intermediate_size"}


@dataclass
class ESM2Config:
    num_layers: int = 6
    d_model: int = 320
    num_heads: int = 20
    ffn_dim: int = 1280
    vocab_size: int = 33
    layer_norm_eps: float = 1e-5
    token_dropout: bool = True
    lm_head: bool = True  # False: the checkpoint holds the encoder only (EsmModel, EsmFor*Classification)

    def __post_init__(self):
        for name in ("num_layers", "d_model", "num_heads", "ffn_dim", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise Esm2liteError(f"config field {name} must be a positive integer, got {value!r}")
        if not isinstance(self.lm_head, bool):
            raise Esm2liteError(f"config field lm_head must be true or false, got {self.lm_head!r}")
        if self.vocab_size != 33:
            raise Esm2liteError(f"config field vocab_size must be 33 (the ESM-2 alphabet), got {self.vocab_size}")
        if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
            raise Esm2liteError(
                f"config fields d_model={self.d_model}, num_heads={self.num_heads}: d_model must be "
                "num_heads times an even head size")
        if not (isinstance(self.layer_norm_eps, (int, float)) and 0 < self.layer_norm_eps < 1):
            raise Esm2liteError(f"config field layer_norm_eps must be in (0, 1), got {self.layer_norm_eps!r}")
        if self.num_parameters() > MAX_PARAMETERS:
            raise Esm2liteError(
                f"config asks for {self.num_parameters():.3g} parameters, more than the "
                f"{MAX_PARAMETERS:.0g} limit (fields num_layers {self.num_layers}, d_model {self.d_model}, "
                f"ffn_dim {self.ffn_dim}; is the config.json corrupt?)")
        if self.num_layers > MAX_LAYERS:
            raise Esm2liteError(
                f"config field num_layers is {self.num_layers}, more than the {MAX_LAYERS} layers esm2lite builds "
                "(ESM-2 15B has 48; is the config.json corrupt?)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def max_residues(self) -> int:
        """The longest protein read in one piece: 1026 positions (ESM-2's training crops), <cls> and <eos> included."""
        return 1022

    def num_parameters(self) -> int:
        d, f = self.d_model, self.ffn_dim
        per_layer = 4 * (d * d + d) + 2 * d * f + f + d + 4 * d  # q,k,v,out; fc1, fc2; two LNs
        lm_head = (d * d + d + 2 * d + self.vocab_size) if self.lm_head else 0
        return self.vocab_size * d + self.num_layers * per_layer + 2 * d + lm_head

    @classmethod
    def from_name(cls, name: str) -> "ESM2Config":
        """One of the six released sizes, e.g. "esm2_t33_650M_UR50D" (a "facebook/" prefix is fine)."""
        key = name.split("/")[-1]
        if key not in RELEASED:
            raise Esm2liteError(f"unknown ESM-2 model name {name!r}; known: {', '.join(RELEASED)}")
        layers, d, heads = RELEASED[key]
        return cls(num_layers=layers, d_model=d, num_heads=heads, ffn_dim=4 * d)

    @classmethod
    def from_hf_config(cls, hf: dict, source: str = "config.json") -> "ESM2Config":
        """Build from a HuggingFace EsmConfig dict. Absent fields take HF's class defaults
        (layer_norm_eps 1e-12, token_dropout False), exactly as transformers would."""
        required = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
        missing = [k for k in required if k not in hf]
        if missing:
            raise CheckpointError(f"{source}: missing field(s) {', '.join(missing)}")
        unsupported = {
            "position_embedding_type": ("rotary", hf.get("position_embedding_type", "absolute")),
            "emb_layer_norm_before": (False, bool(hf.get("emb_layer_norm_before", False))),
            "hidden_act": ("gelu", hf.get("hidden_act", "gelu")),
            "is_folding_model": (False, bool(hf.get("is_folding_model", False))),
        }
        for field, (want, got) in unsupported.items():
            if got != want:
                raise CheckpointError(f"{source}: field {field} is {got!r}; only ESM-2 ({want!r}) is supported")
        try:
            return cls(
                **{ours: hf[theirs] for ours, theirs in HF_FIELDS.items()},
                vocab_size=hf.get("vocab_size", 33),
                layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
                token_dropout=bool(hf.get("token_dropout", False)),
            )
        except Esm2liteError as e:  # named as the file names them
            message = str(e)
            for ours, theirs in HF_FIELDS.items():
                message = re.sub(rf"\b{ours}\b", theirs, message)
            raise CheckpointError(f"{source}: {message}") from None

    @classmethod
    def from_json_file(cls, path: str) -> "ESM2Config":
        return cls.from_hf_config(read_json_object(path), source=path)

    def to_hf_config(self) -> dict:
        """The config.json transformers needs for EsmForMaskedLM (EsmModel without an LM head)."""
        return {
            "architectures": ["EsmForMaskedLM" if self.lm_head else "EsmModel"],
            "model_type": "esm",
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.ffn_dim,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "max_position_embeddings": 1026,
            "layer_norm_eps": self.layer_norm_eps,
            "position_embedding_type": "rotary",
            "emb_layer_norm_before": False,
            "token_dropout": self.token_dropout,
            "pad_token_id": 1,
            "mask_token_id": 32,
            "is_folding_model": False,
            "use_cache": True,
            "torch_dtype": "float32",
        }

    def to_dict(self) -> dict:
        return asdict(self)


def read_json_object(path: str) -> dict:
    """A JSON file holding one object (a config.json), or a one-line CheckpointError naming it
    (read through textfiles: a regular file within a size cap, so a device, a FIFO or a huge file is an
    error, not a hang or a MemoryError)."""
    obj = read_json(path, CheckpointError, regular=True)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return obj
