"""kernels.lora_linear against a float64 autograd reference (never against our own code).

Triton kernels run on the CPU under TRITON_INTERPRET=1. triton.jit (and tl.rand, itself a
@triton.jit helper) reads that variable when a kernel is *defined*, i.e. at import, so setting it
inside this module is too late whenever another test module imported triton first. The
interpreter cases therefore run in one spawned worker process (session fixture `interp`) whose
environment has TRITON_INTERPRET=1 from the start; the `_case_*` functions below run there and
raise AssertionError with a message on failure. Torch-backend and GPU tests run in-process.
"""

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from esm2lite import kernels
from esm2lite.kernels.lora import draw_seed

GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA device")

TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# fp32 at real widths: a length-K fp32 sum is off by about sqrt(K) · 2^-24 relative (4e-6 at K = 5120,
# the largest reduction the GPU tests run), against 2e-6 for the interpreter's K <= 45.
GPU_TOL = {**TOL, torch.float32: 1e-5}


# ----------------------------------------------------------------------------- helpers

def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64 (NaN if `out` has unwritten, poisoned elements)."""
    out, ref = out.detach().double().reshape(-1), ref.detach().double().reshape(-1).to(out.device)
    return ((out - ref).norm() / ref.norm()).item()


def assert_close(name, out, ref, tol):
    err = rel_err(out, ref)
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.0e}"  # NaN fails too


def make_inputs(seed, lead, K, N, r, dtype, bias=True, device="cpu", ab_dtype=None):
    """Fresh random inputs (own generator, so the default one is left for the dropout seed)."""
    g = torch.Generator().manual_seed(seed)
    ab_dtype = ab_dtype or dtype

    def rand(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(device=device, dtype=dt)

    x = rand(*lead, K)
    W = rand(N, K, std=K ** -0.5)
    b = rand(N) if bias else None
    A = rand(r, K, std=K ** -0.5, dt=ab_dtype)
    B = rand(N, r, dt=ab_dtype)
    dY = rand(*lead, N)
    return x, W, b, A, B, dY


def reference(x, W, b, A, B, scale, keep, p, dY):
    """Float64 autograd of y = x W^T + b + s · (keep ⊙ x / (1-p)) A^T B^T.  x: [M, K]."""
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    xd = x64 if keep is None else x64 * keep.double() / (1 - p)
    y = x64 @ W.double().T + scale * (xd @ A64.T) @ B64.T
    if b is not None:
        y = y + b.double()
    y.backward(dY.double())
    return y.detach(), x64.grad, A64.grad, B64.grad


def run_and_check(x, W, b, A, B, dY, scale, p, backend, tol, call_seed=0):
    """lora_linear fwd+bwd (x, A, B require grad) vs the float64 reference built from the mask
    the backend regenerates for the seed this call draws."""
    K, N = W.shape[1], W.shape[0]
    x = x.detach().requires_grad_()
    A = A.detach().requires_grad_()
    B = B.detach().requires_grad_()
    torch.manual_seed(call_seed)
    seed = draw_seed()
    torch.manual_seed(call_seed)
    y = kernels.lora_linear(x, W, b, A, B, scale, dropout_p=p, training=p > 0, backend=backend)
    y.backward(dY)
    M = x.numel() // K
    keep = kernels.dropout_mask(seed, M, K, p, x.device, backend) if p > 0 else None
    y_ref, dX_ref, dA_ref, dB_ref = reference(x.reshape(M, K), W, b, A, B, scale, keep, p, dY.reshape(M, N))
    assert y.shape == (*x.shape[:-1], N) and y.dtype == x.dtype
    assert x.grad.shape == x.shape and A.grad.dtype == A.dtype and B.grad.dtype == B.dtype
    assert_close("y", y, y_ref, tol)
    assert_close("dX", x.grad, dX_ref, tol)
    assert_close("dA", A.grad, dA_ref, tol)
    assert_close("dB", B.grad, dB_ref, tol)
    return y, x.grad, A.grad, B.grad


# ----------------------------------------------------------------------------- interpreter worker

def _poison():
    from esm2lite.kernels import tiles
    tiles.POISON_OUTPUTS = True  # every kernel-written buffer starts as NaN


def _case_ready():
    from esm2lite.kernels import tiles
    assert tiles.INTERPRET, "worker did not get TRITON_INTERPRET=1 before importing triton"


@pytest.fixture(scope="session")
def interp():
    """Run a `_case_*` function in a worker process started with TRITON_INTERPRET=1."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(_case_ready).result()  # spawns the worker now, with the variable set
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    yield lambda fn, *args: pool.submit(fn, *args).result()
    pool.shutdown()


