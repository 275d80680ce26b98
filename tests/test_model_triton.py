"""Backend "triton" (mom_kernels; interpreted on a CPU, compiled on a GPU) against "torch" and "reference" in
the whole model."""
import pytest
import torch

from helpers import (ROUTED_CASES, assert_close, assert_same_run, cached_logits, case_id, make_model, run_backend,
                     small_config)

pytest.importorskip("triton")
if not torch.cuda.is_available():
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("case", ROUTED_CASES, ids=case_id)
def test_triton_backend_matches_reference_fp64(case):
    # a short sequence keeps the interpreter quick; one bottom/top block is enough around the chunks
    cfg = small_config(**case)
    model = make_model(cfg, torch.float64).to(DEVICE)
    ids = torch.randint(0, cfg.vocab_size, (2, 6), device=DEVICE)
    assert_same_run(run_backend(model, ids, "triton"), run_backend(model, ids, "reference"), 1e-9, 1e-10)


@pytest.mark.parametrize("router", ["gru", "mlp"])
def test_triton_backend_matches_torch_fp32(router):
    cfg = small_config(router=router, top_k=3, n_attn=4, n_ffn=3)
    model = make_model(cfg, torch.float32).to(DEVICE)
    ids = torch.randint(0, cfg.vocab_size, (2, 6), device=DEVICE)
    assert_same_run(run_backend(model, ids, "triton"), run_backend(model, ids, "torch"), 1e-4, 1e-5)


def test_triton_incremental_decoding_equals_full_forward():
    cfg = small_config(backend="triton")
    model = make_model(cfg).to(DEVICE).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 7), device=DEVICE)
    with torch.no_grad():
        full = model(ids).logits
        logits = cached_logits(model, ids, 4)[0]
    assert_close("incremental logits", logits, full, 1e-10, 1e-10)
