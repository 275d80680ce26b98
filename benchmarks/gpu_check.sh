#!/usr/bin/env bash
# The GPU checks, in one run on any CUDA machine (from the repo root; nothing beyond torch + triton needed):
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # OUT_DIR defaults to benchmarks/out/gpu_check (ignored by git)
#
#   1. environment (GPU, torch, triton) and the hash of the kernel sources, printed
#   2. one routed step against the dense block and the loop, eager and replayed from CUDA graphs, with its
#      launches and host enqueue time (bf16, GPT-2-large width D 1280, E 16, K 2, batch 8 x 1024)
#                                                                           -> OUT_DIR/step.log, bench_step.csv
#      the Llama-family step at Qwen2.5-0.5B's shape and the capacity-routed (expert-choice) step, eager
#                                                                           -> OUT_DIR/step.log (appended)
#   3. mom-large-efficient against GPT-2-large and the loop, 8 x 1024, eager and graphed
#                                                                           -> OUT_DIR/model.log, bench_model.csv
#   4. the kernel and model tests on CUDA (compiled): route + plan, GRU, launch budget, CUDA-graph capture,
#      GraphedTrainStep, the Llama-family kernels, capacity routing             -> OUT_DIR/tests.log
#   5. the routed_ffn sweep "check" (bf16, against cuBLAS and the loop), then again with the TMA weight path
#      (MOM_KERNELS_TMA=1)                                                  -> OUT_DIR/bench.log, routed_ffn.csv
#   6. the GEMM tile configurations at the base point, forward (epilogue slices, persistent grid, tile shapes)
#                                                                           -> OUT_DIR/bench.log (appended)
#      the routed step again with MOM_KERNELS_AUTOTUNE=1 (its choices per GEMM), and the step's kernel
#      timeline (benchmarks/profile_step.py)                                -> OUT_DIR/step.log (appended)
#   7. generation: mom-large-efficient vs GPT-2-large decoding, bf16, both graphed, batch 1 and 64, prompt 128
#      (benchmarks/bench_decode.py), and the few-token kernel's weight reads against the copy bandwidth
#      (benchmarks/bench_gemv.py)                                           -> OUT_DIR/decode.log
#   8. a short table with the targets, printed last.
# Time: about 7 minutes, at most 10: every stage has its own timeout (80 + 40 + 80 + 110 + 50 + 35 + 25 + 40 +
# 30 + 70 + 30 s), and a stage that times out leaves what it finished. It writes 8 files at most into OUT_DIR;
# copy the table and the CSV rows into benchmarks/results/ with the GPU, date and commit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-benchmarks/out/gpu_check}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="${PYTHONPATH:-.}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1   # silences triton 3.9's notice; the default in 3.6 anyway
T0=$(date +%s)
stage() { echo "== $1 ($(( $(date +%s) - T0 )) s) =="; }

{
  date -u
  git rev-parse --short HEAD 2>/dev/null || true
  echo "kernel sources sha256: $(cat mom_kernels/*.py mom/*.py | sha256sum | cut -c1-16) (the copy's git metadata can be stale)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
  python - <<'PY'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
PY
} 2>&1

stage "routed step (bf16, D 1280, E 16, K 2, 8 x 1024)"
timeout 80 python -m benchmarks.bench_step --device cuda --dtype bfloat16 --n-embd 1280 --n-head 20 \
  --modules 16 --top-k 2 --batch 8 --tokens 1024 --repeats 10 --graph --csv "$OUT_DIR/bench_step.csv" \
  > "$OUT_DIR/step.log" 2>&1 \
  || echo "bench_step failed or timed out (rc $?)"

stage "Llama-family step (Qwen2.5-0.5B's shape) and capacity-routed step (bf16, 8 x 1024, eager)"
timeout 40 python -m benchmarks.bench_step --device cuda --dtype bfloat16 --family llama --n-embd 896 \
  --n-head 14 --kv-heads 2 --n-inner 4864 --modules 10 --top-k 2 --batch 8 --tokens 1024 --repeats 5 \
  --csv "$OUT_DIR/bench_step.csv" 2>&1 | grep -E "^\| " | sed 's/^/llama: /' >> "$OUT_DIR/step.log" \
  || echo "Llama-family bench_step failed or timed out"
