"""Backend "triton" (mom_kernels; interpreted on a CPU) against "torch" and "reference" in the whole model."""
import pytest
import torch

from helpers import ROUTED_CASES, assert_close, case_id, make_model, small_config

pytest.importorskip("triton")
if not torch.cuda.is_available():
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)


def _run(model, ids, backend):
    model.set_backend(backend)
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    return out, grads


@pytest.mark.parametrize("case", ROUTED_CASES, ids=case_id)
def test_triton_backend_matches_reference_fp64(case):
    # a short sequence keeps the interpreter quick; one bottom/top block is enough around the chunks
    cfg = small_config(**case)
    model = make_model(cfg, torch.float64)
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    ref, ref_g = _run(model, ids, "reference")
    got, got_g = _run(model, ids, "triton")
    for rc, gc in zip(ref.routing, got.routing):
        for r, g in zip(rc, gc):
            assert torch.equal(r.attn_ids, g.attn_ids) and torch.equal(r.ffn_ids, g.ffn_ids)
    assert_close("logits", got.logits, ref.logits, 1e-9, 1e-10)
    assert_close("loss", got.loss, ref.loss, 1e-9, 1e-10)
    for n in ref_g:
        assert_close(f"grad {n}", got_g[n], ref_g[n], 1e-9, 1e-10)


@pytest.mark.parametrize("router", ["gru", "mlp"])
def test_triton_backend_matches_torch_fp32(router):
    cfg = small_config(router=router, top_k=3, n_attn=4, n_ffn=3)
    model = make_model(cfg, torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    ref, ref_g = _run(model, ids, "torch")
    got, got_g = _run(model, ids, "triton")
    assert_close("logits", got.logits, ref.logits, 1e-5, 1e-5)
    for n in ref_g:
        assert_close(f"grad {n}", got_g[n], ref_g[n], 1e-4, 1e-5)


def test_triton_incremental_decoding_equals_full_forward():
    cfg = small_config(backend="triton")
    model = make_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :4], use_cache=True)
        steps = [out.logits]
        for t in range(4, 7):
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert_close("incremental logits", torch.cat(steps, 1), full, 1e-10, 1e-10)
