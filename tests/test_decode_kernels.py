"""mom_kernels.decode (the few-token GEMV path) against mom_kernels.reference: T = 1..64, K = 1..3, SKIP,
empty modules, residual, fp64 / fp32 tight, bf16 by the 2x rule; the no-grad dispatch."""
import pytest
import torch

from mom_kernels import decode, reference
from mom_kernels.testing import assert_2x_rule, assert_close_verbose, ffn_inputs, linear_inputs

SHAPES = [(1, 1), (1, 2), (3, 3), (7, 2), (16, 1), (33, 3), (64, 2)]  # (T, K): T*K up to 128 (two pick blocks)


@pytest.mark.parametrize("T,K", SHAPES)
@pytest.mark.parametrize("ln,g", [(True, False), (False, True)])
def test_decode_routed_linear_matches_reference(T, K, ln, g):
    E, N_in, N_out = 4, 24, 40
    x, w, b, ids, gw, lw, lb = linear_inputs(T, K, E, N_in, N_out, seed=T * 10 + K, empty=(2,))
    args = lambda t: (t(x), t(w), t(b), ids, t(gw) if g else None, t(lw) if ln else None, t(lb) if ln else None)
    want = reference.routed_linear(*args(lambda t: t))
    res = torch.randn(T, N_out, dtype=torch.float64)
    for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-5)]:
        c = lambda t: t.to(dtype)
        got = decode.decode_routed_linear(*args(c), residual=c(res))
        assert_close_verbose(f"linear {dtype}", got, want + res, tol, tol)
    bf = lambda t: t.to(torch.bfloat16)
    got = decode.decode_routed_linear(*args(bf))
    assert_2x_rule("linear bf16", got, reference.routed_linear(*args(bf)), want, 1e-2)


@pytest.mark.parametrize("T,K", SHAPES)
def test_decode_routed_ffn_matches_reference(T, K):
    E, D, Fw = 3, 24, 40
    inputs = ffn_inputs(T, K, E, D, Fw, seed=T * 10 + K)
    want = reference.routed_ffn(*inputs)
    res = torch.randn(T, D, dtype=torch.float64)
    for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-5)]:
        c = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
        got = decode.decode_routed_ffn(*c, residual=res.to(dtype))
        assert_close_verbose(f"ffn {dtype}", got, want + res, tol, tol)
    c = [t.to(torch.bfloat16) if t.is_floating_point() else t for t in inputs]
    assert_2x_rule("ffn bf16", decode.decode_routed_ffn(*c), reference.routed_ffn(*c), want, 1e-2)


def test_all_skip_gives_zero_and_the_residual():
    x, w, b, ids, gw, lw, lb = linear_inputs(5, 2, 3, 16, 16, seed=1, skip_frac=1.0)
    assert bool((ids == 3).all())
    assert torch.equal(decode.decode_routed_linear(x, w, b, ids, gw, lw, lb), torch.zeros(5, 16, dtype=x.dtype))
    inputs = ffn_inputs(4, 2, 3, 16, 16, seed=2, skip_frac=1.0)
    assert torch.equal(decode.decode_routed_ffn(*inputs, residual=inputs[0]), inputs[0])


def test_dispatch_takes_the_decode_path_only_without_grad_and_few_tokens(monkeypatch):
    calls = []
    monkeypatch.setattr(decode, "decode_routed_ffn", lambda *a, **k: calls.append(a[7].shape[0]) or a[0])
    inputs = ffn_inputs(4, 2, 3, 16, 16, seed=3)
    with torch.no_grad():
        decode.routed_ffn(*inputs)
        big = ffn_inputs(decode.DECODE_MAX_TOKENS + 1, 2, 3, 16, 16, seed=4)
        assert_close_verbose("grouped path", decode.routed_ffn(*big), reference.routed_ffn(*big), 1e-10, 1e-10)
    assert calls == [4]
    decode.routed_ffn(*inputs)                                   # grad enabled: the grouped (autograd) path
    assert calls == [4]