timeout 40 python -m benchmarks.bench_step --device cuda --dtype bfloat16 --n-embd 1280 --n-head 20 \
  --modules 16 --routing expert_choice --capacity 0.125 --batch 8 --tokens 1024 --repeats 5 \
  --csv "$OUT_DIR/bench_step.csv" 2>&1 | grep -E "^\| " | sed 's/^/capacity: /' >> "$OUT_DIR/step.log" \
  || echo "capacity bench_step failed or timed out"

stage "whole model (mom-large-efficient vs gpt2-large, bf16, 8 x 1024)"
timeout 80 python -m benchmarks.bench_model --device cuda --dtype bfloat16 --batch 8 --seq-len 1024 \
  --repeats 5 --graph --pairs mom-large-efficient:gpt2-large --csv "$OUT_DIR/bench_model.csv" > "$OUT_DIR/model.log" 2>&1 \
  || echo "bench_model failed or timed out (rc $?)"

stage "kernel and model tests (CUDA, compiled)"
TESTS="tests/test_kernels_routing.py tests/test_kernels_routed_ffn.py tests/test_kernels_routed_linear.py
       tests/test_kernels_weight_grad.py tests/test_kernels_compile.py tests/test_kernels_cuda_graph.py
       tests/test_model_triton.py tests/test_kernels_route.py tests/test_kernels_gru.py tests/test_launches.py
       tests/test_kernels_residual.py tests/test_kernels_gathers.py tests/test_kernels_multitile.py
       tests/test_cuda_graphs.py tests/test_oracle_step.py tests/test_decode_kernels.py tests/test_decode_static.py
       tests/test_kernels_tma.py tests/test_kernels_segments.py tests/test_kernels_subtile.py
       tests/test_kernels_autotune.py tests/test_kernels_llama.py tests/test_capacity.py"
if python -c "import xdist" 2>/dev/null; then PAR="-n 14"; else PAR=""; fi  # compiling dominates: spread it
# shellcheck disable=SC2086
timeout 110 python -m pytest -q -rfE -p no:cacheprovider $PAR $TESTS > "$OUT_DIR/tests.log" 2>&1
TEST_RC=$?
tail -n 1 "$OUT_DIR/tests.log"

stage "routed_ffn sweep (check)"
rm -f "$OUT_DIR/routed_ffn.csv"
timeout 50 python -m benchmarks.bench_routed_ffn --sweep check --csv "$OUT_DIR/routed_ffn.csv" > "$OUT_DIR/bench.log" 2>&1
BENCH_RC=$?
tail -n 2 "$OUT_DIR/bench.log"
echo "-- the same sweep with the TMA weight path (MOM_KERNELS_TMA=1)" >> "$OUT_DIR/bench.log"
MOM_KERNELS_TMA=1 timeout 35 python -m benchmarks.bench_routed_ffn --sweep check --csv "$OUT_DIR/routed_ffn_tma.csv" \
  >> "$OUT_DIR/bench.log" 2>&1 || echo "TMA sweep failed or timed out"

stage "GEMM tiles at the base point (forward): epilogue slices, persistent grid, tile shapes"
timeout 25 python -m benchmarks.bench_routed_ffn --tiles >> "$OUT_DIR/bench.log" 2>&1 || echo "tile sweep failed or timed out"

stage "routed step with MOM_KERNELS_AUTOTUNE=1 (each GEMM's fastest way, timed in the warm-up)"
rm -f /tmp/mom_autotune.json
MOM_KERNELS_AUTOTUNE=1 MOM_KERNELS_AUTOTUNE_CACHE=/tmp/mom_autotune.json timeout 40 \
  python -m benchmarks.bench_step --device cuda --dtype bfloat16 --n-embd 1280 --n-head 20 --modules 16 \
  --top-k 2 --batch 8 --tokens 1024 --repeats 10 --csv /tmp/bench_step_tuned.csv 2>&1 \
  | grep -E "^\| forward\+backward \| (dense|triton)|^autotune" | sed 's/^/tuned: /' >> "$OUT_DIR/step.log" \
  || echo "autotuned step failed or timed out"
{ echo "autotune table (MOM_KERNELS_AUTOTUNE_CACHE; commit it under benchmarks/results/):"
  cat /tmp/mom_autotune.json; } >> "$OUT_DIR/step.log" 2>&1

