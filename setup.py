from setuptools import find_packages, setup

setup(
    name="esm2lite",
    version="0.1.0",
    description="Exact, fast, readable ESM-2: load pretrained weights, fine-tune with fused LoRA, predict.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level folder kernels/ (the product's layout) but are installed
    # as esm2lite.kernels, so the project never claims the top-level name `kernels` (a PyPI distribution).
    packages=["esm2lite", *(f"esm2lite.{p}" for p in find_packages("esm2lite")), "esm2lite.kernels"],
    package_dir={"esm2lite.kernels": "kernels"},
    package_data={"esm2lite": ["demo/*.csv", "demo/*.md", "demo/*.fasta"]},
    entry_points={"console_scripts": [  # the command lines (python train.py / infer.py run the first two in a checkout)
        "esm2lite-train=esm2lite.commands.train:console",
        "esm2lite-infer=esm2lite.commands.infer:console",
        "esm2lite-export=esm2lite.commands.export:console",
        "esm2lite-convert=esm2lite.commands.convert:console",
        "esm2lite-plot=esm2lite.commands.plot:console",
    ]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "tqdm",
        'triton; platform_system == "Linux"',
    ],
    extras_require={
        # The oracles are pinned: parity tests compare against exactly these versions.
        # transformers 5.23.0 passes the attention mask into the embeddings again
        # (the token-dropout regression of PR #40370 was fixed by PR #44163).
        "test": [
            "pytest",
            "hypothesis",
            "transformers==5.23.0",
            "fair-esm==2.0.0",
            "peft==0.21.2",
            "scipy",
            "ruff==0.17.6",  # lint (.ci/run: ruff check .; rules in ruff.toml)
            "matplotlib",  # the plots' tests (tests/training/test_run_outputs.py)
        ],
        "hub": ["huggingface_hub"],
        "plot": ["matplotlib"],  # PNGs of a run: train.py at the end, or esm2lite-plot RUN
    },
)
