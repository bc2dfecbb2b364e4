#!/usr/bin/env bash
# One-call GPU check of Med-URWKV's Bi-WKV kernels and models on a bare H100/H200 (its own torch and Triton,
# no internet). Finishes in under 5 minutes (each step has its own limit; the limits add up to 290 s) and
# writes 7 files to $OUT (default: benchmarks/results beside this script):
#   gpu_check.log              versions, each step's command, exit code and duration, the summary, and
#                              the first-launch guard's one-time cost (bench_guard_cost.py)
#   tests_gpu.txt              GPU tests of the kernels (tiny shapes, (1, 65536, 64), strided, bf16/fp16,
#                              T-split, determinism, the guard, torch.compile) + the CPU guard/compile tests
#   tests_launch_configs.txt   every launch configuration the heuristic can pick, compiled for sm_90, spills
#   bench_biwkv_cuda.{json,md} Bi-WKV timings (torch path vs Triton) on the issue's target sizes
#   bench_models_cuda.{json,md} Med-URWKV-T vs SwinUNETR (feature 48) and UNETR, bf16, 224/b32 and 1024/b2,
#                              inference and training step, in one process
# monai and timm are not (or not in the pinned version) on such a machine: put their wheels in .whl/ at the
# repository root (benchmarks/README.md shows the pip download command); they are installed into
# /tmp/medurwkv-site first. Steps run even when an earlier one fails.
# Usage, from anywhere:  OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/benchmarks/results}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY=${PYTHON:-python3}
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
: >"$LOG"

if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
    timeout 15 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/medurwkv-site \
        "$ROOT"/.whl/*.whl >>"$LOG" 2>&1 || echo "wheel install failed (see above)" >>"$LOG"
    export PYTHONPATH="/tmp/medurwkv-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"

{
    echo "date: $(date -Is)"
    timeout 5 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    timeout 15 $PY - <<'EOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("triton", "monai", "timm", "numpy", "xdist"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as exc:
        print(f"{name}: not importable ({type(exc).__name__})")
EOF
} >>"$LOG" 2>&1
cat "$LOG"

step() {  # step NAME SECONDS OUTFILE CMD...: time-limited, logged, never aborts the script
    local name=$1 secs=$2 file=$3
    shift 3
    echo "=== $name (limit ${secs}s): $*" >>"$LOG"
    local t0=$SECONDS
    timeout --kill-after=5 "$secs" "$@" >"$file" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0))s; $(grep -E '(passed|failed|error).* in [0-9.]+s' "$file" | tail -n 1)" >>"$LOG"
}

NPROC=$(nproc 2>/dev/null || echo 4)
XDIST=() XDIST_GPU=()
if $PY -c "import xdist" 2>/dev/null; then  # pytest-xdist: compile in parallel
    XDIST=(-n "$((NPROC < 16 ? NPROC : 16))")
    XDIST_GPU=(-n 4)
fi
PYTEST=($PY -m pytest -q -p no:cacheprovider -o addopts= -rfEs)

step launch-configs 45 "$OUT/tests_launch_configs.txt" env MEDURWKV_TEST_ALL_LAUNCH_CONFIGS=1 \
    "${PYTEST[@]}" "${XDIST[@]}" tests/test_triton_launch_configs.py
# -k keeps the GPU tests of test_triton_biwkv.py (its CPU interpreter checks run in the CPU suite) and all of
# the guard and compile tests, except the slow compiled-model test (CPU; the CPU suite runs it)
step gpu-tests 80 "$OUT/tests_gpu.txt" "${PYTEST[@]}" "${XDIST_GPU[@]}" \
    tests/test_triton_biwkv.py tests/test_biwkv_backend.py tests/test_biwkv_compile.py \
    -k "gpu or tensors or heuristics or test_biwkv_backend or (test_biwkv_compile and not med_urwkv)"
step bench-biwkv 35 "$OUT/bench_biwkv_stdout.txt" $PY benchmarks/bench_biwkv.py --device cuda --rep-ms 100 \
    --variants torch,triton,triton_nosplit --sizes 16,196,192 8,1024,768 2,13824,96 1,65536,64 --out "$OUT"
step guard-cost 15 "$OUT/guard_cost_stdout.txt" $PY benchmarks/bench_guard_cost.py --device cuda
step bench-models 80 "$OUT/bench_models_stdout.txt" $PY benchmarks/bench_models.py --device cuda --reps 10 \
    --models "Med-URWKV-T (adapter)" "Med-URWKV-T (plain)" "SwinUNETR (feature 48)" UNETR \
    --settings infer224x32 infer1024x2 train224x32 train1024x2 --out "$OUT"

# the benchmarks' stdout (the guard-cost table is nothing else) goes into the log, not into extra files
for f in bench_biwkv_stdout guard_cost_stdout bench_models_stdout; do
    echo "--- tail of $f" >>"$LOG"
    tail -n 15 "$OUT/$f.txt" >>"$LOG"
    rm -f "$OUT/$f.txt"
done
echo "total ${SECONDS}s" >>"$LOG"
tail -n 40 "$LOG"
for f in tests_launch_configs.txt tests_gpu.txt; do echo "--- $f"; tail -n 15 "$OUT/$f"; done
cat "$OUT"/bench_biwkv_cuda.md "$OUT"/bench_models_cuda.md 2>/dev/null
