import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import oracles  # noqa: E402


@pytest.fixture(scope="session")
def tiny_inv_freq():
    return oracles.perturbed_inv_freq(oracles.TINY["d"] // oracles.TINY["heads"], seed=7)


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory, tiny_inv_freq):
    """A tiny random HF EsmForMaskedLM directory with a perturbed inv_freq."""
    return oracles.make_hf_checkpoint(tmp_path_factory.mktemp("hf_tiny"), **oracles.TINY, seed=1,
                                      inv_freq=tiny_inv_freq)


@pytest.fixture(scope="session")
def fair_tiny(tmp_path_factory, tiny_inv_freq):
    """A tiny random fair-esm .pt with a perturbed inv_freq."""
    return oracles.make_fair_esm_checkpoint(tmp_path_factory.mktemp("fair_tiny") / "tiny.pt", **oracles.TINY,
                                            seed=2, inv_freq=tiny_inv_freq)


@pytest.fixture(scope="session")
def forkrun():
    """forkrun.Zygote: `python SCRIPT ARGS` in a forked child of a process that imported torch and
    esm2lite once (CUDA hidden, the repository on PYTHONPATH, as the CLI tests run it)."""
    import os

    from forkrun import Zygote

    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "CUDA_VISIBLE_DEVICES": ""}
    zygote = Zygote(env)
    yield zygote
    zygote.close()
