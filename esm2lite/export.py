"""python -m esm2lite.export --run DIR (--merged OUT | --peft OUT)

--merged: the encoder with LoRA merged into its weights, as an HF-layout directory that
          transformers (EsmForMaskedLM / EsmModel) and esm2lite load. The task head is not
          part of that layout; it stays in the esm2lite checkpoint.
--peft:   the adapters in HF peft format (adapter_config.json + adapter_model.safetensors).
"""

import os
import sys

import torch

from .checkpoint import save_hf_dir
from .ckpt_dir import load_model, read_spec
from .cli import OneLineParser, run_main
from .errors import Esm2liteError
from .lora import merge_lora
from .model import ESM2


def merged_encoder(encoder: ESM2) -> ESM2:
    """A plain ESM2 whose weights include the merged adapters (if any)."""
    merge_lora(encoder)
    state = {k: v for k, v in encoder.state_dict().items() if "lora_" not in k}
    with torch.device("meta"):
        plain = ESM2(encoder.config)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain.eval()


def check_output_dir(path: str, overwrite: bool) -> None:
    """Fail before any work (and before writing the other output) if `path` cannot be written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise Esm2liteError(f"{path}: exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise Esm2liteError(f"{path}: output directory exists and is not empty (--overwrite replaces it)")


def main(argv=None):
    p = OneLineParser(prog="python -m esm2lite.export",
                      description="Export a fine-tuned esm2lite model for transformers / peft.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="train.py output directory (uses RUN/best)")
    src.add_argument("--checkpoint", help="a checkpoint directory")
    p.add_argument("--merged", help="write the merged encoder as an HF-layout directory here")
    p.add_argument("--peft", help="write the LoRA adapters in peft format here")
    p.add_argument("--base-path", help="where the checkpoint's base model is now, if it moved")
    p.add_argument("--overwrite", action="store_true", help="replace existing output directories")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = p.parse_args(argv)
    if not (args.merged or args.peft):
        p.error("give --merged OUT and/or --peft OUT")
    if args.merged and args.peft and os.path.abspath(args.merged) == os.path.abspath(args.peft):
        p.error("--merged and --peft need different directories")
    for out in (args.merged, args.peft):
        if out:
            check_output_dir(out, args.overwrite)
    ckpt = os.path.join(args.run, "best") if args.run else args.checkpoint
    if args.run and not os.path.isdir(ckpt):
        raise Esm2liteError(f"{args.run}: no best/ checkpoint in this run directory")
    spec = read_spec(ckpt)
    if args.peft and spec.lora is None:
        raise Esm2liteError(f"{ckpt}: --peft needs a LoRA checkpoint (this one is mode {spec.mode!r})")
    model = load_model(ckpt, base_path=args.base_path)
    if args.peft:
        from .peft_io import save_peft_adapter

        save_peft_adapter(model.encoder, args.peft, base_model_name_or_path=args.base_path or spec.base.path,
                          overwrite=args.overwrite)
        print(f"wrote peft adapter to {args.peft}")
    if args.merged:
        save_hf_dir(merged_encoder(model.encoder), args.merged, overwrite=args.overwrite)
        print(f"wrote merged model to {args.merged}")


if __name__ == "__main__":
    sys.exit(run_main(main))
