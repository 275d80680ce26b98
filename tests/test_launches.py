"""Host overhead, measured on the CPU: what one routed step launches, and that nothing on the Triton path reads
a device value on the host (so the step can be captured in a CUDA graph). `mom_kernels.launches` counts Triton
launches plus every aten op that is a kernel on a GPU (views, metadata and `empty` are free; the id and logit
checks that run for CPU tensors only are not counted)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from benchmarks.count_launches import STEP_LAYER  # noqa: E402
from mom import MoMConfig  # noqa: E402
from mom.layer import MoMLayer  # noqa: E402
from mom_kernels import route as R  # noqa: E402
from mom_kernels.launches import count_launches, count_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

STEP_BUDGET = 60        # one routed step: attention + FFN, K 2, forward + backward with the balance loss
ROUTE_PLAN_BUDGET = 6   # one router call's route + plan, forward + backward
DECODE_STEP_BUDGET = 16  # one routed step of a decode step (no grad, one token per row, balance off): per router
#                          call the GRU's GEMMs (one at a zero state, two after) + its gate/head kernel + route;
#                          4 GEMVs (LayerNorm inside), 3 combines (on a GPU the split's second passes do them)
#                          and the attention


def _layer(depth=1, **kw):
    cfg = MoMConfig(**{**STEP_LAYER, "depth": depth, **kw})
    return MoMLayer(cfg).to(DEVICE)


def _step_count(layer, B=2, T=24):
    x = torch.randn(B, T, layer.config.n_embd, device=DEVICE, requires_grad=True)
    return count_step(layer, x, torch.randn_like(x), torch.tensor(0.01, device=DEVICE))


def test_step_launch_budget():
    c = _step_count(_layer(depth=1))
    assert c.total <= STEP_BUDGET, c.table()
    assert not c.syncs, c.table()


def test_llama_step_launch_budget():
    """A Llama-family routed step (RMSNorm, SwiGLU, rotary positions, grouped-query attention, q/k/v biases)
    within the step budget plus the rotation: q and k rotated by one launch forward and one backward, no
    LayerNorm or GELU launch of its own, nothing read back to the host."""
    layer = _layer(depth=1, family="llama", num_key_value_heads=2, attention_bias=True)
    c = _step_count(layer)
    assert c.total <= STEP_BUDGET + 4, c.table()
    assert c.triton["_rotary_kernel"] == 2, c.table()
    assert c.aten["native_layer_norm"] == 0 and c.aten["gelu"] == 0 and c.aten["silu"] == 0, c.table()
    assert not c.syncs, c.table()


def test_expert_choice_step_launch_budget():
    """A capacity-routed step: the route, its picks' weights, the BCE aux loss and the uniform plan in one launch
    per router call (and one backward), the same GEMMs: within the step budget, nothing read back to the host."""
    c = _step_count(_layer(depth=1, routing="expert_choice", capacity=0.5))
    assert c.total <= STEP_BUDGET, c.table()
    assert c.triton["_capacity_route_kernel"] == 2 and c.triton["_plan_scan_kernel"] == 0, c.table()
    assert not c.syncs, c.table()


def test_decode_step_launch_budget():
    """A decode step (no grad, a few tokens, balance off) runs the route kernel alone: no plan, no balance
    terms (the few-token ops need none); at most DECODE_STEP_BUDGET launches per routed step, none of them a
    LayerNorm of its own (the decode GEMV computes the statistics); nothing read back to the host."""
    layer = _layer(depth=2).eval()
    x = torch.randn(2, 1, layer.config.n_embd, device=DEVICE)
    with torch.no_grad():
        layer(x, balance=False)  # warm-up
        with count_launches() as c:
            layer(x, balance=False)
    assert c.triton["_route_kernel"] == 4, c.table()               # 2 steps x (attention + FFN router)
    assert c.triton["_plan_scan_kernel"] == 0 and c.triton["_plan_scatter_kernel"] == 0, c.table()
    assert c.total <= 2 * DECODE_STEP_BUDGET, c.table()
    assert c.aten["native_layer_norm"] == 0 and c.aten["layer_norm"] == 0, c.table()
    assert not c.syncs, c.table()


def test_route_plan_launch_budget():
    logits = torch.randn(40, 5, device=DEVICE, requires_grad=True)
    R.route(logits, 4, top_k=2)  # warm-up
    with count_launches() as c:
        r = R.route(logits, 4, top_k=2)
        torch.autograd.backward([r.weights, r.balance], [torch.randn_like(r.weights), torch.tensor(0.01)])
    assert c.total <= ROUTE_PLAN_BUDGET, c.table()
    assert sum(c.triton.values()) == 4, c.table()  # 3 forward, 1 backward
    assert not c.syncs


@pytest.mark.parametrize("opts", [dict(), dict(router="mlp", straight_through=True, weighted_qkv=True),
                                  dict(balance_loss="pooled", balance_skip=True, top_k=1, renormalize=False)])
def test_triton_step_has_no_host_sync(opts):
    """Several steps (GRU state carried), every option family: no op reads a device value on the host."""
    c = _step_count(_layer(depth=2, **opts), T=9)
    assert not c.syncs, c.table()


def test_counter_sees_launches_and_syncs():
    """The counter itself: a Triton launch, an aten kernel and a host read are each seen; views are free."""
    x = torch.randn(8, 4, device=DEVICE)
    with count_launches() as c:
        R.route(x, 3, top_k=1, renormalize=False)
        y = x.t().reshape(-1)  # a view and a copy
        y.sum().item()
        x[0].tolist()
    assert sum(c.triton.values()) == 3 and c.aten["clone"] + c.aten["_unsafe_view"] >= 1 and c.aten["sum"] == 1
    assert "_local_scalar_dense" in c.syncs or "item" in c.syncs
    assert "tolist" in c.syncs


def test_decode_count_of_a_preset_against_its_gpt2():
    """benchmarks.count_launches --decode (the figures in docs/generation.md): a decoded token of
    mom-large-efficient launches fewer ops than one of GPT-2-large, every attention call converts no mask of its
    own (one logical_not per forward), and nothing is read back to the host."""
    from benchmarks.count_launches import decode_counts

    counts = decode_counts("mom-large-efficient", 1 / 32, 1, DEVICE, table=False)
    mom, gpt2 = counts["mom-large-efficient"], counts["gpt2-large"]
    assert mom.total < 0.6 * gpt2.total, (mom.table(), gpt2.table())
    for c in (mom, gpt2):
        assert c.aten["logical_not"] == 1 and c.aten["where"] == 0, c.table()
        assert not c.syncs, c.table()