def test_model_decoding_through_the_decode_path_equals_the_torch_backend(monkeypatch):
    """The Triton Ops with mom_kernels.decode's dispatch (the line mom/routed.py `_triton_ops` would use) in a
    static-cache decode: the same logits as the torch backend."""
    import mom.model
    from helpers import make_model, small_config
    from mom.cache import StaticCache
    from mom.routed import Ops, _triton_ops

    tri = _triton_ops(torch.device("cpu"))
    ops = Ops("triton", tri.make_plan, decode.routed_linear, decode.routed_ffn, tri._route, tri.gru_router,
              fused_residual=True)
    cfg = small_config(backend="torch")
    model = make_model(cfg, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    want = model(ids).logits
    calls = []
    real = decode.decode_routed_ffn
    monkeypatch.setattr(decode, "decode_routed_ffn", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(mom.model, "get_ops", lambda backend, device: ops)
    cache = StaticCache(cfg, 2, 6, torch.float32)
    with torch.no_grad():
        got = [model(ids[:, :3], past_key_values=cache).logits]
        got += [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(3, 6)]
    assert len(calls) == 4 * cfg.chunks * cfg.depth
    assert_close_verbose("decode-path logits", torch.cat(got, 1), want, 1e-4, 1e-4)


@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("T,K", [(1, 2), (5, 3), (40, 2)])
def test_split_k_matches_reference(T, K, split, monkeypatch):
    """The reduction split over programs (MOM_KERNELS_DECODE_SPLIT_K; on a GPU chosen from the SM count), partial
    sums finished by the second pass: linear with N_in 300 and the FFN with D 130, F 300 (the last split short),
    against the reference; the same result on a rerun, bit for bit."""
    monkeypatch.setenv("MOM_KERNELS_DECODE_SPLIT_K", str(split))
    assert decode.split_k(300, 1, 1, 128, torch.device("cpu")) == min(split, 3)
    x, w, b, ids, gw, lw, lb = linear_inputs(T, K, 4, 300, 24, seed=T + K, empty=(1,))
    res = torch.randn(T, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-5)]:
        for weighted in (True, False):  # the output projection (g) and the QKV form (a plain sum over K)
            args = [t.to(dtype) if t is not None and t.is_floating_point() else t
                    for t in (x, w, b, ids, gw if weighted else None, lw, lb)]
            want = reference.routed_linear(*[t.double() if t is not None and t.is_floating_point() else t
                                             for t in args])
            got = decode.decode_routed_linear(*args)
            assert_close_verbose(f"linear {dtype} weighted={weighted}", got, want, tol, tol)
            assert torch.equal(got, decode.decode_routed_linear(*args))
            got = decode.decode_routed_linear(*args, residual=res.to(dtype))
            assert_close_verbose(f"linear + residual {dtype}", got, want + res, tol, tol)
    inputs = ffn_inputs(T, K, 3, 130, 300, seed=T * K)
    res = torch.randn(T, 130, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-5)]:
        c = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
        assert_close_verbose(f"ffn {dtype}", decode.decode_routed_ffn(*c), reference.routed_ffn(*inputs), tol, tol)
        assert_close_verbose(f"ffn + residual {dtype}", decode.decode_routed_ffn(*c, residual=res.to(dtype)),
                             reference.routed_ffn(*inputs) + res, tol, tol)
    bf = [t.to(torch.bfloat16) if t.is_floating_point() else t for t in inputs]
    assert_2x_rule("ffn bf16", decode.decode_routed_ffn(*bf), reference.routed_ffn(*bf), reference.routed_ffn(*inputs),
                   1e-2)


def test_split_k_combines_in_its_second_pass(monkeypatch):
    """With the reduction split, the second pass also sums each token's picks (and the residual): no combine
    launch, no per-pick slots for the QKV / projection / FFN down; the FFN up keeps its per-pick rows."""
    from mom_kernels.launches import count_launches

    x, w, b, ids, gw, lw, lb = linear_inputs(2, 2, 4, 300, 24, seed=3)
    inputs = ffn_inputs(2, 2, 3, 130, 300, seed=4)
    for split, want in (("1", {"_decode_gemv_kernel": 1, "_combine_kernel": 1}),
                        ("2", {"_decode_gemv_kernel": 1, "_decode_splitk_combine_kernel": 1})):
        monkeypatch.setenv("MOM_KERNELS_DECODE_SPLIT_K", split)
        with count_launches() as c:
            decode.decode_routed_linear(x, w, b, ids, gw, lw, lb, residual=x[:, :24])
        assert dict(c.triton) == want, c.table()
    with count_launches() as c:
        decode.decode_routed_ffn(*inputs, residual=inputs[0])
    assert dict(c.triton) == {"_decode_gemv_kernel": 2, "_decode_splitk_kernel": 1,
                              "_decode_splitk_combine_kernel": 1}, c.table()


def test_split_k_choice(monkeypatch):
    monkeypatch.delenv("MOM_KERNELS_DECODE_SPLIT_K", raising=False)
    assert decode.split_k(5120, 20, 2, 64, torch.device("cpu")) == 1            # CPU / interpreter: one pass
    monkeypatch.setenv("MOM_KERNELS_DECODE_SPLIT_K", "4")
    assert decode.split_k(256, 4, 2, 64, torch.device("cpu")) == 4
    assert decode.split_k(200, 4, 2, 64, torch.device("cpu")) == 4              # 64 + 64 + 64 + 8
    assert decode.split_k(100, 4, 2, 64, torch.device("cpu")) == 2              # never an empty split
    monkeypatch.delenv("MOM_KERNELS_DECODE_SPLIT_K")
    monkeypatch.setattr(decode, "_sm_count", lambda device: 132)  # an H200's SMs: about 4 programs per SM
    gpu = torch.device("cuda")
    assert decode.split_k(5120, 20, 2, 64, gpu) == 14    # FFN down at batch 1: 2 modules x 20 tiles x 14 = 560
    assert decode.split_k(1280, 80, 2, 64, gpu) == 4     # FFN up: 2 x 80 x 4 = 640 (>= 4 BLOCK_K steps each)
    assert decode.split_k(1280, 20, 16, 64, gpu) == 2    # 16 modules picked: 16 x 20 x 2 = 640
    assert decode.split_k(1280, 80, 16, 64, gpu) == 1    # enough programs already
    monkeypatch.setenv("MOM_KERNELS_DECODE_SPLIT_K", "0")
    with pytest.raises(ValueError, match="MOM_KERNELS_DECODE_SPLIT_K"):
        decode.split_k(256, 4, 2, 64, torch.device("cpu"))
