"""esm2lite-convert IN OUT_DIR: a fair-esm .pt file or a BioNeMo export (any layout
weights.pretrained.load_pretrained reads) as an HF-layout directory.

The result loads with transformers.EsmForMaskedLM.from_pretrained(OUT_DIR) and with
esm2lite.load_pretrained(OUT_DIR). The contact-regression head is not converted.
"""


from esm2lite.weights.pretrained import load_pretrained, save_hf_dir
from esm2lite.cli import OneLineParser, exit_process, run_main
from esm2lite.files.paths import Input, check_output_dir


PROG = "esm2lite-convert"


def main(argv, prog: str = PROG) -> None:
    p = OneLineParser(
        prog=prog,
        description="Convert an ESM-2 checkpoint (a fair-esm .pt file, a BioNeMo NVEsm export, "
                    "any layout esm2lite loads) into a HuggingFace-layout directory "
                    "(config.json + model.safetensors) that transformers and esm2lite load.")
    p.add_argument("input", help="the checkpoint, e.g. esm2_t33_650M_UR50D.pt or a BioNeMo export directory")
    p.add_argument("output", help="directory to create (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = p.parse_args(argv)
    check_output_dir(args.output, args.overwrite, "output directory",
                     [Input(args.input, f"the input ({args.input})")])  # before the model is loaded
    model = load_pretrained(args.input)
    save_hf_dir(model, args.output, overwrite=args.overwrite)
    print(f"wrote {args.output} ({model.config.num_layers} layers, d={model.config.d_model})")


def console() -> None:
    """The esm2lite-convert command."""
    exit_process(run_main(main))


if __name__ == "__main__":
    exit_process(run_main(lambda argv: main(argv, "python -m esm2lite.commands.convert")))
