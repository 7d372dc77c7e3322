#!/usr/bin/env bash
# The one script to run on a GPU machine (issue 5). Finishes in under 8 minutes: each stage runs under `timeout`,
# so one hang cannot eat the others' time.
#
#   perf/gpu_check.sh            on a GPU; results go to $OUT when set, else ./gpu_check_out
#   perf/gpu_check.sh --smoke    anywhere (tests/test_perf_tools.py runs it on CPU): tiny sizes, the pytest stages
#                                only collect
#
# Stages (limit in seconds; GPU_CHECK_STAGES="kernels train" picks some):
#   tests     140  kernel correctness on the GPU against the torch reference: every cuda-parametrized test of
#                  tests/test_kernels_quantize.py and tests/test_kernels_bn_act.py (bit-exact codes, forward and all
#                  gradients, end-to-end TinyNet triton vs torch backend) and the CUDA peak-memory test
#   kernels    80  kernel GB/s against the device's measured copy bandwidth (perf/gpu_report.py --stage kernels)
#   train     110  resnet50 training step, batch 64 at 224x224: step time, peak memory, activation MiB/sample;
#                  exact vs 4-bit vs torch.utils.checkpoint per stage
#   maxbatch   75  largest resnet50 batch that trains in 8 GiB, exact vs 4-bit (binary search)
#   perf       40  the pytest-benchmark suite's smoke run on the GPU (its CUDA code paths, max-batch test included)
# Limits add up to 445 s (7.4 min), plus a few seconds of start-up; a stage that compiles Triton kernels the
# stages before it did not pays for that inside its limit (Triton's cache is shared across the stages).
#
# Writes gpu_check.log, stages.txt (name, exit code, seconds), kernels.json, train.json, maxbatch.json, results.json
# and results.md (a short markdown table). Exit status 0 when every stage passed, else 1.
set -euo pipefail

SMOKE=0
if [ "${1:-}" = "--smoke" ]; then
    SMOKE=1
elif [ -n "${1:-}" ]; then
    echo "usage: $0 [--smoke]" >&2
    exit 2
fi

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-./gpu_check_out}"
STAGES="${GPU_CHECK_STAGES:-tests kernels train maxbatch perf}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
: >"$OUT_DIR/stages.txt"
export PYTHONUNBUFFERED=1

say() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

# Compiled kernels, not Triton's interpreter (tests/conftest.py only sets TRITON_INTERPRET=1 when it is unset).
if [ "$SMOKE" = 0 ]; then
    export TRITON_INTERPRET=0
fi

# Install nothing when the package imports (the GPU image has torch, triton, torchvision, pytest, pytest-benchmark).
# tritonact.kernels is the kernels/ folder mapped by pyproject.toml, so it imports only once installed.
if ! "$PY" -c "import tritonact.kernels.quantize" >/dev/null 2>&1; then
    say "tritonact does not import: pip install -e . --no-deps --no-build-isolation"
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tee -a "$LOG"
fi
"$PY" -c "import torch, tritonact; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), \
'|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', '| tritonact', tritonact.__version__)" \
    2>&1 | tee -a "$LOG"
if [ "$SMOKE" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "no CUDA GPU here (torch.cuda.is_available() is False); use --smoke to check the script on CPU"
    exit 2
fi

REPORT=("$PY" perf/gpu_report.py --out "$OUT_DIR")
PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
if [ "$SMOKE" = 1 ]; then
    REPORT+=(--smoke)
    PYTEST+=(--collect-only)
elif "$PY" -c "import xdist" >/dev/null 2>&1; then
    TESTS_PAR=(-n 8)  # Triton compiles in parallel workers (the GPU machine has 16 cores)
fi

FAILED=0
run_stage() {  # run_stage NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2 t0 rc
    shift 2
    case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
    say "stage $name (limit ${limit}s): $*"
    t0=$(date +%s)
    set +e
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    set -e
    echo "$name $rc $(($(date +%s) - t0))" >>"$OUT_DIR/stages.txt"
    if [ "$rc" = 0 ]; then
        say "stage $name ok"
    else
        [ "$rc" = 124 ] && say "stage $name TIMED OUT after ${limit}s" || say "stage $name FAILED (exit $rc)"
        FAILED=1
    fi
}

run_stage tests 140 "${PYTEST[@]}" ${TESTS_PAR[@]+"${TESTS_PAR[@]}"} -k cuda \
    tests/test_kernels_quantize.py tests/test_kernels_bn_act.py tests/test_memory.py
run_stage kernels 80 "${REPORT[@]}" --stage kernels
run_stage train 110 "${REPORT[@]}" --stage train
run_stage maxbatch 75 "${REPORT[@]}" --stage maxbatch
run_stage perf 40 "${PYTEST[@]}" perf

"${REPORT[@]}" --summarize 2>&1 | tee -a "$LOG" >/dev/null
cat "$OUT_DIR/results.md"
say "done: results in $OUT_DIR (exit $FAILED)"
exit "$FAILED"
