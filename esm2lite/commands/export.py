"""esm2lite-export: a fine-tuned model for transformers / peft (weights/export.py says what each
export holds).

    esm2lite-export --run RUN --merged OUT                         the encoder, LoRA merged, as an HF directory
    esm2lite-export --run RUN --peft OUT [--peft-for CLASS]       the adapters as a peft directory
"""

import os

from esm2lite.checkpoints.checkpoint_dir import read_spec
from esm2lite.checkpoints.loading import load_model
from esm2lite.checkpoints.loading import reader_inputs
from esm2lite.cli import OneLineParser, exit_process, run_main
from esm2lite.errors import Esm2liteError
from esm2lite.files.paths import check_output_dir
from esm2lite.weights.export import export_peft, merged_encoder
from esm2lite.weights.peft import PEFT_CLASSES
from esm2lite.weights.pretrained import save_hf_dir

PROG = "esm2lite-export"


def main(argv, prog: str = PROG) -> None:
    p = OneLineParser(prog=prog,
                      description="Export a fine-tuned esm2lite model for transformers / peft.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="train.py output directory (uses RUN/best)")
    src.add_argument("--checkpoint", help="a checkpoint directory")
    p.add_argument("--merged", help="write the merged encoder as an HF-layout directory here")
    p.add_argument("--peft", help="write the LoRA adapters in peft format here")
    p.add_argument("--peft-for", choices=list(PEFT_CLASSES),
                   help="the transformers class the peft adapter is loaded onto (default: EsmForMaskedLM when "
                        "the base model has an LM head, else EsmModel; the EsmFor* classes share one layout; "
                        "ESM C: the Esmc* classes alike)")
    p.add_argument("--base-path", help="where the checkpoint's base model is now, if it moved")
    p.add_argument("--overwrite", action="store_true", help="replace existing output directories")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = p.parse_args(argv)
    if not (args.merged or args.peft):
        p.error("give --merged OUT and/or --peft OUT")
    if args.peft_for and not args.peft:
        p.error("--peft-for needs --peft OUT")
    if args.merged and args.peft and os.path.abspath(args.merged) == os.path.abspath(args.peft):
        p.error("--merged and --peft need different directories")
    inputs = reader_inputs(args.run, args.checkpoint, args.base_path)  # never written into, nor replaced
    for out, flag in ((args.merged, "--merged"), (args.peft, "--peft")):
        if out:  # before any work (and before writing the other output)
            check_output_dir(out, args.overwrite, flag, inputs)
    ckpt = os.path.join(args.run, "best") if args.run else args.checkpoint
    if args.run and not os.path.isdir(ckpt):
        raise Esm2liteError(f"{args.run}: no best/ checkpoint in this run directory")
    spec = read_spec(ckpt)
    if args.peft and spec.lora is None:
        raise Esm2liteError(f"{ckpt}: --peft needs a LoRA checkpoint (this one is mode {spec.mode!r})")
    model = load_model(ckpt, base_path=args.base_path)
    if args.peft:
        export_peft(model, spec, args)
    if args.merged:
        save_hf_dir(merged_encoder(model.encoder), args.merged, overwrite=args.overwrite)
        print(f"wrote merged model to {args.merged}")


def console() -> None:
    """The esm2lite-export command."""
    exit_process(run_main(main))


if __name__ == "__main__":
    exit_process(run_main(lambda argv: main(argv, "python -m esm2lite.commands.export")))
