"""Ahead-of-time compile check: every kernel, at the configurations the launchers use, compiled for
sm_90 (H100 / H200) and sm_80 (A100) on a machine without a GPU, with its resource use read back
from the cubin.

How: the launchers are run on `meta` tensors (no data, no device) with each kernel swapped for a
recorder, so what gets compiled is exactly what the launchers would launch on a GPU: the same
constexprs (tile sizes, flags), num_warps / num_stages, argument dtypes, and the runtime's
specialisations (integer arguments equal to 1 become constants, multiples of 16 and pointers get
the divisibility-16 hint). Each distinct launch is compiled with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`; the PTX is searched for `wgmma` (Hopper tensor-core MMA) and
the cubin is read with the `cuobjdump --dump-resource-usage` that ships in the triton wheel:
registers per thread, shared memory per block, local memory (spills) per thread.

    python -m mom_kernels.aot                      # bf16, fp16, fp32 for sm_90 and sm_80, prints the table
    python -m mom_kernels.aot --dtypes bf16 --archs 90 --shape 4096,2,8,768,3072

The interpreter must be off while compiling (TRITON_INTERPRET decides at import time whether the
kernels are compiled or interpreted), so `main` re-runs itself in a subprocess without it when set.
Tests: tests/test_aot.py (asserts no spills, and wgmma in the GEMM kernels' sm_90 PTX).
"""
import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import triton

GEMM_KERNELS = ("_grouped_gemm_kernel", "_grouped_dw_kernel")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
_TL_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
             torch.int32: "i32", torch.int64: "i64"}


@dataclass
class Launch:
    """One distinct kernel launch as the launchers would issue it."""

    kernel: object  # the triton JITFunction
    name: str
    role: str  # which step of which op launched it
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    key: str = field(default="")

    def config(self) -> str:
        """Tiles, warps/stages and the flags that are on, e.g. '128x128x64 w8s3 A_GATHER,A_LN'."""
        c = self.constexprs
        tiles = "x".join(str(v) for k, v in c.items() if k.startswith("BLOCK"))
        on = [k if v is True else f"{k}={v}" for k, v in c.items()
              if k.isupper() and not k.startswith("BLOCK") and k not in ("UPCAST", "RTNE")
              and v is not False and not (isinstance(v, int) and v == 0)]
        return f"{tiles} w{self.options['num_warps']}s{self.options['num_stages']} " + ",".join(on)


class _Recorder:
    def __init__(self, jit_fn, sink, role_of):
        self.fn, self.sink, self.role_of = jit_fn, sink, role_of

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.fn, args, kwargs, self.role_of()))
        return launch


