"""esm2lite: exact, fast, readable ESM-2 fine-tuning and inference in plain PyTorch.

    load_pretrained(path)            an ESM-2 from an HF directory, a fair-esm .pt, a BioNeMo export or a hub id
    predict(checkpoint, sequences)   a fine-tuned model's predictions, as infer.py writes them
    train_model(TrainConfig(...))    fine-tuning (esm2lite.training.loop), as train.py runs it
"""

from esm2lite.errors import CheckpointError, DataError, Esm2liteError, TokenizerError
from esm2lite.inference.pipeline import predict
from esm2lite.model.config import ESM2Config
from esm2lite.model.esm2 import ESM2
from esm2lite.model.tokenizer import Tokenizer
from esm2lite.training.config import TrainConfig
from esm2lite.training.loop import train_model
from esm2lite.weights.pretrained import load_pretrained

__all__ = ["ESM2", "ESM2Config", "Tokenizer", "TrainConfig", "load_pretrained", "predict", "train_model",
           "Esm2liteError", "CheckpointError", "DataError", "TokenizerError"]