# ----------------------------------------------------------------------------- interpreter cases

def _case_api(dtype, lead, K, N, r, bias, p, seed):
    _poison()
    x, W, b, A, B, dY = make_inputs(seed, lead, K, N, r, dtype, bias)
    run_and_check(x, W, b, A, B, dY, 0.7, p, "triton", TOL[dtype], call_seed=seed)


def _case_strategy(dtype, r, p, in_loop, seed):
    """lora_forward / lora_backward with S and dS forced in-loop or separate (poisoned outputs)."""
    from esm2lite.kernels.lora_bwd import lora_backward
    from esm2lite.kernels.lora_fwd import lora_forward
    _poison()
    M, K, N, s = 37, 29, 45, 0.5
    x, W, b, A, B, dY = make_inputs(seed, (M,), K, N, r, dtype)
    y, S = lora_forward(x, W, b, A, B, s, p, seed, need_S=True, in_loop=in_loop)
    dX, dA, dB = lora_backward(dY, x, W, A, B, S, s, p, seed, True, True, True, in_loop=in_loop)
    keep = kernels.dropout_mask(seed, M, K, p, "cpu", "triton") if p > 0 else None
    y_ref, dX_ref, dA_ref, dB_ref = reference(x, W, b, A, B, s, keep, p, dY)
    tol = TOL[dtype]
    for name, out, ref in [("y", y, y_ref), ("dX", dX, dX_ref), ("dA", dA, dA_ref), ("dB", dB, dB_ref)]:
        assert_close(f"{name} (in_loop={in_loop})", out, ref, tol)


def _case_in_loop_not_taken(r, p):
    from esm2lite.kernels.lora_bwd import lora_backward
    from esm2lite.kernels.lora_fwd import lora_forward
    x, W, b, A, B, dY = make_inputs(3, (37,), 29, 45, r, torch.float32)
    outs = []
    for in_loop in (True, False):
        y, S = lora_forward(x, W, b, A, B, 0.5, p, 99, need_S=True, in_loop=in_loop)
        outs.append((y, S, *lora_backward(dY, x, W, A, B, S, 0.5, p, 99, True, True, True, in_loop=in_loop)))
    for name, a, b_ in zip(("y", "S", "dX", "dA", "dB"), *outs):
        assert torch.equal(a, b_), f"{name} differs between in_loop=True and False (r={r}, p={p})"


def _case_noncontiguous(kind, seed):
    _poison()
    K, N, r = 29, 45, 8
    if kind == "transposed":   # x: [M, K] with strides (1, M)
        x, W, b, A, B, dY = make_inputs(seed, (37,), K, N, r, torch.float32)
        x = x.T.contiguous().T
    elif kind == "row-sliced":  # x: [3, 13, K] taken from every other row of [3, 26, K]
        base, W, b, A, B, _ = make_inputs(seed, (3, 26), K, N, r, torch.float32)
        x, dY = base[:, ::2], make_inputs(seed + 1, (3, 13), K, N, r, torch.float32)[-1]
    else:                       # "col-strided": x[:, ::2] of [M, 2K]
        base = make_inputs(seed, (37,), 2 * K, N, r, torch.float32)[0]
        _, W, b, A, B, dY = make_inputs(seed, (37,), K, N, r, torch.float32)
        x = base[:, ::2]
    assert not x.is_contiguous()
    run_and_check(x, W, b, A, B, dY, 0.7, 0.2, "triton", TOL[torch.float32], call_seed=seed)


