"""Shared test helpers: small configs, randomised parameters, verbose comparisons."""
import torch

from mom import MoMConfig, MoMForCausalLM


def small_config(**kw) -> MoMConfig:
    """A routed config small enough for the reference loop on a CPU; keyword overrides win."""
    base = dict(vocab_size=61, n_positions=32, n_embd=20, n_head=4, n_inner=36, n_bottom=1, chunks=2,
                n_attn=3, n_ffn=2, depth=2, top_k=2, anchor=True, n_top=1, router="gru", router_dim=12,
                skip=True, router_temperature=0.7)
    base.update(kw)
    return MoMConfig(**base)


@torch.no_grad()
def randomize_(model: torch.nn.Module, scale: float = 0.3):
    """Perturb every parameter (LayerNorm gains and biases too), so no term of the math is trivially 1 or 0."""
    for p in model.parameters():
        size = p.abs().mean() if p.abs().mean() > 0 else torch.tensor(0.05)  # zero-initialised biases
        p.add_(torch.randn_like(p) * scale * size)
    return model


def make_model(config: MoMConfig, dtype=torch.float64, seed=None) -> MoMForCausalLM:
    """A randomised model whose routers make token-dependent picks (GPT-2's init gives near-constant ones)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = randomize_(MoMForCausalLM(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_router." in name and p.dim() == 2:
                p.normal_(0.0, 3.0 / p.shape[1] ** 0.5)
    return model.to(dtype)


def assert_close(name, actual, expected, rtol, atol):
    """allclose with a message that says where and by how much."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs()
    tol = atol + rtol * expected.abs()
    bad = err > tol
    if bad.any():
        i = int((err - tol).argmax())
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), err.shape))
        raise AssertionError(f"{name}: {int(bad.sum())}/{err.numel()} elements off; worst at {idx}: "
                             f"{float(actual[idx]):.6g} vs {float(expected[idx]):.6g} (max abs err "
                             f"{float(err.max()):.3g}, rtol {rtol}, atol {atol})")


# Routed configs every backend is checked on (overrides of small_config).
ROUTED_CASES = [
    dict(),                                                        # GRU, top-2, SKIP, n_attn != n_ffn
    dict(router="mlp"),
    dict(top_k=1, renormalize=False),
    dict(top_k=3, n_attn=4, n_ffn=3, skip=False),
    dict(top_k=3, n_attn=2, n_ffn=3),                              # K = every slot of the attention pool
    dict(shared_slots=True, n_attn=2, n_ffn=4, top_k=2),           # authors' slot layout: several SKIP slots
    dict(weighted_qkv=True, straight_through=True),
    dict(straight_through=True, straight_through_clamp=True, router_temperature=0.2),  # the authors' estimator
    dict(dense_routing=True, balance_loss="pooled", balance_skip=True),
    dict(n_embd=24, n_head=3, n_inner=41, depth=3, anchor=False, n_bottom=0, n_top=0),  # odd sizes
    # the Llama family: RMSNorm, SwiGLU, rotary positions; GQA with q/k/v biases and an untied head, then MHA
    dict(family="llama", n_embd=24, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=False),
    dict(family="llama", n_embd=24, router="mlp", top_k=3, n_attn=4, n_ffn=3, skip=False),
    # capacity (expert-choice) routing: the default capacity (top_k / pool), and every module taking every token
    dict(routing="expert_choice", router_temperature=0.5, capacity_scale=0.7),
    dict(routing="expert_choice", capacity=1.0, router="mlp", family="llama", n_embd=24, weighted_qkv=True),
]


def cached_logits(forward, ids, prefix: int):
    """ids [B, T] decoded with a KV cache: the first `prefix` tokens in one call, then one token per call (forward:
    a model, or a compiled one). Returns the logits of every position [B, T, V] and the last call's output."""
    out = forward(ids[:, :prefix], use_cache=True)
    steps = [out.logits]
    for t in range(prefix, ids.shape[1]):
        out = forward(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    return torch.cat(steps, 1), out


def case_id(case: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in case.items()) or "default"


def run_backend(model, ids, backend):
    """Forward + backward of the LM loss with one backend: (output, every parameter's gradient; zeros where
    autograd left None, i.e. a module nobody picked)."""
    model.set_backend(backend)
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    return out, grads


def assert_same_run(got, expected, rtol, atol):
    """Two run_backend results agree: the same picks, then logits, losses and every gradient."""
    (out, grads), (ref, ref_grads) = got, expected
    for c, (rc, gc) in enumerate(zip(ref.routing, out.routing)):
        for h, (r, g) in enumerate(zip(rc, gc)):
            assert torch.equal(r.attn_ids, g.attn_ids) and torch.equal(r.ffn_ids, g.ffn_ids), (c, h)
    assert_close("logits", out.logits, ref.logits, rtol, atol)
    assert_close("loss", out.loss, ref.loss, rtol, atol)
    assert_close("aux_loss", out.aux_loss, ref.aux_loss, rtol, atol)
    for n in ref_grads:
        assert_close(f"grad {n}", grads[n], ref_grads[n], rtol, atol)


def run_torchrun(args, timeout: float, what: str):
    """`python -m torch.distributed.run ARGS` (torchrun's options, then the program and its arguments) with the
    checkout on PYTHONPATH, one thread per process. Returns the CompletedProcess; a run that fails or hangs is
    an AssertionError naming `what`, each failed rank's exit code (from torchrun's report), any signal or
    std::terminate line, and the end of the output - never an exception from subprocess."""
    import os
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    try:
        r = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise AssertionError(f"{what}: torchrun did not finish within {timeout:.0f} s (a rank hung in a collective?)"
                             f"; its stderr ends:\n{out[-3000:]}") from None
    if r.returncode != 0:
        ranks = re.findall(r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)", r.stderr)
        signals = re.findall(r"Signal \d+ \(\w+\) received by PID \d+", r.stderr)
        terminate = [ln for ln in r.stderr.splitlines() if ln.startswith("terminate called")]
        raise AssertionError(f"{what}: torchrun exited with {r.returncode}; failed ranks (rank, exit code): "
                             f"{ranks or 'not reported'}; {'; '.join(signals + terminate) or 'no signal'}; "
                             f"stderr ends:\n{r.stderr[-3000:]}")
    return r