stage "kernel timeline of the step"
timeout 30 python -m benchmarks.profile_step --device cuda --dtype bfloat16 --n-embd 1280 --n-head 20 \
  --modules 16 --top-k 2 --batch 8 --tokens 1024 >> "$OUT_DIR/step.log" 2>&1 || echo "profile_step failed or timed out"

stage "generation (bf16, graphed) and the few-token kernel"
timeout 70 python -m benchmarks.bench_decode --device cuda --scale 1 --dtype bfloat16 --cuda-graph --batch 1 64 \
  --prompt 128 --new-tokens 16 --repeats 1 --out "$OUT_DIR/decode" > "$OUT_DIR/decode.log" 2>&1 \
  || echo "bench_decode failed or timed out (rc $?)"
rm -rf "$OUT_DIR/decode"   # its CSV / MD / PNG: the table is in decode.log
timeout 30 python -m benchmarks.bench_gemv --device cuda --repeats 30 --csv "" >> "$OUT_DIR/decode.log" 2>&1 \
  || echo "bench_gemv failed or timed out (rc $?)"

echo
stage "summary (tests rc=$TEST_RC, sweep rc=$BENCH_RC; logs in $OUT_DIR)"
echo "-- tests"
grep -E "^(FAILED|ERROR)" "$OUT_DIR/tests.log" | head -n 20
tail -n 1 "$OUT_DIR/tests.log"
echo "-- routed step"
grep -E "^routed step|^FFN rows|^\||^GRU|^tuned: |^llama: |^capacity: " "$OUT_DIR/step.log" || tail -n 5 "$OUT_DIR/step.log"
echo "targets: triton step fwd+bwd <= 1.6x dense eager, <= 1.3x graphed; routing <= 5% of the graphed step"
echo "-- whole model"
grep -E "^batch|^\|" "$OUT_DIR/model.log" || tail -n 5 "$OUT_DIR/model.log"
echo "targets: mom graphed per FLOP vs GPT-2 (graphed) >= 0.85"
echo "-- kernel time of one step (fwd+bwd)"
grep -E "^-- " "$OUT_DIR/step.log"
echo "-- generation (mom-large-efficient vs gpt2-large, graphed) and the few-token kernel"
grep -E "^- |^\| (ffn|qkv) " "$OUT_DIR/decode.log" || tail -n 5 "$OUT_DIR/decode.log"
echo "targets: decode tokens/s >= 1.3x GPT-2-large at batch 1, >= 1.2x at 64; peak memory <= 0.6x; of_copy >= 0.70"
echo "-- routed_ffn sweep"
if [ -f "$OUT_DIR/routed_ffn.csv" ]; then
  python -c "from benchmarks.bench_routed_ffn import summary_csv; print(summary_csv('$OUT_DIR/routed_ffn.csv'))"
  echo "targets: fwd >= 85% of dense, fwd+bwd >= 75%, >= 3x the loop (xloop)"
  if [ -f "$OUT_DIR/routed_ffn_tma.csv" ]; then
    echo "-- routed_ffn sweep, TMA weight path"
    python -c "from benchmarks.bench_routed_ffn import summary_csv; print(summary_csv('$OUT_DIR/routed_ffn_tma.csv'))"
    rm -f "$OUT_DIR/routed_ffn_tma.csv"   # (at most 8 files: its summary is printed here)
  fi
else
  tail -n 5 "$OUT_DIR/bench.log"
fi
echo "-- GEMM tiles (forward, base point)"
grep -E "^tile sweep|^  " "$OUT_DIR/bench.log" | tail -n 12
[ "$TEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