def _case_deterministic(p):
    """Two backward passes (same seed) give bitwise identical dX, dA, dB."""
    x, W, b, A, B, dY = make_inputs(5, (50,), 29, 45, 16, torch.float32)
    grads = []
    for _ in range(2):
        xg, Ag, Bg = (t.detach().requires_grad_() for t in (x, A, B))
        torch.manual_seed(11)
        kernels.lora_linear(xg, W, b, Ag, Bg, 0.5, p, training=True, backend="triton").backward(dY)
        grads.append((xg.grad, Ag.grad, Bg.grad))
    for name, g1, g2 in zip(("dX", "dA", "dB"), *grads):
        assert torch.equal(g1, g2), f"{name} differs between two identical backward runs"


def _case_keep_rate(p):
    keep = kernels.dropout_mask(1234, 128, 192, p, "cpu", "triton")
    assert keep.dtype == torch.bool and keep.shape == (128, 192)
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 0.015, f"keep rate {rate:.4f} vs 1-p = {1 - p}"
    other = kernels.dropout_mask(1235, 128, 192, p, "cpu", "triton")
    assert not torch.equal(keep, other), "different seeds gave the same mask"


def _case_mixed_dtypes_autocast(use_autocast):
    """fp16 compute with fp32 master A, B: explicit fp16 x, or fp32 x under CPU fp16 autocast."""
    _poison()
    K, N, r = 29, 45, 8
    x, W, b, A, B, dY = make_inputs(3, (37,), K, N, r, torch.float16, ab_dtype=torch.float32)
    if use_autocast:
        x, W, b = x.float(), W.float(), b.float()
    xg, Ag, Bg = (t.detach().requires_grad_() for t in (x, A, B))
    with torch.autocast("cpu", dtype=torch.float16, enabled=use_autocast):
        y = kernels.lora_linear(xg, W, b, Ag, Bg, 0.5, backend="triton")
    assert y.dtype == torch.float16
    y.backward(dY)
    assert (xg.grad.dtype, Ag.grad.dtype, Bg.grad.dtype) == (x.dtype, torch.float32, torch.float32)
    half = [t.half() for t in (x, W, b, A, B)]  # the reference sees the inputs the kernels saw
    y_ref, dX_ref, dA_ref, dB_ref = reference(half[0], half[1], half[2], half[3], half[4], 0.5, None, 0, dY)
    for name, out, ref in [("y", y, y_ref), ("dX", xg.grad, dX_ref), ("dA", Ag.grad, dA_ref), ("dB", Bg.grad, dB_ref)]:
        assert_close(name, out, ref, 2e-3)


def _case_frozen_base_gets_no_grad():
    x, W, b, A, B, dY = make_inputs(4, (37,), 29, 45, 8, torch.float32)
    W.requires_grad_()
    b.requires_grad_()
    kernels.lora_linear(x, W, b, A.requires_grad_(), B.requires_grad_(), 0.5, backend="triton").backward(dY)
    assert W.grad is None and b.grad is None and A.grad is not None and B.grad is not None


# ----------------------------------------------------------------------------- interpreter tests

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("r", [1, 8, 16, 33])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p.25"])
def test_triton_matches_float64(interp, dtype, r, bias, p):
    lead = (3, 13) if (r + bias) % 2 else (37,)  # half the cases with 3-D x
    interp(_case_api, dtype, lead, 29, 45, r, bias, p, 1000 * r + 10 * bias + int(100 * p))


@pytest.mark.parametrize("in_loop,dtype,r,p", [
    (True, torch.float32, 31, 0.0), (True, torch.float16, 32, 0.0), (True, torch.float16, 8, 0.0),
    (False, torch.float32, 33, 0.0), (False, torch.float32, 8, 0.3), (False, torch.float16, 16, 0.3),
    (False, torch.float16, 128, 0.0)])
def test_triton_s_strategies(interp, in_loop, dtype, r, p):
    interp(_case_strategy, dtype, r, p, in_loop, 7 + r)


@pytest.mark.parametrize("r,p", [(8, 0.3), (33, 0.0)], ids=["dropout", "rank-above-32"])
def test_triton_rank_projection_leaves_the_loop(interp, r, p):
    """With dropout or r_pad > 32 the launchers compute S and dS in their own kernels even when
    the in-loop strategy is preferred: the results are the same, bit for bit."""
    interp(_case_in_loop_not_taken, r, p)


