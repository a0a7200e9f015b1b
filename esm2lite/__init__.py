"""esm2lite: exact, fast, readable ESM-2 fine-tuning and inference in plain PyTorch."""

from esm2lite.model.config import ESM2Config
from esm2lite.errors import CheckpointError, DataError, Esm2liteError, TokenizerError
from esm2lite.model.esm2 import ESM2
from esm2lite.model.tokenizer import Tokenizer
from esm2lite.weights.pretrained import load_pretrained

__all__ = ["ESM2", "ESM2Config", "Tokenizer", "load_pretrained", "Esm2liteError", "CheckpointError", "DataError",
           "TokenizerError"]
