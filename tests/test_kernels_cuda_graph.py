"""CUDA only: the routing plan and the routed kernels need no host sync, so a routed step can be captured in a
CUDA graph once and replayed on new inputs and new picks. Replays
are checked against the reference on the inputs of each replay."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA graphs need a CUDA device", allow_module_level=True)

import mom_kernels  # noqa: E402
from mom_kernels import reference  # noqa: E402
from mom_kernels.testing import assert_close_verbose, ffn_inputs, linear_inputs  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
T, K, E, D, F = 57, 2, 5, 40, 72  # odd T; module loads change between replays


def _capture(fn, static_inputs):
    """Warm up on a side stream (compiles the kernels), then capture fn(*static_inputs) in a graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static_inputs)
    return graph, out


def test_routed_step_forward_replays_on_new_picks():
    """Plan + routed QKV (LayerNorm fused) + routed output projection + routed FFN, forward, in one graph."""
    def step(x, ids, g, lw_a, lb_a, w_qkv, b_qkv, w_o, b_o, lw, lb, w1, b1, w2, b2):
        plan = mom_kernels.make_plan(ids, E)
        qkv = mom_kernels.routed_linear(x, w_qkv, b_qkv, ids, None, lw_a, lb_a, plan=plan)
        h = x + mom_kernels.routed_linear(qkv[:, :D].contiguous(), w_o, b_o, ids, g, plan=plan)
        return h + mom_kernels.routed_ffn(h, lw, lb, w1, b1, w2, b2, ids, g, plan=plan)

    def ref(x, ids, g, lw_a, lb_a, w_qkv, b_qkv, w_o, b_o, lw, lb, w1, b1, w2, b2):
        qkv = reference.routed_linear(x, w_qkv, b_qkv, ids, None, lw_a, lb_a)
        h = x + reference.routed_linear(qkv[:, :D], w_o, b_o, ids, g)
        return h + reference.routed_ffn(h, lw, lb, w1, b1, w2, b2, ids, g)

    def draw(seed, skip):
        x, lw, lb, w1, b1, w2, b2, ids, g = ffn_inputs(T, K, E, D, F, torch.float32, "cuda", skip, seed=seed)
        _, w_qkv, b_qkv, _, _, lw_a, lb_a = linear_inputs(T, K, E, D, 3 * D, torch.float32, "cuda", seed=seed + 1)
        _, w_o, b_o, _, _, _, _ = linear_inputs(T, K, E, D, D, torch.float32, "cuda", seed=seed + 2)
        return [x, ids, g, lw_a, lb_a, w_qkv, b_qkv, w_o, b_o, lw, lb, w1, b1, w2, b2]

    static = draw(0, 0.25)
    with torch.no_grad():
        graph, out = _capture(step, static)
        for seed, skip in ((10, 0.0), (20, 0.5), (30, 1.0)):  # new values, new loads, then all SKIP
            new = draw(seed, skip)
            for s_, n in zip(static, new):
                s_.copy_(n)
            graph.replay()
            torch.cuda.synchronize()
            want = ref(*[t.double() if t.is_floating_point() else t for t in new])
            assert_close_verbose(f"replay seed {seed}", out, want, 2e-5, 2e-5)


def test_routed_ffn_forward_backward_replays():
    """Forward and backward of the routed FFN (autograd through the custom ops) captured in one graph."""
    def fwd_bwd(x, lw, lb, w1, b1, w2, b2, ids, g, dy):
        leaves = [x, lw, lb, w1, b1, w2, b2, g]
        y = mom_kernels.routed_ffn(*leaves[:7], ids, g)
        return (y, *torch.autograd.grad(y, leaves, dy))

    def draw(seed, skip):
        inputs = list(ffn_inputs(T, K, E, D, F, torch.float32, "cuda", skip, seed=seed))
        dy = torch.randn(T, D, device="cuda")
        return inputs, dy

    inputs, dy = draw(1, 0.25)
    static = [t.requires_grad_() if t.is_floating_point() else t for t in inputs] + [dy]
    graph, outs = _capture(fwd_bwd, static)
    for seed, skip in ((11, 0.0), (21, 0.6)):
        new_inputs, new_dy = draw(seed, skip)
        with torch.no_grad():
            for s_, n in zip(static, new_inputs + [new_dy]):
                s_.copy_(n)
        graph.replay()
        torch.cuda.synchronize()
        leaves = [t.double().requires_grad_() if t.is_floating_point() else t for t in new_inputs]
        y = reference.routed_ffn(*leaves)
        fl = [leaves[i] for i in (0, 1, 2, 3, 4, 5, 6, 8)]
        want = (y, *torch.autograd.grad(y, fl, new_dy.double(), allow_unused=True, materialize_grads=True))
        for name, a, b in zip(["y", "dx", "dln_w", "dln_b", "dw1", "db1", "dw2", "db2", "dweights"], outs, want):
            assert_close_verbose(f"replay seed {seed}: {name}", a, b, 1e-4, 1e-4)
