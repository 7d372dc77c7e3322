#!/usr/bin/env bash
# Per-machine baselines of the perf suite, and the regression gate (docs/benchmarks.md).
#
#   perf/compare.sh save  [pytest args...]   run the suite, store the run under perf/baselines/<machine>/
#   perf/compare.sh check [pytest args...]   run the suite, compare with this machine's latest stored run; exit 1 when
#                                            a benchmark's median is more than 10 % slower
#   perf/compare.sh name                     print <machine>
#
# <machine>: the GPU's name (nvidia-h200), else cpu-<n>cores (perf/_util.py machine_slug); TRITONACT_BENCH_MACHINE
# overrides it. TRITONACT_BENCH_FAIL overrides the gate (pytest-benchmark's --benchmark-compare-fail expression,
# default median:10%). Extra arguments go to pytest, e.g. `-k train` or `--benchmark-columns=median,ops`.
# Same as `tritonact bench --benchmark-storage=perf/baselines/<machine> --benchmark-autosave` (save) or
# `... --benchmark-compare --benchmark-compare-fail=median:10%` (check).
set -euo pipefail

cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3
fi

verb=${1:-}
[ $# -gt 0 ] && shift
machine=$("$PY" perf/_util.py)
storage="perf/baselines/$machine"

case "$verb" in
name)
    echo "$machine"
    ;;
save)
    exec "$PY" -m pytest perf --benchmark-enable --benchmark-autosave --benchmark-storage="$storage" "$@"
    ;;
check)
    if ! find "$storage" -name '*.json' 2>/dev/null | grep -q .; then
        echo "compare.sh: no baseline for '$machine' in $storage: run 'perf/compare.sh save' first" >&2
        exit 2
    fi
    exec "$PY" -m pytest perf --benchmark-enable --benchmark-storage="$storage" --benchmark-compare \
        --benchmark-compare-fail="${TRITONACT_BENCH_FAIL:-median:10%}" "$@"
    ;;
*)
    echo "usage: $0 save|check|name [pytest args...]" >&2
    exit 2
    ;;
esac
