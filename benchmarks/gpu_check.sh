#!/usr/bin/env bash
# The one script a session with a lent GPU runs (from the repo root, PYTHONPATH=., nothing installed):
#   1. environment (GPU, torch, triton)                                   -> $OUT/env.txt
#   2. the kernel tests, compiled on CUDA (TRITON_INTERPRET unset)        -> $OUT/tests_*.log
#   3. the routed_ffn throughput sweep "check" (bf16, 12 configurations)  -> $OUT/bench.log, $OUT/routed_ffn.csv
#   4. forward TFLOP/s of 4 GEMM tile configurations at the base point     -> $OUT/tiles.log
#   5. a short table, printed last.
# Budget: < 6 minutes in all (tests <= 190 s, sweep <= 110 s, tiles <= 45 s, each under its own timeout; a timed-out
# sweep still leaves its finished rows in the CSV and the table). Copy $OUT/routed_ffn.csv rows into
# benchmarks/results/routed_ffn.csv afterwards to keep them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-.}"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1   # silences triton 3.9's notice; the default in 3.6 anyway
T0=$(date +%s)

{
  date -u
  git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
  python - <<'PY'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== kernel tests (CUDA, compiled) =="
# Eight pytest processes in parallel: the time goes into compiling each kernel specialisation
# (single-threaded per process), and the files share the triton cache.
pids=()
run_tests() {  # name, pytest args...
  local name=$1; shift
  timeout 190 python -m pytest -q -p no:cacheprovider "$@" > "$OUT/tests_$name.log" 2>&1 &
  pids+=($!)
}
run_tests routing tests/test_kernels_routing.py
run_tests compile tests/test_kernels_compile.py
for op in ffn linear; do  # ~50-110 kernel specialisations per group (counted under the interpreter)
  run_tests ${op}_fp64 tests/test_kernels_routed_$op.py -k fp64
  run_tests ${op}_fp32 tests/test_kernels_routed_$op.py -k fp32
  run_tests ${op}_other tests/test_kernels_routed_$op.py -k "not fp64 and not fp32"
done
TEST_RC=0
for pid in "${pids[@]}"; do wait "$pid" || TEST_RC=1; done
for f in "$OUT"/tests_*.log; do
  echo "$(basename "$f" .log): $(grep -E "passed|failed|error|no tests" "$f" | tail -n 1 || echo "timed out")"
done | tee "$OUT/tests.log"

echo "== routed_ffn sweep (check) =="
rm -f "$OUT/routed_ffn.csv"
timeout 110 python -m benchmarks.bench_routed_ffn --sweep check --csv "$OUT/routed_ffn.csv" > "$OUT/bench.log" 2>&1
BENCH_RC=$?
tail -n 2 "$OUT/bench.log"

echo "== GEMM tile configurations (forward, base point) =="
timeout 45 python -m benchmarks.bench_routed_ffn --tiles > "$OUT/tiles.log" 2>&1
grep -E "tile sweep|TFLOP/s|failed" "$OUT/tiles.log" > "$OUT/tiles.txt" || true

echo "== routed step and whole model (issue 4: bf16, GPT-2-large width) =="
timeout 60 python -m benchmarks.bench_step --device cuda --dtype bfloat16 --n-embd 1280 --n-head 20 \
  --tokens 8192 --csv "$OUT/bench_step.csv" > "$OUT/step.log" 2>&1 || echo "bench_step failed or timed out"
timeout 100 python -m benchmarks.bench_model --device cuda --dtype bfloat16 --batch 8 --seq-len 1024 \
  --pairs mom-large-efficient:gpt2-large --csv "$OUT/bench_model.csv" > "$OUT/model.log" 2>&1 \
  || echo "bench_model failed or timed out"

echo
echo "== summary ($(( $(date +%s) - T0 )) s; tests rc=$TEST_RC, bench rc=$BENCH_RC; logs in $OUT) =="
cat "$OUT/tests.log"
if [ -f "$OUT/routed_ffn.csv" ]; then
  python -c "from benchmarks.bench_routed_ffn import summary_csv; print(summary_csv('$OUT/routed_ffn.csv'))"
  echo "targets: fwd >= 85% of dense, fwd+bwd >= 75%, >= 3x the loop (xloop)"
  cat "$OUT/tiles.txt" 2>/dev/null
else
  echo "(no benchmark rows)"
fi
grep -E "^\|" "$OUT/step.log" 2>/dev/null && echo "targets: triton step fwd+bwd >= 5x reference; peak memory <= dense"
grep -E "^\|" "$OUT/model.log" 2>/dev/null && echo "targets: per FLOP vs GPT-2 >= 0.85"
[ "$TEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
