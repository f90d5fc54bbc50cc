"""Each CUDA kernel against its torch reference (workers/kernels/reference.py), on random inputs and
awkward shapes; references run in float64 on upcast inputs."""
from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)
cupy = pytest.importorskip("cupy")

from workers.kernels import reference as ref  # noqa: E402
from workers.kernels.gemv import gemv, supported as gemv_supported  # noqa: E402
from workers.kernels.paged_attention import paged_decode_attention  # noqa: E402
from workers.kernels.rms_norm import rms_norm  # noqa: E402
from workers.kernels.rope_cache import rope_and_cache_write  # noqa: E402
from workers.kernels.silu_mul import silu_mul  # noqa: E402
from workers.kernels.skinny_gemm import fits as skinny_fits, skinny_gemm, supported as skinny_supported  # noqa: E402
from workers.kernels import stream_gemv as stream  # noqa: E402
from workers.kernels import tma_gemm as tma  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    """||out - want|| / ||want|| in float64; inf when out holds a NaN (unwritten poisoned memory)."""
    out, want = out.double(), want.double()
    if torch.isnan(out).any():
        return math.inf
    return ((out - want).norm() / want.norm().clamp_min(1e-30)).item()


def poison() -> None:
    """Fill freed allocator blocks with NaN so an unwritten output element shows up."""
    big = torch.full((32 * 1024 * 1024,), float("nan"), device="cuda")
    del big
    for n in (1 << 12, 1 << 16, 1 << 20):
        torch.full((n,), float("nan"), device="cuda")


def rnd(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device="cuda", dtype=torch.float32) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", [(1, 4096), (7, 64), (33, 1000), (3, 13), (2, 8192), (2, 20000)])
@pytest.mark.parametrize("with_res", [False, True])
def test_rms_norm(dtype, T, H, with_res):
    x, w = rnd(T, H, dtype=dtype), rnd(H, dtype=dtype, scale=0.5) + 1
    r = rnd(T, H, dtype=dtype) if with_res else None
    poison()
    out, res = rms_norm(x, w, 1e-5, r)
    want, want_res = ref.rms_norm(x.double(), w.double(), 1e-5, None if r is None else r.double())
    assert rel_err(out, want) < TOL[dtype]
    if with_res:
        assert torch.equal(res, x + r)           # the same rounding as torch's add
    else:
        assert res is x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,I", [(1, 14336), (5, 8), (3, 13), (17, 2048)])
def test_silu_mul(dtype, T, I):
    x = rnd(T, 2 * I, dtype=dtype, scale=2.0)
    poison()
    out = silu_mul(x)
    assert out.shape == (T, I)
    assert rel_err(out, ref.silu_mul(x.double())) < TOL[dtype]


def test_silu_mul_strided_rows():
    x = rnd(4, 2 * 64 + 8, dtype=torch.bfloat16)[:, : 2 * 64]   # rows padded: stride != 2I
    assert rel_err(silu_mul(x), ref.silu_mul(x.double())) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nh,nkv,hd,bs", [(32, 8, 128, 16), (4, 2, 16, 5), (6, 1, 64, 1)])