@pytest.mark.parametrize("kind", ["transposed", "row-sliced", "col-strided"])
def test_triton_noncontiguous_x(interp, kind):
    interp(_case_noncontiguous, kind, 21)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_triton_grads_bitwise_deterministic(interp, p):
    interp(_case_deterministic, p)


def test_triton_dropout_keep_rate(interp):
    interp(_case_keep_rate, 0.3)


@pytest.mark.parametrize("use_autocast", [False, True], ids=["fp16-x", "autocast"])
def test_triton_fp32_master_adapters(interp, use_autocast):
    interp(_case_mixed_dtypes_autocast, use_autocast)


def test_triton_frozen_base_gets_no_grad(interp):
    interp(_case_frozen_base_gets_no_grad)


# ----------------------------------------------------------------------------- torch backend

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("r", [1, 16, 33, 128])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p.25"])
def test_torch_matches_float64(dtype, r, bias, p):
    lead = (3, 13) if (r + bias) % 2 else (37,)
    x, W, b, A, B, dY = make_inputs(r + 7 * bias, lead, 29, 45, r, dtype, bias)
    run_and_check(x, W, b, A, B, dY, 0.7, p, "torch", TOL[dtype], call_seed=r)


def test_torch_noncontiguous_x():
    base, W, b, A, B, _ = make_inputs(1, (3, 26), 29, 45, 8, torch.float32)
    dY = make_inputs(2, (3, 13), 29, 45, 8, torch.float32)[-1]
    run_and_check(base[:, ::2], W, b, A, B, dY, 0.7, 0.2, "torch", TOL[torch.float32])


def test_torch_autocast_bf16():
    x, W, b, A, B, dY = make_inputs(9, (2, 19), 29, 45, 8, torch.float32)
    xg, Ag, Bg = (t.detach().requires_grad_() for t in (x, A, B))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.lora_linear(xg, W, b, Ag, Bg, 0.5, backend="torch")
    assert y.dtype == torch.bfloat16
    y.backward(dY.bfloat16())
    assert (xg.grad.dtype, Ag.grad.dtype, Bg.grad.dtype) == (torch.float32,) * 3
    bf = [t.bfloat16() for t in (x, W, b, A, B)]
    refs = reference(bf[0].reshape(-1, 29), *bf[1:], 0.5, None, 0, dY.bfloat16().reshape(-1, 45))
    for name, out, ref in zip(("y", "dX", "dA", "dB"), (y, xg.grad, Ag.grad, Bg.grad), refs):
        assert_close(name, out, ref, TOL[torch.bfloat16])


def test_torch_dropout_reproducible_and_eval_is_identity():
    x, W, b, A, B, _ = make_inputs(2, (37,), 29, 45, 8, torch.float32)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(kernels.lora_linear(x, W, b, A, B, 0.5, dropout_p=0.5, training=True, backend="torch"))
    assert torch.equal(outs[0], outs[1]), "same torch.manual_seed, different dropout"
    y_eval = kernels.lora_linear(x, W, b, A, B, 0.5, dropout_p=0.5, training=False, backend="torch")
    y_ref = reference(x, W, b, A, B, 0.5, None, 0, torch.zeros(37, 45))[0]
    assert_close("y (eval)", y_eval, y_ref, TOL[torch.float32])
    assert not torch.allclose(outs[0], y_eval), "training=True with p=0.5 did not drop anything"


def test_torch_dropout_keep_rate():
    keep = kernels.dropout_mask(1234, 512, 640, 0.3, "cpu", "torch")
    assert keep.dtype == torch.bool and abs(keep.float().mean().item() - 0.7) < 0.01


def test_torch_frozen_base_gets_no_grad_and_1d_x():
    x, W, b, A, B, dY = make_inputs(4, (), 29, 45, 8, torch.float32)
    W.requires_grad_()
    b.requires_grad_()
    A.requires_grad_()
    y = kernels.lora_linear(x, W, b, A, B, 0.5, backend="torch")
    assert y.shape == (45,)
    y.backward(dY)
    assert W.grad is None and b.grad is None and A.grad is not None


