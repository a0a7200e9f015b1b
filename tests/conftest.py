import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# The tests mirror the package's folders; a few import helpers from another folder's tests (test_train's
# small trained runs, test_infer's CLI runner...), so every folder is importable from every test.
sys.path[1:1] = [str(d) for d in sorted(Path(__file__).parent.iterdir()) if d.is_dir() and d.name != "__pycache__"]

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
def esmc_tiny(tmp_path_factory):
    """A tiny random ESM C directory saved by transformers' EsmcForMaskedLM (every weight far from its default)."""
    return oracles.make_esmc_checkpoint(tmp_path_factory.mktemp("esmc_tiny"), layers=2, d=64, heads=4, ffn=176, seed=3)


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

    root = str(Path(__file__).resolve().parent.parent)  # conftest.py stays at the top of tests/
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "CUDA_VISIBLE_DEVICES": ""}
    zygote = Zygote(env)
    yield zygote
    zygote.close()


# ----------------------------------------------------------------------------- benchmarks/gpu_check.py
# Two environment variables that the device command sets; without them pytest is unchanged.

def pytest_collection_modifyitems(config, items):
    """ESM2LITE_TEST_SHARD="k/n": run only every n-th test from the k-th (k = 0 .. n-1), so n
    processes share a run (the GPU tests compile their kernels in parallel that way)."""
    import os

    shard = os.environ.get("ESM2LITE_TEST_SHARD")
    if not shard:
        return
    k, n = (int(v) for v in shard.split("/"))
    if not 0 <= k < n:
        raise pytest.UsageError(f"ESM2LITE_TEST_SHARD={shard}: want k/n with 0 <= k < n")
    keep, drop = items[k::n], [item for i, item in enumerate(items) if i % n != k]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_runtest_logreport(report):
    """ESM2LITE_TEST_REPORT=FILE: one JSON line per test appended to FILE as soon as it ends
    (outcome, seconds, the failure's text), so a run stopped at a time limit keeps what ran."""
    import json
    import os

    path = os.environ.get("ESM2LITE_TEST_REPORT")
    if not path or not (report.when == "call" or report.outcome != "passed"):
        return
    line = {"test": report.nodeid, "outcome": report.outcome, "when": report.when,
            "seconds": round(report.duration, 3)}
    if report.outcome != "passed":
        line["message"] = str(report.longrepr)[-4000:]
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