def test_rope_and_cache_write(dtype, nh, nkv, hd, bs):
    T, nblocks, maxpos = 19, 40, 4096
    from workers.rope import inv_frequencies

    inv = inv_frequencies(hd, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 1024})
    freqs = torch.outer(torch.arange(maxpos, dtype=torch.float32), inv).cuda()
    cos, sin = freqs.cos(), freqs.sin()
    q, k, v = rnd(T, nh, hd, dtype=dtype), rnd(T, nkv, hd, dtype=dtype), rnd(T, nkv, hd, dtype=dtype)
    positions = torch.randint(0, maxpos, (T,), device="cuda")
    slots = torch.randperm(nblocks * bs, device="cuda")[:T]
    slots[3] = -1                                            # padding row: nothing stored
    kc, vc = rnd(nblocks + 1, bs, nkv, hd, dtype=dtype), rnd(nblocks + 1, bs, nkv, hd, dtype=dtype)
    q2, k2, kc2, vc2, kc0 = q.clone(), k.clone(), kc.clone(), vc.clone(), kc.clone()
    rope_and_cache_write(q, k, v, positions, cos, sin, kc, vc, slots)
    keep = slots >= 0
    ref.rope_and_cache_write(q2, k2, v, positions, cos, sin, kc2, vc2, torch.where(keep, slots, nblocks * bs))  # spare block
    tol = 0 if dtype == torch.float32 else 1e-2
    assert rel_err(q, q2) <= max(tol, 1e-6) and rel_err(k, k2) <= max(tol, 1e-6)
    flat_k, flat_k2 = kc.view(-1, nkv, hd), kc2.view(-1, nkv, hd)
    assert rel_err(flat_k[slots[keep]], flat_k2[slots[keep]]) <= max(tol, 1e-6)
    assert torch.equal(vc.view(-1, nkv, hd)[slots[keep]], v[keep])
    untouched = torch.ones((nblocks + 1) * bs, dtype=torch.bool, device="cuda")
    untouched[slots[keep]] = False
    assert torch.equal(kc.view(-1, nkv, hd)[untouched], kc0.view(-1, nkv, hd)[untouched])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 7, 300])
