#!/usr/bin/env bash
# One-shot GPU check of the Bi-WKV Triton kernels on a lent H100/H200 (PyTorch + Triton preinstalled there,
# no internet). It runs, in order, each step under its own time limit (at most ~9.5 min in all; Triton
# compiles each kernel variant on first use, ~5-15 s each, cached on disk for the later steps):
#   1. the GPU tests of tests/test_triton_biwkv.py (values + gradients vs float64, T-split, determinism,
#      bf16/fp16 under autocast, dispatch);
#   2. the float32 benchmark (all sizes; torch vs triton vs triton without T-split);
#   3. a bf16 benchmark on two sizes;
#   4. the Q-Shift + token-mix stage, official pad/cat form vs ours (bench_token_shift.py; needs timm);
#   5. a small sweep of Triton launch overrides (tile length x warps) on three sizes.
# Later steps run even when an earlier one fails. Results go to $OUT (default benchmarks/results):
#   gpu_log.txt, bench_biwkv_cuda.{json,md}, bench_biwkv_cuda_bfloat16.{json,md}, bench_token_shift_cuda.{json,md},
#   bench_biwkv_tune.json
# Usage, from anywhere:  OUT=/some/dir bash benchmarks/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/benchmarks/results}
mkdir -p "$OUT"
LOG="$OUT/gpu_log.txt"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

step() {  # step NAME SECONDS CMD...: run with a time limit, log, never abort the script
    local name=$1 secs=$2
    shift 2
    echo "=== $name ($(date +%T), limit ${secs}s): $*" >>"$LOG"
    local t0=$SECONDS
    timeout --kill-after=10 "$secs" "$@" >>"$LOG" 2>&1
    echo "=== $name: exit $? after $((SECONDS - t0))s" >>"$LOG"
}

{
    echo "date: $(date -Is)"
    nvidia-smi -L 2>&1
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())"
} >"$LOG" 2>&1

# medurwkv/__init__ registers the timm models. If this image's timm cannot import them, pre-register an
# empty 'medurwkv' package whose submodules load from this checkout: medurwkv.ops needs torch and triton
# alone. This goes through sitecustomize because the checkout itself comes first on sys.path (cwd).
if ! $PY -c "import medurwkv" >>"$LOG" 2>&1; then
    shim=$(mktemp -d)
    cat >"$shim/sitecustomize.py" <<EOF
import sys, types
_pkg = types.ModuleType("medurwkv")
_pkg.__path__ = ["$PWD/medurwkv"]
sys.modules["medurwkv"] = _pkg
EOF
    export PYTHONPATH="$shim:$PYTHONPATH"
    echo "import medurwkv failed (above); medurwkv is a stub package from $shim/sitecustomize.py" >>"$LOG"
fi

step gpu-tests 270 $PY -m pytest -q -p no:cacheprovider -rs -o addopts="" \
    tests/test_triton_biwkv.py -k "gpu or tensors or heuristics"
step bench-fp32 150 $PY benchmarks/bench_biwkv.py --device cuda --out "$OUT"
step bench-bf16 60 $PY benchmarks/bench_biwkv.py --device cuda --dtype bfloat16 --rep-ms 100 \
    --sizes 8,1024,768 2,13824,96 --out "$OUT"
step token-shift 30 $PY benchmarks/bench_token_shift.py --device cuda --out "$OUT"
step tune 60 $PY benchmarks/bench_biwkv.py --device cuda --tune --rep-ms 50 \
    --sizes 16,196,192 8,1024,768 2,13824,96 --out "$OUT"
echo "done $(date +%T)" >>"$LOG"
tail -n 40 "$LOG"