def _to_launch(fn, args, kwargs, role) -> Launch:
    names = fn.arg_names
    signature, constexprs, attrs = {}, {}, {}
    options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
    values = dict(zip(names, args))
    values.update(kwargs)
    is_constexpr = {p.name: p.is_constexpr for p in fn.params}
    for i, name in enumerate(names):
        v = values[name]
        if is_constexpr[name]:
            signature[name] = "constexpr"
            constexprs[name] = v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + _TL_TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # allocations are 256-byte aligned
        elif isinstance(v, int):
            if v == 1:  # the runtime specialises 1 into a constant
                signature[name] = "constexpr"
                constexprs[name] = 1
            else:
                signature[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        elif type(v).__name__ == "TensorDescriptor":  # the TMA path's weights: tensordesc<bf16[64, 128]>
            signature[name] = f"tensordesc<{_TL_TYPES[v.base.dtype]}{list(v.block_shape)}>"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={v!r}")
    key = repr((fn.__name__, sorted(signature.items()), sorted(constexprs.items()), sorted(attrs), options))
    return Launch(fn, fn.__name__, role, signature, constexprs, attrs, options, key)


_KERNEL_MODULES = ("mom_kernels.gemm", "mom_kernels.gathers", "mom_kernels.reductions", "mom_kernels.weight_grads",
                   "mom_kernels.route", "mom_kernels.decode", "mom_kernels.rotary", "mom_kernels.capacity")


class _env_set:
    """Set environment variables for the block (the launchers read their mode switches at call time)."""

    def __init__(self, env):
        self.env, self.old = env, {}

    def __enter__(self):
        self.old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for k, v in self.old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def record_launches(dtype=torch.bfloat16, T=4096, K=2, E=8, D=768, F=3072):
    """Run the forward and backward launchers of routed_ffn and routed_linear (QKV and output-projection
    forms) and of the GRU router on meta tensors and return the distinct kernel launches."""
    # (the package exports functions named like these modules, so import the modules by path)
    gg = importlib.import_module("mom_kernels.gathers")
    rf = importlib.import_module("mom_kernels.routed_ffn")
    rl = importlib.import_module("mom_kernels.routed_linear")
    from .common import interpreting
    from .routing import default_block_m, make_plan

    if interpreting():
        raise RuntimeError("record_launches needs TRITON_INTERPRET unset (kernels must be JITFunctions)")
    # every kernel of the modules these launchers call (kernels move between them; none may be missed)
    names = [(mod, n) for mod in map(importlib.import_module, _KERNEL_MODULES) for n, v in vars(mod).items()
             if isinstance(v, triton.runtime.jit.JITFunction) and n.endswith("_kernel")]
    sink, role = [], ["?"]
    saved = {(mod, n): getattr(mod, n) for mod, n in names}
    try:
        for mod, n in names:
            setattr(mod, n, _Recorder(saved[mod, n], sink, lambda: role[0]))
        dev = "meta"
        r = lambda *s: torch.empty(*s, device=dev, dtype=dtype)
        ids = torch.empty(T, K, device=dev, dtype=torch.int64)
        plan = make_plan(ids, E, block_m=default_block_m(torch.device("cuda")))  # what a GPU would use
        g = r(T, K)
        x, lw, lb = r(T, D), r(E, D), r(E, D)
        w1, b1, w2, b2 = r(E, D, F), r(E, F), r(E, F, D), r(E, D)
        for k_ in (K, 1):  # K > 1 (per-pick slots + combine) and K == 1 (token store)
            ids_k = torch.empty(T, k_, device=dev, dtype=torch.int64)
            plan_k = make_plan(ids_k, E, block_m=default_block_m(torch.device("cuda")))
            gk = r(T, k_)
            role[0] = f"ffn fwd K={k_}"
            y, mean, rstd, pre = rf.ffn_fwd_impl(x, lw, lb, w1, b1, w2, b2, ids_k, gk, 1e-5, plan_k, True)
            if k_ == K:
                role[0] = "ffn bwd"
                rf.ffn_bwd_impl(y, x, lw, lb, w1, b1, w2, b2, ids_k, gk, mean, rstd, pre, plan_k)
        wq, bq, wo, bo = r(E, D, 3 * D), r(E, 3 * D), r(E, D, D), r(E, D)
        role[0] = "qkv fwd"
        qkv, mean, rstd = rl.linear_fwd_impl(x, wq, bq, ids, None, lw, lb, 1e-5, plan)
        role[0] = "qkv bwd"
        rl.linear_bwd_impl(qkv, x, wq, bq, ids, None, lw, lb, mean, rstd, plan)
        role[0] = "proj fwd"
        o, m0, r0 = rl.linear_fwd_impl(x, wo, bo, ids, g, None, None, 1e-5, plan)
        role[0] = "proj bwd"
        rl.linear_bwd_impl(o, x, wo, bo, ids, g, None, None, m0, r0, plan)
        # the Llama family: RMSNorm (no beta), the SwiGLU FFN (gate | up: two accumulators forward, d gate | d up
        # backward), bias-free projections, the rotary QKV split; split / TMA paths of the SwiGLU GEMMs
        w1s = r(E, D, 2 * F)
        role[0] = "swiglu ffn fwd"
        y, mean, rstd, pre = rf.ffn_fwd_impl(x, lw, None, w1s, None, w2, None, ids, g, 1e-5, plan, True, rms=True,
                                             swiglu=True)
        role[0] = "swiglu ffn bwd"
        rf.ffn_bwd_impl(y, x, lw, None, w1s, None, w2, None, ids, g, mean, rstd, pre, plan, rms=True, swiglu=True)
        for env, tag in (({"MOM_KERNELS_GEMM": "split"}, "split"), ({"MOM_KERNELS_TMA": "1"}, "tma")):
            with _env_set(env):
                role[0] = f"swiglu ffn fwd {tag}"
                rf.ffn_fwd_impl(x, lw, None, w1s, None, w2, None, ids, g, 1e-5, plan, True, rms=True, swiglu=True)
                role[0] = f"swiglu ffn bwd {tag}"
                rf.ffn_bwd_impl(x, x, lw, None, w1s, None, w2, None, ids, g, mean, rstd, r(T * K, 2 * F), plan,
                                rms=True, swiglu=True)
        for bq_ in (bq, None):
            role[0] = "rms qkv fwd" + ("" if bq_ is not None else ", no bias")
            qkv, mean, rstd = rl.linear_fwd_impl(x, wq, bq_, ids, None, lw, None, 1e-5, plan, rms=True)
            role[0] = "rms qkv bwd" + ("" if bq_ is not None else ", no bias")
            rl.linear_bwd_impl(qkv, x, wq, bq_, ids, None, lw, None, mean, rstd, plan, rms=True)
        role[0] = "proj fwd, no bias"
        o, m0, r0 = rl.linear_fwd_impl(x, wo, None, ids, g, None, None, 1e-5, plan)
        role[0] = "proj bwd, no bias"
        rl.linear_bwd_impl(o, x, wo, None, ids, g, None, None, m0, r0, plan)
        role[0] = "swiglu dw gather"
        gg.gather_rows(r(T * K, 2 * F), plan, gather=False, mode=3)
        gg.gather_rows(x, plan, gather=True, mode=1, ln=(mean, rstd, lw, None))
        ro_ = importlib.import_module("mom_kernels.rotary")
        hd = 64
        Bq, Tq, H, Hkv = 4, T // 4, D // hd, max(1, D // hd // 4)
        cos, qkv4 = r(Bq, Tq, hd), r(Bq, Tq, (H + 2 * Hkv) * hd)
        q, k, v = ro_._heads(qkv4, H, hd), ro_._heads(qkv4, Hkv, hd), ro_._heads(qkv4, Hkv, hd)
        for backward in (False, True):
            role[0] = "rotary " + ("bwd" if backward else "fwd")
            ro_._launch(qkv4, q, k, v, cos, cos, backward)
        # capacity (expert-choice) routing: the route with its uniform plan (training), the threshold rule, backward
        ca = importlib.import_module("mom_kernels.capacity")
        Tq = min(T, 1024)  # one sequence's tokens
        for train in (True, False):
            role[0] = f"capacity route, {'train' if train else 'threshold'}"
            ca._launch(r(T, E), Tq, max(1, Tq * K // E), 1.0, 1.0, train)
        role[0] = "capacity route bwd"
        lg = r(T, E)
        ca._launch_bwd(lg, torch.empty(T, E, device=dev, dtype=torch.int64), lg, lg,
                       torch.empty(1, device=dev, dtype=torch.float32), 1.0, 1.0, True, True, True)
        # the operand gathers of the grouped_mm weight-gradient path (GPU default in bf16; see dw_backend)
        role[0] = "dw gather"
        gp = r(T * K)
        gg.gather_rows(r(T * K, F), plan, gather=False, mode=2)
        gg.gather_rows(x, plan, gather=True, mode=1, ln=(mean, rstd, lw, lb))
        gg.gather_rows(r(T, D), plan, gather=True, weights=gp)
        # the split epilogue (MOM_KERNELS_GEMM=split): the Triton GEMM without epilogue, then the rows pass
        with _env_set({"MOM_KERNELS_GEMM": "split"}):
            role[0] = "ffn fwd split"
            rf.ffn_fwd_impl(x, lw, lb, w1, b1, w2, b2, ids, g, 1e-5, plan, True)
            role[0] = "ffn bwd split"
            rf.ffn_bwd_impl(x, x, lw, lb, w1, b1, w2, b2, ids, g, mean, rstd, r(T * K, F), plan)
        # the TMA weight path (MOM_KERNELS_TMA=1, sm_90): W tiles through tensor descriptors
        with _env_set({"MOM_KERNELS_TMA": "1"}):
            role[0] = "ffn fwd tma"
            rf.ffn_fwd_impl(x, lw, lb, w1, b1, w2, b2, ids, g, 1e-5, plan, True)
            role[0] = "ffn bwd tma"
            rf.ffn_bwd_impl(x, x, lw, lb, w1, b1, w2, b2, ids, g, mean, rstd, r(T * K, F), plan)
        # route + plan from router logits [T, E + 1] (a SKIP slot), and its backward
        ro = importlib.import_module("mom_kernels.route")
        logits = r(T, E + 1)
        role[0] = "route fwd"
        _, _, _, slots, f, _, _, _ = ro.route_fwd(logits, E, K, 1.0, True, False, False, E, plan.block_m)
        role[0] = "route bwd"
        ro.route_bwd(logits, slots, f, r(T, K), None, r(E), r(()), 1.0, True, False)
        role[0] = "make_plan"
        ro.plan_from_ids(ids, E, plan.block_m)
        # decoding (mom_kernels/decode.py): one token, the one-pass GEMV and the split-K pair with its second pass
        de = importlib.import_module("mom_kernels.decode")
        ids1 = torch.empty(1, K, device=dev, dtype=torch.int64)
        for split in ("1", "4"):
            with _env_set({"MOM_KERNELS_DECODE_SPLIT_K": split}):
                role[0] = f"decode ffn, split {split}"
                de.decode_routed_ffn(r(1, D), lw, lb, w1, b1, w2, b2, ids1, r(1, K))
                role[0] = f"decode qkv, split {split}"
                de.decode_routed_linear(r(1, D), wq, bq, ids1, None, lw, lb)
                role[0] = f"decode swiglu ffn, split {split}"
                de.decode_routed_ffn(r(1, D), lw, None, w1s, None, w2, None, ids1, r(1, K), norm="rms", act="swiglu")
                role[0] = f"decode rms qkv, split {split}"
                de.decode_routed_linear(r(1, D), wq, None, ids1, None, lw, None, norm="rms")
    finally:
        for mod, n in names:
            setattr(mod, n, saved[mod, n])
    sink += _record_gru(dtype, T, D, E + 1)
    launches, seen = [], {}
    for fn, args, kwargs, rl_ in sink:
        launch = _to_launch(fn, args, dict(kwargs), rl_)
        if launch.key in seen:
            seen[launch.key].role += f"; {rl_}" if rl_ not in seen[launch.key].role else ""
            continue
        seen[launch.key] = launch
        launches.append(launch)
    return launches


def _record_gru(dtype, N, D, S, R=256):
    """The GRU router's launches (mom_kernels/gru.py) at N tokens, r = R (the config's default router_dim)
    and S slots: forward without and with a state; backward with the logits' gradient only (the last step)
    and with the state's too, without and with a state."""
    gru = importlib.import_module("mom_kernels.gru")
    names = ["_gru_router_fwd_kernel", "_gru_router_bwd_kernel"]
    sink, role = [], ["?"]
    saved = {n: getattr(gru, n) for n in names}
    try:
        for n in names:
            setattr(gru, n, _Recorder(saved[n], sink, lambda: role[0]))
        r = lambda *s: torch.empty(*s, device="meta", dtype=dtype)  # noqa: E731
        x, w_ih, w_hh, b_ih, b_hh = r(N, D), r(3 * R, D), r(3 * R, R), r(3 * R), r(3 * R)
        w_head, b_head = r(S, R), r(S)
        need = (True,) * 8
        for h in (None, r(N, R)):
            state = "state" if h is not None else "zero state"
            role[0] = f"gru fwd, {state}"
            s, logits, gi, gh = gru.gru_fwd(x, h, w_ih, w_hh, b_ih, b_hh, w_head, b_head)
            for ds in (None, r(N, R)):
                role[0] = f"gru bwd, {state}" + (", ds" if ds is not None else "")
                gru.gru_bwd(ds, r(N, S), x, h, w_ih, w_hh, b_hh, w_head, gi, gh, s, need)
    finally:
        for n in names:
            setattr(gru, n, saved[n])
    return sink


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path}")
    return path


def resource_usage(cubin: bytes) -> dict:
    """REG / SHARED / LOCAL of the (single) kernel in a cubin, via cuobjdump --dump-resource-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(path)
    res = {}
    for key in ("REG", "SHARED", "LOCAL", "STACK"):
        m = re.search(rf"\b{key}:(\d+)", out)
        res[key.lower()] = int(m.group(1)) if m else None
    return res


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compile one launch for sm_<arch>; returns registers, shared, local (spills), wgmma, seconds."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.time()
    target = GPUTarget("cuda", arch, 32)
    src = ASTSource(fn=launch.kernel, signature=launch.signature, constexprs=launch.constexprs,
                    attrs=launch.attrs)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options(dict(launch.options))
    compiled = triton.compile(src, target=target, options=options.__dict__)
    ptx = compiled.asm["ptx"]
    res = resource_usage(compiled.asm["cubin"])
    res.update(wgmma="wgmma" in ptx, mma="mma.sync" in ptx or "wgmma" in ptx, tma="cp.async.bulk.tensor" in ptx,
               triton_shared=getattr(compiled.metadata, "shared", None), seconds=time.time() - t0)
    return res


def run(dtypes=("bf16", "fp16", "fp32"), archs=(90, 80), shape=(4096, 2, 8, 768, 3072), out=sys.stdout):
    """Compile every launch; print and return the table rows."""
    import triton

    rows = []
    print(f"triton {triton.__version__}, torch {torch.__version__}; launches recorded at "
          f"T,K,E,D,F = {','.join(map(str, shape))}", file=out)
    hdr = f"{'kernel':<22} {'dtype':<5} {'sm':<3} {'regs':>4} {'smem':>7} {'spill':>5} {'wgmma':>5}  {'config':<44} role"
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    for dt in dtypes:
        for launch in record_launches(_DTYPES[dt], *shape):
            for arch in archs:
                if arch < 90 and launch.constexprs.get("W_TMA"):
                    continue  # the launcher never takes the TMA path before sm_90
                res = compile_launch(launch, arch)
                row = dict(kernel=launch.name, dtype=dt, arch=arch, config=launch.config(), role=launch.role,
                           gemm=launch.name in GEMM_KERNELS, **res)
                rows.append(row)
                print(f"{launch.name.strip('_'):<22} {dt:<5} {arch:<3} {res['reg']:>4} {res['triton_shared']:>7} "
                      f"{res['local']:>5} {'yes' if res['wgmma'] else '-':>5}  {launch.config():<44} "
                      f"{launch.role}", file=out, flush=True)
    return rows


_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
                "float64": "fp64", "double": "fp64"}


def _dtype_list(text: str) -> tuple:
    """--dtypes: "bf16,fp32" (torch names too) -> ("bf16", "fp32"); anything else is an argparse error."""
    out = tuple(_DTYPE_NAMES.get(d.strip(), d.strip()) for d in text.split(","))
    bad = [d for d in out if d not in _DTYPES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown dtype(s) {bad}: choose from {sorted(_DTYPES)}")
    return out


def _arch_list(text: str) -> tuple:
    """--archs: "90,80" or "sm_90,sm_80" -> (90, 80)."""
    try:
        out = tuple(int(a.strip().lower().removeprefix("sm_")) for a in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give compute capabilities like 90,80 or sm_90,sm_80") from None
    if any(a < 80 for a in out):
        raise argparse.ArgumentTypeError(f"{text!r}: the kernels target sm_80 and newer")
    return out


def _shape(text: str) -> tuple:
    """--shape: "T,K,E,D,F" -> five positive ints."""
    try:
        out = tuple(int(x) for x in text.split(","))
    except ValueError:
        out = ()
    if len(out) != 5 or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give five positive ints T,K,E,D,F")
    return out


def main(argv=None):
    from mom.cli import ArgumentParser  # the package's one command-line style

    p = ArgumentParser(prog="python -m mom_kernels.aot", description=__doc__)
    p.add_argument("--dtypes", default="bf16,fp16,fp32", type=_dtype_list,
                   help="comma-separated: bf16, fp16, fp32, fp64 (or torch names: bfloat16, float32, ...)")
    p.add_argument("--archs", default="90,80", type=_arch_list, help="comma-separated: 90, 80 (or sm_90, sm_80)")
    p.add_argument("--shape", default="4096,2,8,768,3072", type=_shape, help="T,K,E,D,F the launches are recorded at")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":  # kernels were (or would be) interpreted
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET")
        return subprocess.call([sys.executable, "-m", "mom_kernels.aot"] + (argv if argv is not None else sys.argv[1:]),
                               env=env)
    rows = run(a.dtypes, a.archs, a.shape)
    if a.json:
        from mom.io import atomic_write_json  # an interrupted run leaves the old file

        atomic_write_json(a.json, rows, indent=1)
    bad = [r for r in rows if r["local"]]
    gemm_no_wgmma = [r for r in rows if r["gemm"] and r["arch"] == 90 and r["dtype"] in ("bf16", "fp16") and not r["wgmma"]]
    print(f"\n{len(rows)} compiles; spills in {len(bad)}; sm_90 16-bit GEMMs without wgmma: {len(gemm_no_wgmma)}")
    return 1 if bad or gemm_no_wgmma else 0


if __name__ == "__main__":
    sys.exit(main())