def test_rope_vectorized_matches_scalar_bits(dtype, T):
    """The 8-elements-a-thread kernel gives the scalar kernel's bits, on views of a fused qkv row."""
    nh, nkv, hd = 32, 8, 128
    cos, sin = (f.cuda() for f in (torch.rand(512, hd // 2), torch.rand(512, hd // 2)))
    pos = torch.randint(0, 512, (T,), device="cuda")
    slots = torch.randperm(64 * 16, device="cuda")[:T]
    slots[0] = -1
    outs = []
    qkv0 = rnd(T, (nh + 2 * nkv) * hd, dtype=dtype)
    kc0, vc0 = rnd(64, 16, nkv, hd, dtype=dtype), rnd(64, 16, nkv, hd, dtype=dtype)
    for vec in (True, False):
        qkv, kc, vc = qkv0.clone(), kc0.clone(), vc0.clone()
        q, k, v = (t.view(T, -1, hd) for t in qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1))
        rope_and_cache_write(q, k, v, pos, cos, sin, kc, vc, slots, vectorized=vec)
        outs.append((qkv, kc, vc))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert not torch.equal(outs[0][0], qkv0)


def test_rope_on_views_of_fused_qkv():
    """q/k/v as strided views of one qkv row, as the model's split gives them."""
    T, nh, nkv, hd = 5, 8, 2, 64
    qkv = rnd(T, (nh + 2 * nkv) * hd, dtype=torch.bfloat16)
    q, k, v = (t.view(T, -1, hd) for t in qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1))
    cos, sin = (f.cuda() for f in (torch.rand(64, hd // 2), torch.rand(64, hd // 2)))
    pos = torch.randint(0, 64, (T,), device="cuda")
    slots = torch.arange(T, device="cuda") * 3
    kc, vc = rnd(4, 8, nkv, hd, dtype=torch.bfloat16), rnd(4, 8, nkv, hd, dtype=torch.bfloat16)
    qr, kr, kc2, vc2 = q.clone(), k.clone(), kc.clone(), vc.clone()
    rope_and_cache_write(q, k, v, pos, cos, sin, kc, vc, slots)
    ref.rope_and_cache_write(qr, kr, v.clone(), pos, cos, sin, kc2, vc2, slots)
    assert rel_err(q, qr) < 1e-2 and rel_err(k, kr) < 1e-2 and rel_err(kc, kc2) < 1e-2 and torch.equal(vc, vc2)


def _paged_case(dtype, B, nh, nkv, hd, bs, max_ctx, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ctx = torch.randint(1, max_ctx + 1, (B,), device="cuda", generator=g).to(torch.int32)
    ctx[0] = 1
    ctx[-1] = max_ctx
    maxb = -(-max_ctx // bs) + 2                           # wider than needed: padded rows
    nblocks = B * maxb + 3
    perm = torch.randperm(nblocks, device="cuda", generator=g).to(torch.int32)
    bt = perm[: B * maxb].view(B, maxb).contiguous()
    kc = rnd(nblocks, bs, nkv, hd, dtype=dtype)
    vc = rnd(nblocks, bs, nkv, hd, dtype=dtype)
    q = rnd(B, nh, hd, dtype=dtype)
    return q, kc, vc, bt, ctx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,nh,nkv,hd,bs,max_ctx", [
    (3, 32, 8, 128, 16, 700), (5, 4, 2, 16, 4, 70), (2, 8, 1, 64, 5, 1500), (4, 8, 8, 128, 16, 40),
    (1, 64, 8, 128, 16, 5000), (2, 8, 2, 64, 1, 2500)])  # block size 1: a split of > 1024 blocks
@pytest.mark.parametrize("splits", [None, 1, 3, 16])
@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("stages", [0, 2, 3, 4])   # K/V in registers; the staged kernel's stage counts
def test_paged_decode_attention(dtype, B, nh, nkv, hd, bs, max_ctx, splits, window, stages):
    q, kc, vc, bt, ctx = _paged_case(dtype, B, nh, nkv, hd, bs, max_ctx, seed=B * 1000 + max_ctx)
    scale = hd ** -0.5
    poison()
    out = paged_decode_attention(q, kc, vc, bt, ctx, scale, window, num_splits=splits, stages=stages)
    want = ref.paged_decode_attention(q.double(), kc.double(), vc.double(), bt, ctx, scale, window)
    assert rel_err(out, want) < TOL[dtype] * (3 if dtype == torch.float32 else 1)


@pytest.mark.parametrize("stages", [0, 3])
def test_paged_decode_attention_is_deterministic(stages):
    q, kc, vc, bt, ctx = _paged_case(torch.bfloat16, 6, 32, 8, 128, 16, 3000, seed=7)
    a = paged_decode_attention(q, kc, vc, bt, ctx, 0.1, num_splits=8, stages=stages)
    b = paged_decode_attention(q, kc, vc, bt, ctx, 0.1, num_splits=8, stages=stages)
    assert torch.equal(a, b)


def _check_against_float64(run, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """run() (a GEMM of x[M,K] @ w[N,K]^T + b into fresh memory) writes every element of [M,N], within
    its dtype's tolerance of the float64 product."""
    poison()
    y = run()
    assert y.shape == (x.shape[0], w.shape[0])
    assert rel_err(y, ref.gemv(x.double(), w.double(), None if b is None else b.double())) < TOL[x.dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("N,K", [(4096, 4096), (7, 24), (1027, 14336), (6144, 4096)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("choice", [(1, 4, True), (1, 4, False), (1, 8, False), (2, 4, True), (2, 4, False)])
def test_gemv(dtype, M, N, K, bias, choice):
    x = rnd(M, K, dtype=dtype)
    w = rnd(N, K, dtype=dtype, scale=K ** -0.5)
    b = rnd(N, dtype=dtype) if bias else None
    assert gemv_supported(x, w)
    _check_against_float64(lambda: gemv(x, w, b, choice=choice), x, w, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("N,K", [(4096, 4096), (7, 24), (1027, 14336)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("choice", [(1, 4, True), (1, 8, False), (2, 4, False)])
def test_gemv_glu(dtype, M, N, K, bias, choice):
    """The gate-up projection with silu(gate) * up in the epilogue against linear + silu_mul."""
    x = rnd(M, K, dtype=dtype)
    w = rnd(2 * N, K, dtype=dtype, scale=K ** -0.5)
    b = rnd(2 * N, dtype=dtype) if bias else None
    poison()
    y = gemv(x, w, b, choice=choice, glu=True)
    assert y.shape == (M, N)
    want = ref.silu_mul(ref.gemv(x.double(), w.double(), None if b is None else b.double()))
    assert rel_err(y, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_glu_rounds_like_gemv_then_silu_mul(dtype):
    """Bit for bit what the unfused kernels give: fusing must not move greedy tokens."""
    x, w = rnd(3, 4096, dtype=dtype), rnd(2 * 1536, 4096, dtype=dtype, scale=4096 ** -0.5)
    for choice in [(1, 4, True), (1, 8, False), (2, 4, False)]:
        assert torch.equal(gemv(x, w, choice=choice, glu=True), silu_mul(gemv(x, w, choice=choice)))


@pytest.mark.parametrize("M", [1, 3, 64])
def test_backend_linear_glu_matches_the_reference_backend(M):
    """linear_glu of the GPU backend, on the gemv path (few rows) and the cuBLAS + silu_mul path (many)."""
    from workers.backends import cpu, cuda

    x, w = rnd(M, 4096, dtype=torch.bfloat16), rnd(2 * 1536, 4096, dtype=torch.bfloat16, scale=4096 ** -0.5)
    assert rel_err(cuda.linear_glu(x, w), cpu.linear_glu(x.double(), w.double())) < 1e-2


def _chain(x: torch.Tensor, w: torch.Tensor, ws: list[torch.Tensor], mv=gemv) -> torch.Tensor:
    """A long chain of dependent kernels: each reads what the one before wrote (every third step two GEMVs
    back to back, the second reading the first's output)."""
    h, res = rms_norm(x, w, 1e-5)
    for i, wm in enumerate(ws):
        y = mv(h, wm)
        if i % 3 == 2:
            y = mv(y, wm)
        h, res = rms_norm(y, w, 1e-5, res)
    return h


def _stream_mv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return stream.stream_gemv(x, w, choice=(8, 192, 1))


@pytest.mark.parametrize("mv", ["gemv", "stream_gemv"])
def test_programmatic_dependent_launch_keeps_kernel_order(mv):
    """With PDL each kernel may start before the previous one ends (stream_gemv requests weights before it
    waits); captured in a graph, a chain of 70 dependent kernels must still give exactly what the same
    launches give with PDL off."""
    from workers.kernels import _nvrtc

    cap = torch.cuda.get_device_capability()
    if mv == "stream_gemv" and not stream.available():
        pytest.skip("stream_gemv runs on sm_90+ GPUs only")
    mv = gemv if mv == "gemv" else _stream_mv
    x, w = rnd(4, 4096, dtype=torch.bfloat16), rnd(4096, dtype=torch.bfloat16, scale=0.5) + 1
    ws = [rnd(4096, 4096, dtype=torch.bfloat16, scale=4096 ** -0.5) for _ in range(30)]
    _nvrtc._pdl_enabled.cache_clear()
    assert _nvrtc._pdl_enabled(torch.cuda.current_device()) == (cap[0] >= 9)
    _chain(x, w, ws, mv)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = _chain(x, w, ws, mv)
    results = []
    for _ in range(3):
        x.copy_(rnd(4, 4096, dtype=torch.bfloat16))
        g.replay()
        results.append((x.clone(), out.clone()))
    import os
    os.environ["ORCH_PDL"] = "0"
    _nvrtc._pdl_enabled.cache_clear()
    try:
        assert not _nvrtc._pdl_enabled(torch.cuda.current_device())
        for xi, got in results:
            assert torch.equal(_chain(xi, w, ws, mv), got)
    finally:
        del os.environ["ORCH_PDL"]
        _nvrtc._pdl_enabled.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [2, 9, 16, 33, 64, 100, 128])
@pytest.mark.parametrize("N,K", [(4096, 4096), (136, 1032), (1000, 14336), (7, 24)])
@pytest.mark.parametrize("choice", [(64, 1, 64, 4), (128, 1, 128, 3), (64, 3, 64, 4), (128, 8, 128, 3), (64, 2, 256, 2),
                                    (64, 1, 256, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_gemm(dtype, M, N, K, choice, bias):
    """Rows padded to their bucket, ragged N and K tiles, split-K with its in-order fix-up, bias."""
    x = rnd(M, K + 8, dtype=dtype)[:, :K]          # a row stride other than K
    w = rnd(N, K, dtype=dtype, scale=K ** -0.5)
    b = rnd(N, dtype=dtype) if bias else None
    assert skinny_supported(x, w)
    if not skinny_fits(choice, M, dtype):
        with pytest.raises(ValueError, match="shared memory"):
            skinny_gemm(x, w, b, choice=choice)
        return
    _check_against_float64(lambda: skinny_gemm(x, w, b, choice=choice), x, w, b)


def test_skinny_gemm_split_k_is_deterministic_and_graph_safe():
    """Split-K gives the same bits run after run (the last split adds the splits in order), its counters
    are back at zero after each launch, and it replays inside a CUDA graph on new inputs."""
    x, w = rnd(64, 14336, dtype=torch.bfloat16), rnd(4096, 14336, dtype=torch.bfloat16, scale=14336 ** -0.5)
    first = skinny_gemm(x, w, choice=(128, 8, 128, 3))
    for _ in range(3):
        assert torch.equal(skinny_gemm(x, w, choice=(128, 8, 128, 3)), first)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = skinny_gemm(x, w, choice=(128, 8, 128, 3))
    for _ in range(3):
        x.copy_(rnd(64, 14336, dtype=torch.bfloat16))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, skinny_gemm(x, w, choice=(128, 8, 128, 3)))
        assert rel_err(y, ref.gemv(x.double(), w.double())) < 1e-2


needs_tma = pytest.mark.skipif(not tma.available(), reason="tma_gemm runs on sm_90 GPUs only")


@needs_tma
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 8, 13, 16, 33, 64, 100, 128])
@pytest.mark.parametrize("N,K", [(4096, 4096), (136, 1032), (1000, 14336), (8, 24)])
@pytest.mark.parametrize("choice", [(1, 1, 4), (2, 1, 8), (1, 3, 6), (2, 8, 4), (1, 8, 8)])
@pytest.mark.parametrize("bias", [False, True])
def test_tma_gemm(dtype, M, N, K, choice, bias):
    """Rows padded to their bucket (read as zeros past M), ragged N and K tiles (zeros past the edge),
    split-K reduced across the cluster (uneven splits), a row stride other than K, bias."""
    x = rnd(M, K + 8, dtype=dtype)[:, :K]
    w = rnd(N, K, dtype=dtype, scale=K ** -0.5)
    b = rnd(N, dtype=dtype) if bias else None
    assert tma.supported(x, w)
    if not tma.fits(choice, M):
        with pytest.raises(ValueError, match="shared memory"):
            tma.tma_gemm(x, w, b, choice=choice)
        return
    _check_against_float64(lambda: tma.tma_gemm(x, w, b, choice=choice), x, w, b)


@needs_tma
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [3, 16, 64, 97])
@pytest.mark.parametrize("I,K", [(1000, 4096), (4096, 1032), (8, 64)])
@pytest.mark.parametrize("choice", [(1, 1, 4), (2, 4, 6), (1, 3, 8)])
def test_tma_gemm_glu(dtype, M, I, K, choice):
    """silu(gate) * up in the epilogue: the same bits as the plain GEMM followed by silu_mul (ragged I: the
    gate box of the last tile reaches into the up rows, whose outputs are never written)."""
    x = rnd(M, K, dtype=dtype)
    w = rnd(2 * I, K, dtype=dtype, scale=K ** -0.5)
    if not tma.fits(choice, M):
        return
    poison()
    y = tma.tma_gemm(x, w, choice=choice, glu=True)
    assert y.shape == (M, I)
    assert torch.equal(y, silu_mul(tma.tma_gemm(x, w, choice=choice)))
    g, u = x.double() @ w[:I].double().T, x.double() @ w[I:].double().T
    assert rel_err(y, torch.nn.functional.silu(g) * u) < 2 * TOL[dtype]


def _deterministic_graph_safe_pdl_ordered(run, m: int) -> None:
    """run(x, w) gives the same bits run after run; it replays inside a CUDA graph on new inputs; and, run
    right after the kernel that writes its x (PDL), it reads the new x."""
    x, w = rnd(m, 14336, dtype=torch.bfloat16), rnd(4096, 14336, dtype=torch.bfloat16, scale=14336 ** -0.5)
    first = run(x, w)
    for _ in range(3):
        assert torch.equal(run(x, w), first)
    src = rnd(m, 14336, dtype=torch.bfloat16)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        x.copy_(src * 2)   # the kernel before it writes x
        y = run(x, w)
    for _ in range(3):
        src.copy_(rnd(m, 14336, dtype=torch.bfloat16))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, run(src * 2, w))
        assert rel_err(y, ref.gemv(src.double() * 2, w.double())) < 1e-2


@needs_tma
def test_tma_gemm_is_deterministic_graph_safe_and_pdl_ordered():
    """Split-K across the cluster: the same bits every run, in a graph, after the kernel writing x."""
    _deterministic_graph_safe_pdl_ordered(lambda x, w: tma.tma_gemm(x, w, choice=(1, 8, 6)), 64)


@needs_tma
def test_backend_linear_takes_tma_gemm_where_tuned():
    """The GPU backend's linear runs tma_gemm for the row buckets the tuning table names, ahead of skinny_gemm."""
    from workers.backends import cuda
    from workers.kernels import tuning

    w = rnd(1536, 4096, dtype=torch.bfloat16, scale=4096 ** -0.5)
    old = tuning.CURRENT
    tuning.set_current(tuning.Tuning(gemv_max_m={"1536x4096": 1}, tma={"1536x4096": {32: [2, 4, 6]}},
                                     skinny={"1536x4096": {32: [64, 2, 128, 4], 64: [64, 2, 128, 4]}}))
    try:
        for m in (17, 32):
            x = rnd(m, 4096, dtype=torch.bfloat16)
            assert torch.equal(cuda.linear(x, w), tma.tma_gemm(x, w, choice=(2, 4, 6)))
        x = rnd(40, 4096, dtype=torch.bfloat16)
        assert torch.equal(cuda.linear(x, w), skinny_gemm(x, w, choice=(64, 2, 128, 4)))
        x = rnd(30, 4096, dtype=torch.bfloat16)
        assert torch.equal(cuda.linear_glu(x, w), tma.tma_gemm(x, w, choice=(2, 4, 6), glu=True))
    finally:
        tuning.set_current(old)


def test_backend_linear_takes_skinny_gemm_where_tuned():
    """The GPU backend's linear runs skinny_gemm for the row buckets the tuning table names, cuBLAS past them."""
    from workers.backends import cuda
    from workers.kernels import tuning

    w = rnd(1536, 4096, dtype=torch.bfloat16, scale=4096 ** -0.5)
    old = tuning.CURRENT
    tuning.set_current(tuning.Tuning(gemv_max_m={"1536x4096": 1}, skinny={"1536x4096": {32: [64, 2, 128, 4]}}))
    try:
        for m in (17, 32):
            x = rnd(m, 4096, dtype=torch.bfloat16)
            assert torch.equal(cuda.linear(x, w), skinny_gemm(x, w, choice=(64, 2, 128, 4)))
        x = rnd(40, 4096, dtype=torch.bfloat16)
        assert torch.equal(cuda.linear(x, w), torch.nn.functional.linear(x, w))
    finally:
        tuning.set_current(old)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(64, 4096, 14336), (9, 136, 1032), (200, 1000, 4096), (16, 8, 24)])
def test_cublaslt_algorithms_compute_the_product(dtype, M, N, K):
    """Every algorithm cuBLASLt's heuristic offers gives x @ w.T (row stride other than K), and one found at
    one row count is checked before it runs another."""
    from workers.kernels import cublaslt

    x = rnd(M, K + 8, dtype=dtype)[:, :K]
    w = rnd(N, K, dtype=dtype, scale=K ** -0.5)
    assert cublaslt.supported(x, w)
    algos = cublaslt.algorithms(x, w)
    assert algos and all(len(a) == 8 for a in algos)
    poison()
    want = ref.gemv(x.double(), w.double(), None)
    for a in algos:
        assert cublaslt.usable(x, w, a)
        assert rel_err(cublaslt.matmul(x, w, a), want) < TOL[dtype]
    x2 = rnd(max(1, M // 2), K, dtype=dtype)
    for a in algos:
        if cublaslt.usable(x2, w, a):
            assert rel_err(cublaslt.matmul(x2, w, a), ref.gemv(x2.double(), w.double(), None)) < TOL[dtype]


def test_cublaslt_replays_in_a_cuda_graph_and_backend_takes_tuned_algorithm():
    """A cuBLASLt call captured in a CUDA graph replays on new inputs; the GPU backend's linear runs the
    tuned algorithm for its row bucket (with the bias added) and torch's matmul past the buckets."""
    from workers.backends import cuda
    from workers.kernels import cublaslt, tuning

    w = rnd(1536, 4096, dtype=torch.bfloat16, scale=4096 ** -0.5)
    b = rnd(1536, dtype=torch.bfloat16)
    x = rnd(48, 4096, dtype=torch.bfloat16)
    algo = cublaslt.algorithms(x, w)[-1]
    g = torch.cuda.CUDAGraph()
    cublaslt.matmul(x, w, algo)
    with torch.cuda.graph(g):
        y = cublaslt.matmul(x, w, algo)
    for _ in range(2):
        x.copy_(rnd(48, 4096, dtype=torch.bfloat16))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(y, ref.gemv(x.double(), w.double(), None)) < 1e-2
    old = tuning.CURRENT
    tuning.set_current(tuning.Tuning(gemv_max_m={"1536x4096": 1}, lt={"1536x4096": {64: algo}}))
    try:
        assert torch.equal(cuda.linear(x, w), cublaslt.matmul(x, w, algo))
        assert torch.equal(cuda.linear(x, w, b), cublaslt.matmul(x, w, algo) + b)
        x300 = rnd(300, 4096, dtype=torch.bfloat16)
        assert torch.equal(cuda.linear(x300, w), torch.nn.functional.linear(x300, w))
    finally:
        tuning.set_current(old)


def test_gemv_rejects_what_it_cannot_run():
    assert not gemv_supported(rnd(9, 64, dtype=torch.bfloat16), rnd(8, 64, dtype=torch.bfloat16))
    assert not gemv_supported(rnd(1, 12, dtype=torch.bfloat16), rnd(8, 12, dtype=torch.bfloat16))
    assert not skinny_supported(rnd(129, 64, dtype=torch.bfloat16), rnd(8, 64, dtype=torch.bfloat16))
    assert not skinny_supported(rnd(4, 64, dtype=torch.float32), rnd(8, 64, dtype=torch.float32))


def test_kernels_run_inside_a_cuda_graph():
    """Launches go to torch's current stream, so graph capture records them."""
    x, w = rnd(2, 4096, dtype=torch.bfloat16), rnd(4096, dtype=torch.bfloat16)
    wm = rnd(512, 4096, dtype=torch.bfloat16, scale=4096 ** -0.5)
    rms_norm(x, w, 1e-5)
    gemv(x, wm)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        h, _ = rms_norm(x, w, 1e-5)
        y = gemv(h, wm)
    x.copy_(rnd(2, 4096, dtype=torch.bfloat16))
    g.replay()
    torch.cuda.synchronize()
    want = ref.gemv(ref.rms_norm(x.double(), w.double(), 1e-5)[0], wm.double())
    assert rel_err(y, want) < 2e-2


needs_stream = pytest.mark.skipif(not stream.available(), reason="stream_gemv runs on sm_90+ GPUs only")


@needs_stream
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("N,K", [(4096, 4096), (7, 24), (1027, 14336), (6144, 4096), (300, 1000)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("choice", stream.CHOICES)
def test_stream_gemv(dtype, M, N, K, bias, choice):
    x = rnd(M, K, dtype=dtype)
    w = rnd(N, K, dtype=dtype, scale=K ** -0.5)
    b = rnd(N, dtype=dtype) if bias else None
    if not stream.supported(x, w, choice):
        pytest.skip("fewer than CWARPS stages fit")
    _check_against_float64(lambda: stream.stream_gemv(x, w, b, choice=choice), x, w, b)


@needs_stream
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 2, 4])
@pytest.mark.parametrize("I,K", [(14336, 4096), (7, 24), (1027, 14336)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("choice", [(4, 192, 1), (8, 112, 2), (16, 192, 1)])
def test_stream_gemv_glu(dtype, M, I, K, bias, choice):
    """silu(gate) * up in the epilogue: against float64, and rounded bit for bit as the plain kernel
    followed by silu_mul (fusing must not move greedy tokens)."""
    x = rnd(M, K, dtype=dtype)
    w = rnd(2 * I, K, dtype=dtype, scale=K ** -0.5)
    b = rnd(2 * I, dtype=dtype) if bias else None
    if not stream.supported(x, w, choice, glu=True):
        pytest.skip("fewer than CWARPS stages fit")
    poison()
    y = stream.stream_gemv(x, w, b, choice=choice, glu=True)
    assert y.shape == (M, I)
    want = ref.silu_mul(ref.gemv(x.double(), w.double(), None if b is None else b.double()))
    assert rel_err(y, want) < 2 * TOL[dtype]
    if b is None:
        # the plain kernel over [gate; up] splits rows across blocks differently: same sums per row though
        assert torch.equal(y, silu_mul(torch.cat([stream.stream_gemv(x, w[:I], choice=choice),
                                                  stream.stream_gemv(x, w[I:], choice=choice)], dim=1)))


@needs_stream
def test_stream_gemv_is_deterministic_graph_safe_and_pdl_ordered():
    """Weights requested before the PDL wait, x read after it: the same bits every run, in a graph, after
    the kernel writing x."""
    _deterministic_graph_safe_pdl_ordered(lambda x, w: stream.stream_gemv(x, w, choice=(4, 192, 1)), 2)


@needs_stream
def test_backend_linear_takes_stream_gemv_where_tuned():
    """The GPU backend runs stream_gemv at the row counts the tuning table names for a shape, gemv at the
    others; and rejects what stream_gemv cannot run."""
    from workers.backends import cuda
    from workers.kernels import tuning

    w = rnd(1536, 4096, dtype=torch.bfloat16, scale=4096 ** -0.5)
    old = tuning.CURRENT
    tuning.set_current(tuning.Tuning(gemv_max_m={"1536x4096": 4},
                                     stream={"1536x4096": {1: [8, 112, 2], 3: [4, 192, 1]}}))
    try:
        x1, x2, x3 = (rnd(m, 4096, dtype=torch.bfloat16) for m in (1, 2, 3))
        assert torch.equal(cuda.linear(x1, w), stream.stream_gemv(x1, w, choice=(8, 112, 2)))
        assert torch.equal(cuda.linear(x3, w), stream.stream_gemv(x3, w, choice=(4, 192, 1)))
        assert torch.equal(cuda.linear(x2, w), gemv(x2, w))
        assert torch.equal(cuda.linear_glu(x1, w), stream.stream_gemv(x1, w, choice=(8, 112, 2), glu=True))
    finally:
        tuning.set_current(old)
    assert not stream.supported(rnd(5, 64, dtype=torch.bfloat16), rnd(8, 64, dtype=torch.bfloat16))
    assert not stream.supported(rnd(1, 64, dtype=torch.float32), rnd(8, 64, dtype=torch.float32))
    assert not stream.supported(rnd(1, 12, dtype=torch.bfloat16), rnd(8, 12, dtype=torch.bfloat16))

