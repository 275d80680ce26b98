"""AOT compile check (mom_kernels/aot.py): every kernel at the launchers' configurations compiles for
sm_90 and sm_80 on this CPU machine, with no local-memory spills, the 16-bit GEMM kernels'
sm_90 PTX uses wgmma, the TMA weight path (sm_90 only) loads W with cp.async.bulk.tensor, and the 16-bit
grouped GEMM keeps every variant within 168 registers on sm_90 (its sliced epilogue, `gemm.gemm_config`).
Runs `python -m mom_kernels.aot` in a subprocess (the interpreter must be off
while compiling)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nvidia_backend_reason():
    try:
        import triton
        from triton.backends import backends
    except Exception as e:  # pragma: no cover
        return f"triton import failed: {e}"
    if "nvidia" not in backends:
        return "this triton install has no CUDA backend"
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for tool in ("ptxas", "cuobjdump"):
        if not os.path.exists(os.path.join(bindir, tool)):
            return f"this triton install lacks {tool}"
    return None


@pytest.mark.slow
def test_aot_compile_sm90_sm80(tmp_path):
    reason = _nvidia_backend_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmds = [["--dtypes", "bf16", "--archs", "90,80"], ["--dtypes", "fp32", "--archs", "90"]]
    rows = []
    for args in cmds:
        p = subprocess.run([sys.executable, "-m", "mom_kernels.aot", *args, "--json", str(out)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
        assert out.exists(), f"aot failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
        rows += json.loads(out.read_text())
        out.unlink()
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_ln_gather_kernel", "_grouped_gemm_kernel", "_grouped_dw_kernel", "_combine_kernel",
                       "_ln_affine_bwd_kernel", "_segment_sum_kernel", "_gather_rows_kernel",
                       "_routing_weight_grad_kernel", "_gru_router_fwd_kernel", "_gru_router_bwd_kernel",
                       "_rows_epilogue_kernel", "_route_kernel", "_plan_scan_kernel", "_plan_scatter_kernel",
                       "_route_bwd_kernel", "_decode_gemv_kernel", "_decode_splitk_kernel",
                       "_decode_splitk_combine_kernel", "_rotary_kernel", "_capacity_route_kernel",
                       "_capacity_route_bwd_kernel"}
    assert {r["arch"] for r in rows} == {90, 80}
    spills = [(r["kernel"], r["dtype"], r["arch"], r["config"], r["local"]) for r in rows if r["local"]]
    assert not spills, f"local-memory spills: {spills}"
    no_wgmma = [(r["kernel"], r["config"]) for r in rows
                if r["gemm"] and r["arch"] == 90 and r["dtype"] == "bf16" and not r["wgmma"]]
    assert not no_wgmma, f"sm_90 GEMMs without wgmma: {no_wgmma}"
    tma = [r for r in rows if "W_TMA" in r["config"]]
    assert tma and all(r["tma"] and r["arch"] == 90 for r in tma), "the TMA weight path must load W by TMA"
    assert all(r["reg"] <= 255 for r in rows)
    # the forward / dX grouped GEMM on sm_90 in 16-bit: every variant (epilogue flags, TMA) within 168 registers
    fat = [(r["config"], r["reg"]) for r in rows if r["kernel"] == "_grouped_gemm_kernel" and r["arch"] == 90
           and r["dtype"] == "bf16" and r["reg"] > 168]
    assert not fat, f"sm_90 grouped GEMMs over 168 registers: {fat}"
    # the Llama family's variants are among them: SwiGLU's two accumulators (forward) and d gate | d up (backward)
    swiglu = {r["config"] for r in rows if r["kernel"] == "_grouped_gemm_kernel" and "SWIGLU" in r["config"]}
    assert any("EPI_GELU" in c for c in swiglu) and any("GELU_BWD" in c for c in swiglu), swiglu
    assert all(r["triton_shared"] <= 227 * 1024 for r in rows if r["arch"] == 90)
    assert all(r["triton_shared"] <= 163 * 1024 for r in rows if r["arch"] == 80)


@pytest.mark.parametrize("argv, named", [(["--archs", "sm_70"], "--archs"), (["--archs", "ninety"], "--archs"),
                                         (["--dtypes", "bfloat17"], "--dtypes"), (["--shape", "4096,2"], "--shape")])
def test_aot_bad_arguments_name_the_argument(argv, named, capsys):
    from mom_kernels import aot

    with pytest.raises(SystemExit) as e:
        aot.main(argv)
    assert e.value.code == 2 and f"argument {named}" in capsys.readouterr().err


def test_aot_argument_spellings():
    from mom_kernels import aot

    assert aot._dtype_list("bfloat16,fp32,float16") == ("bf16", "fp32", "fp16")
    assert aot._arch_list("sm_90, 80") == (90, 80)
    assert aot._shape("4096,2,8,768,3072") == (4096, 2, 8, 768, 3072)
