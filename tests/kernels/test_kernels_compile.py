"""Every Triton kernel compiles, fits and does not spill on H100/H200 (sm_90) and A100 (sm_80), on a
machine without a GPU (how: tests/aot.py).

One process per architecture compiles, through the project's own launchers and triton's own
binder and autotuner, the units of `aot.cover`: in bf16 and fp32 the ESM-2 shapes (d = 320 ...
5120 and 4d), ranks 8 ... 128, token counts that are and are not multiples of 16, dropout on and
off, with and without bias, the first layer (no dX), both S strategies; in fp16 one launch that
reaches every config. Every kernel x autotune config x architecture x dtype is compiled at least
once; bf16/fp16 (tensor-core tiles) and fp32 (FMA tiles) at the heaviest flags the model reaches
(the largest rank in and out of the loop, dropout, bias). Units are cached within the run (one
triton cache); nothing is reused between runs.
"""

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest

import aot

pytestmark = pytest.mark.slow
ARCHS = (90, 80)
DTYPES = ("bf16", "fp16", "fp32")
FULL = ("bf16", "fp32")  # the dtypes compiled at every shape and flag of the cover


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """arch -> {"units": [...], "failures": [...], "configs": {kernel: {dtype: [config label, ...]}}}."""
    cache = str(tmp_path_factory.mktemp("triton_cache"))
    with ProcessPoolExecutor(len(ARCHS), mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {arch: pool.submit(aot.compile_cover, arch, DTYPES, FULL, cache) for arch in ARCHS}
        return {arch: job.result() for arch, job in jobs.items()}


def units(compiled):
    return [u for arch in ARCHS for u in compiled[arch]["units"]]


def where(u):
    return f"{u['kernel']} sm_{u['arch']} {u['dtype']} {u['config']} {u['flags']} (from {u['launch']})"


def test_every_launch_binds_and_compiles(compiled):
    failures = [f"sm_{arch}: {f}" for arch in ARCHS for f in compiled[arch]["failures"]]
    assert not failures, "\n".join(failures)


def test_every_kernel_config_arch_and_dtype_is_compiled(compiled):
    missing = []
    for arch in ARCHS:
        done = {(u["kernel"], u["dtype"], u["config"]) for u in compiled[arch]["units"]}
        for kernel, configs in compiled[arch]["configs"].items():
            missing += [f"{kernel} sm_{arch} {dt} {c}" for dt in DTYPES for c in configs[dt] if (kernel, dt, c) not in done]
    assert not missing, "never compiled:\n" + "\n".join(missing)
    assert {u["kernel"] for u in units(compiled)} >= {"_dropout_mask_kernel", *compiled[90]["configs"]}


def test_ptxas_reported_every_unit(compiled):
    """Registers and spills are read from ptxas -v: a unit without that report could hide a spill."""
    silent = [where(u) for u in units(compiled) if not u["has_log"]]
    assert not silent, "no ptxas report for:\n" + "\n".join(silent)


def test_shared_memory_fits_the_architecture(compiled):
    over = [f"{where(u)}: {u['shared']} B > {aot.SMEM_LIMIT[u['arch']]} B"
            for u in units(compiled) if u["shared"] > aot.SMEM_LIMIT[u["arch"]]]
    assert not over, "\n".join(over)


def test_registers_fit_one_block(compiled):
    """registers x threads <= 64K (allocated per warp in units of 256)."""
    def per_block(u):
        return -(-u["registers"] * 32 // 256) * 256 * u["num_warps"]
    over = [f"{where(u)}: {u['registers']} registers x {u['num_warps']} warps"
            for u in units(compiled) if per_block(u) > aot.REGISTERS_PER_BLOCK]
    assert not over, "\n".join(over)


def test_no_register_spills(compiled):
    spills = [f"{where(u)}: {u['spilled']} B spilled, {u['registers']} registers"
              for u in units(compiled) if u["spilled"]]
    assert not spills, "\n".join(spills)


def test_hopper_gemms_use_warpgroup_mma(compiled):
    """bf16/fp16 GEMMs: Hopper's warpgroup MMA. (fp32 dots are ieee FMA by design: no TF32.)"""
    gemms = [u for u in compiled[90]["units"] if u["kernel"] in aot.GEMM_KERNELS and u["dtype"] != "fp32"]
    assert gemms
    assert all(u["wgmma"] for u in gemms), "\n".join(where(u) for u in gemms if not u["wgmma"])
