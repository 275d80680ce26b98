"""The torch backend's few-token path (mom/few_tokens.py, no autograd, a decode step's few tokens) under CPU
autocast (bf16): the per-pick products run in bf16, the fp32 residual stream stays fp32; checked against a
per-pick loop written here (fp64 reference, bf16 by the 2x rule) and against the plan-based path."""
import pytest
import torch
import torch.nn.functional as F

from mom import few_tokens
from mom.routed import make_plan, torch_routed_ffn, torch_routed_linear

E, D, O, FW, K = 4, 16, 12, 24, 2


def _loop(x, ids, g, residual, module, dtype):
    """residual + sum over non-SKIP picks of g * module(m, x[t]) with every tensor in `dtype` (the picks summed
    in fp32 for bf16, as one would by hand), returned in the residual's dtype."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = residual.to(acc).clone()
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            m = int(ids[t, k])
            if m < E:
                y = module(m, x[t:t + 1].to(dtype), dtype)[0]
                out[t] += (g[t, k].to(dtype) * y).to(acc)
    return out.to(residual.dtype)


def _params():
    lw, lb = 1 + 0.1 * torch.randn(E, D), 0.1 * torch.randn(E, D)
    lin = dict(w=0.3 * torch.randn(E, D, O), b=torch.randn(E, O))
    ffn = dict(w1=0.3 * torch.randn(E, D, FW), b1=0.1 * torch.randn(E, FW), w2=0.3 * torch.randn(E, FW, D),
               b2=0.1 * torch.randn(E, D))
    return lw, lb, lin, ffn


@pytest.mark.parametrize("T", [1, 3])
def test_few_token_ops_under_autocast_keep_the_fp32_residual(T):
    lw, lb, lin, ffn = _params()
    x = torch.randn(T, D)
    ids = torch.randint(0, E + 1, (T, K))
    ids[0] = torch.tensor([1, E])                    # a SKIP pick
    g = torch.rand(T, K)
    res_lin, res_ffn = 100 * torch.randn(T, O), 100 * torch.randn(T, D)  # large: bf16 would round it by ~0.2

    def linear_module(m, u, dt):
        u = F.layer_norm(u, (D,), lw[m].to(dt), lb[m].to(dt), 1e-5)
        return u @ lin["w"][m].to(dt) + lin["b"][m].to(dt)

    def ffn_module(m, u, dt):
        u = F.layer_norm(u, (D,), lw[m].to(dt), lb[m].to(dt), 1e-5)
        h = F.gelu(u @ ffn["w1"][m].to(dt) + ffn["b1"][m].to(dt), approximate="tanh")
        return h @ ffn["w2"][m].to(dt) + ffn["b2"][m].to(dt)

    cases = {
        "routed_linear": (lambda plan: torch_routed_linear(x, lin["w"], lin["b"], ids, g, lw, lb, 1e-5, plan=plan,
                                                           residual=res_lin), res_lin, linear_module),
        "routed_ffn": (lambda plan: torch_routed_ffn(x, lw, lb, ffn["w1"], ffn["b1"], ffn["w2"], ffn["b2"], ids, g,
                                                     1e-5, plan=plan, residual=res_ffn), res_ffn, ffn_module),
    }
    for name, (op, res, module) in cases.items():
        want = _loop(x.double(), ids, g.double(), res.double(), module, torch.float64)
        ref16 = _loop(x, ids, g, res, module, torch.bfloat16)              # the same loop in bf16
        floor = 1e-2 * float((want - res.double()).abs().max())
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert few_tokens.applies(T)
            few = op(None)                                                  # the few-token path
            plan = op(make_plan(ids, E))                                    # the plan-based path
        for path, got in (("few-token", few), ("plan", plan)):
            assert got.dtype == torch.float32, (name, path, got.dtype)
            err = (got.double() - want).abs().max().item()
            ref_err = (ref16.double() - want).abs().max().item()
            assert err <= 2 * ref_err + floor, (name, path, err, ref_err)
        torch.testing.assert_close(few, plan, rtol=0, atol=2 * floor, msg=lambda m: f"{name}: {m}")