def test_each_dtype_tunes_among_its_own_tiles():
    """fp32 launches see only the FMA tiles, bf16/fp16 only the tensor-core tiles, for every kernel
    (the compile check compiles each list in its own dtypes; a mix would compile fp32 into tiles
    that spill)."""
    from esm2lite.kernels import lora_bwd, lora_fwd, tiles
    if tiles.INTERPRET:
        pytest.skip("one shared config under the interpreter")
    for kernel in (lora_fwd._rank_proj_kernel, lora_fwd._lora_fwd_kernel, lora_bwd._lora_dx_kernel,
                   lora_bwd._rank_grad_kernel):
        kept = {}
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            first = torch.empty(0, dtype=dtype, device="meta")
            kept[dtype] = kernel.early_config_prune(kernel.configs, {"first": first}, R=16, DROPOUT=False)
            want = "fma" if dtype == torch.float32 else "mma"
            assert kept[dtype] and all(c.kinds == {want} for c in kept[dtype]), (kernel.base_fn.__name__, dtype)
        assert all(len(c.kinds) == 1 for c in kernel.configs)  # no tile serves both kinds


def test_fp32_keeps_the_rank_product_out_of_the_gemm_loop_unless_forced():
    from esm2lite.kernels.tiles import rank_block, rank_in_loop
    # d = 320 at r = 16: memory bound, so in the loop for the tensor cores
    assert rank_in_loop(16, 320, 320, 0.0, "mma") and not rank_in_loop(16, 320, 320, 0.0, "fma")
    assert rank_in_loop(16, 320, 320, 0.0, "fma", prefer=True)   # the tests force each strategy
    assert not rank_in_loop(16, 320, 320, 0.1, "mma", prefer=True)  # dropout: never in the loop
    assert (rank_block(128, "mma"), rank_block(128, "fma"), rank_block(8, "fma")) == (128, 16, 16)


# ----------------------------------------------------------------------------- backends and errors

