"""esm2lite: exact, fast, readable ESM-2 fine-tuning and inference in plain PyTorch."""

from .config import ESM2Config
from .errors import CheckpointError, DataError, Esm2liteError, TokenizerError
from .model import ESM2
from .tokenizer import Tokenizer

__all__ = ["ESM2", "ESM2Config", "Tokenizer", "Esm2liteError", "CheckpointError", "DataError",
           "TokenizerError"]
