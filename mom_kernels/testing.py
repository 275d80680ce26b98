"""Test helpers shared by tests/test_kernels_*.py and the benchmarks: random routed inputs and the
tolerance rules.

Tolerance rules (flash-attention's): in fp64 / fp32 the kernel must match the fp64 reference to a
tight absolute + relative bound; in fp16 / bf16 the kernel's error against the fp64 reference must
be at most 2x the error of the reference computed in the same low precision, plus a small floor.
"""
import torch

from .routing import make_plan  # noqa: F401  (re-export for tests)


def make_ids(T, K, E, skip_frac=0.25, device="cpu", dtype=torch.int64, generator=None, empty=()):
    """Random picks [T, K]: distinct modules per token (top-K picks are distinct), a fraction
    of picks SKIP (= E), modules in `empty` never picked."""
    allowed = [e for e in range(E) if e not in set(empty)]
    ids = torch.full((T, K), E, dtype=torch.int64)
    for t in range(T):
        perm = torch.randperm(len(allowed), generator=generator)[:K] if allowed else torch.empty(0, dtype=torch.long)
        for k in range(K):
            if k < len(perm) and torch.rand((), generator=generator).item() >= skip_frac:
                ids[t, k] = allowed[perm[k]]
    return ids.to(device=device, dtype=dtype)


def ffn_inputs(T, K, E, D, F, dtype=torch.float64, device="cpu", skip_frac=0.25, seed=0, empty=(),
               ids_dtype=torch.int64, family="gpt2"):
    """Fresh random (x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights) for routed_ffn, fp64 master
    values cast to dtype (so two dtypes see the same numbers). family "llama": the Llama family's modules
    (call routed_ffn with norm="rms", act="swiglu", FAMILY_OPS): w1 [E, D, 2F] (gate | up), no ln_bias, b1, b2
    (None)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * scale)
    x = r(T, D)
    lw = 1.0 + r(E, D, scale=0.2)
    lb = r(E, D, scale=0.2)
    w1 = r(E, D, F * (2 if family == "llama" else 1), scale=D ** -0.5)
    b1 = r(E, F, scale=0.2)
    w2 = r(E, F, D, scale=F ** -0.5)
    b2 = r(E, D, scale=0.2)
    ids = make_ids(T, K, E, skip_frac, generator=gen, empty=empty, dtype=ids_dtype)
    g = torch.rand(T, K, generator=gen, dtype=torch.float64) + 0.1
    if family == "llama":
        lb = b1 = b2 = None
    ts = [t.to(device=device, dtype=dtype) if t is not None else None for t in (x, lw, lb, w1, b1, w2, b2)]
    return (*ts, ids.to(device), g.to(device=device, dtype=dtype))


# the routed ops' keyword arguments per family (norm, activation)
FAMILY_OPS = {"gpt2": dict(norm="layer", act="gelu"), "llama": dict(norm="rms", act="swiglu")}


def linear_inputs(T, K, E, N_in, N_out, dtype=torch.float64, device="cpu", skip_frac=0.25, seed=0,
                  empty=(), ids_dtype=torch.int64):
    """Fresh random (x, weight, bias, ids, weights, ln_weight, ln_bias) for routed_linear."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * scale)
    x = r(T, N_in)
    w = r(E, N_in, N_out, scale=N_in ** -0.5)
    b = r(E, N_out, scale=0.2)
    ids = make_ids(T, K, E, skip_frac, generator=gen, empty=empty, dtype=ids_dtype)
    g = torch.rand(T, K, generator=gen, dtype=torch.float64) + 0.1
    lw = 1.0 + r(E, N_in, scale=0.2)
    lb = r(E, N_in, scale=0.2)
    x, w, b, g, lw, lb = [t.to(device=device, dtype=dtype) for t in (x, w, b, g, lw, lb)]
    return x, w, b, ids.to(device), g, lw, lb