def test_backend_selection(monkeypatch):
    from esm2lite.kernels.lora import resolve_backend
    cpu = torch.device("cpu")
    monkeypatch.delenv("ESM2LITE_KERNELS", raising=False)
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    monkeypatch.setenv("ESM2LITE_KERNELS", "torch")
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    monkeypatch.setenv("ESM2LITE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="ESM2LITE_KERNELS"):
        resolve_backend("auto", cpu)
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("cutlass", cpu)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter allows CPU tensors")
def test_triton_backend_on_cpu_without_interpreter_raises():
    x, W, b, A, B, _ = make_inputs(0, (4,), 29, 45, 8, torch.float32)
    with pytest.raises(ValueError, match="CUDA"):
        kernels.lora_linear(x, W, b, A, B, 0.5, backend="triton")


def test_unknown_backend_raises():
    x, W, b, A, B, _ = make_inputs(0, (4,), 29, 45, 8, torch.float32)
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.lora_linear(x, W, b, A, B, 0.5, backend="cuda")


@pytest.mark.parametrize("bad,match", [
    ("x_last_dim", "x's last dim"),
    ("a_k", "lora_a must be"),
    ("b_rank", "lora_b must be"),
    ("b_n", "lora_b must be"),
    ("bias", "bias must be"),
    ("rank", "rank r"),
    ("weight_dim", "weight must be"),
    ("dropout", "dropout_p"),
    ("int_x", "floating point"),
])
def test_bad_inputs_raise_value_error(bad, match):
    x, W, b, A, B, _ = make_inputs(0, (4,), 29, 45, 8, torch.float32)
    p = 0.0
    if bad == "x_last_dim":
        x = x[:, :28]
    elif bad == "a_k":
        A = A[:, :28]
    elif bad == "b_rank":
        B = B[:, :7]
    elif bad == "b_n":
        B = B[:44]
    elif bad == "bias":
        b = b[:44]
    elif bad == "rank":
        A, B = torch.zeros(129, 29), torch.zeros(45, 129)
    elif bad == "weight_dim":
        W = W[None]
    elif bad == "dropout":
        p = 1.0
    elif bad == "int_x":
        x = x.long()
    with pytest.raises(ValueError, match=match):
        kernels.lora_linear(x, W, b, A, B, 0.5, dropout_p=p, training=True)


# ----------------------------------------------------------------------------- GPU

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gpu_large_vs_float64(dtype, p):
    from esm2lite.kernels import tiles
    tiles.POISON_OUTPUTS = True
    try:
        x, W, b, A, B, dY = make_inputs(0, (8, 2048), 1280, 1280, 16, dtype, device="cuda",
                                        ab_dtype=torch.float32)
        run_and_check(x, W, b, A, B, dY, 2.0, p, "triton", GPU_TOL[dtype])
    finally:
        tiles.POISON_OUTPUTS = False


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("K,N,r", [(1280, 1280, 16), (640, 2560, 64), (2560, 640, 8), (480, 480, 128)])
@pytest.mark.parametrize("in_loop,p", [(True, 0.0), (False, 0.0), (False, 0.1)],
                         ids=["S-in-loop", "S-separate", "S-separate-dropout"])
def test_gpu_s_strategies_bf16(K, N, r, in_loop, p):
    from esm2lite.kernels.lora_bwd import lora_backward
    from esm2lite.kernels.lora_fwd import lora_forward
    M, s = 4099, 0.5
    x, W, b, A, B, dY = make_inputs(1, (M,), K, N, r, torch.bfloat16, device="cuda")
    y, S = lora_forward(x, W, b, A, B, s, p, 77, need_S=True, in_loop=in_loop)
    dX, dA, dB = lora_backward(dY, x, W, A, B, S, s, p, 77, True, True, True, in_loop=in_loop)
    keep = kernels.dropout_mask(77, M, K, p, "cuda", "triton") if p > 0 else None
    refs = reference(x, W, b, A, B, s, keep, p, dY)
    for name, out, ref in zip(("y", "dX", "dA", "dB"), (y, dX, dA, dB), refs):
        assert_close(name, out, ref, TOL[torch.bfloat16])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_compiled_kernels_do_not_spill(dtype):
    """What the compile check says without a GPU, read from the loaded kernels on this one: the
    heaviest launches of each dot kind (tensor-core tiles in bf16, FMA tiles in fp32), every
    kernel this process loaded."""
    from triton.runtime.jit import JITFunction

    from esm2lite.kernels import lora_bwd, lora_fwd
    for K, N, r, p in [(1280, 1280, 16, 0.0), (320, 320, 32, 0.0), (1280, 5120, 64, 0.1), (5120, 1280, 128, 0.1)]:
        x, W, b, A, B, dY = make_inputs(2, (4096,), K, N, r, dtype, device="cuda")
        run_and_check(x, W, b, A, B, dY, 2.0, p, "triton", GPU_TOL[dtype])
    loaded = []
    for module in (lora_fwd, lora_bwd):
        for obj in vars(module).values():
            fn = getattr(obj, "fn", obj)
            if isinstance(fn, JITFunction):
                loaded += [k for cache in fn.device_caches.values() for k in cache[0].values()]
    assert loaded
    spills = [(k.name, k.n_regs, k.n_spills) for k in loaded if k.n_spills]
    assert not spills, spills


@gpu
@pytest.mark.gpu
def test_gpu_triton_and_torch_backends_agree_and_grads_deterministic():
    x, W, b, A, B, dY = make_inputs(2, (16384,), 1280, 1280, 16, torch.bfloat16, device="cuda",
                                    ab_dtype=torch.float32)
    results = {}
    for backend in ("torch", "triton", "triton"):
        xg, Ag, Bg = (t.detach().requires_grad_() for t in (x, A, B))
        y = kernels.lora_linear(xg, W, b, Ag, Bg, 2.0, backend=backend)
        y.backward(dY)
        out = (y, xg.grad, Ag.grad, Bg.grad)
        if backend in results:
            for name, g1, g2 in zip(("y", "dX", "dA", "dB"), results[backend], out):
                assert torch.equal(g1, g2), f"triton {name} differs between two identical runs"
        results[backend] = out
    for name, t, ref in zip(("y", "dX", "dA", "dB"), results["triton"], results["torch"]):
        assert_close(f"{name} triton vs torch", t, ref, 2e-2)