def routed_case(op: str, T: int, K: int, E: int, d_model: int, d_other: int, seed: int, empty=(), device="cpu"):
    """One routed op's fp64 inputs for the kernel tests -> (tensors, op, reference op, indices of the tensors
    that take gradients, output width). op "ffn": routed_ffn with D = d_model, F = d_other (output width D);
    "linear": routed_linear with N_in = d_model, N_out = d_other (LayerNorm affine and weights on)."""
    from . import reference
    from .routed_ffn import routed_ffn
    from .routed_linear import routed_linear

    if op == "ffn":
        ts = list(ffn_inputs(T, K, E, d_model, d_other, seed=seed, empty=empty, device=device))
        return ts, routed_ffn, reference.routed_ffn, [0, 1, 2, 3, 4, 5, 6, 8], d_model
    if op == "linear":
        ts = list(linear_inputs(T, K, E, d_model, d_other, seed=seed, empty=empty, device=device))
        return ts, routed_linear, reference.routed_linear, [0, 1, 2, 4, 5, 6], d_other
    raise ValueError(f"routed_case: op must be 'ffn' or 'linear', got {op!r}")


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_verbose(name, got, want, atol, rtol):
    """allclose with a message saying where and by how much."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.double(), want.double()
    diff = (got - want).abs()
    bad = diff > atol + rtol * want.abs()
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} elements off, max |diff| "
                             f"{diff.max().item():.3e}; first at {idx}: got {got[idx].item():.6e}, "
                             f"want {want[idx].item():.6e} (atol {atol}, rtol {rtol})")


def assert_2x_rule(name, got, ref_lowp, ref_hi, floor):
    """|got - ref_hi| <= 2 |ref_lowp - ref_hi| + floor, in max norm."""
    e_got = max_err(got, ref_hi)
    e_ref = max_err(ref_lowp, ref_hi)
    assert e_got <= 2 * e_ref + floor, (f"{name}: error {e_got:.3e} > 2 x reference's own "
                                        f"{e_ref:.3e} + {floor:.1e}")


def assert_run_close(y, grads, y_ref, grads_ref, names, dtype):
    """A kernel's output and gradients (in the inputs' dtype) against the fp64 reference's: fp64 to 1e-10, fp32 to
    2e-5, the gradients 4x looser (they sum more terms)."""
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert y.dtype == dtype
    assert_close_verbose("y", y, y_ref, tol, tol)
    for name, a, b in zip(names, grads, grads_ref, strict=True):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert_close_verbose(f"d{name}", a, b, tol * 4, tol * 4)


def outputs_and_grads(fn, ts, grad_idx, dy):
    """[fn(*ts), d/d ts[i] for i in grad_idx] with the output's gradient dy (fresh leaves each call)."""
    leaves = [t.detach().clone().requires_grad_() if i in grad_idx else t for i, t in enumerate(ts)]
    y = fn(*leaves)
    return [y] + list(torch.autograd.grad(y, [leaves[i] for i in grad_idx], dy))


def assert_matches_reference(name, got, ref, low, grad_idx, dy, rtol=2e-4, atol=2e-4, floor=2e-2):
    """got = outputs_and_grads of a kernel op on the inputs low (fp32, or bf16 / fp16) against the reference op
    ref: fp32 tight against fp64; 16-bit by the 2x rule (against ref in fp64 and in the same low precision)."""
    hi = outputs_and_grads(ref, [t.double() if t.is_floating_point() else t for t in low], grad_idx, dy.double())
    if got[0].dtype == torch.float32:
        for i, (a, b) in enumerate(zip(got, hi)):
            torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol, msg=f"{name} #{i}")
        return
    ref_low = outputs_and_grads(ref, low, grad_idx, dy.to(got[0].dtype))
    for i, (a, b, c) in enumerate(zip(got, ref_low, hi)):
        assert_2x_rule(f"{name} #{i}", a, b, c, floor)
