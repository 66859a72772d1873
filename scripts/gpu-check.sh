#!/usr/bin/env bash
# Run every test that needs a real GPU (pytest marker `gpu`), then the GPU benchmark
# (benchmarks/gpu_matmul.py), and print a record: versions, devices, pass/fail, ratios.
#
#   bash scripts/gpu-check.sh [extra pytest args]
#
# On a machine with no package registry: when dask_gpuresources's dependencies (dask,
# distributed, ...) cannot be imported and wheelhouse/ exists (scripts/make-wheelhouse.sh
# builds it where PyPI can be reached), they are installed from it first, offline:
#   python3 -m pip install --no-index --find-links wheelhouse dask_gpuresources
# The tests and the benchmark run the checkout's package (it is put first on PYTHONPATH).
#
# Knobs (environment): PYTHON (default python3), WHEELHOUSE (default wheelhouse),
# GPU_MATMUL_ARGS (extra arguments of the benchmark, e.g. --quick), GPU_MATMUL_JSON (where it
# writes its JSON, default benchmarks/results/gpu_matmul.json), GPU_CHECK_BENCH=0 (skip it).
#
# Exit status: 0 when GPU tests ran and passed (and the benchmark ran), 1 when any test
# failed or the benchmark broke, 2 when none could run (no GPU or NVML here: every `gpu`
# test was skipped), 3 when the package or its dependencies cannot be imported or installed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-wheelhouse}

echo "== environment"
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(uname -n) $(uname -m)"
echo "python: $(command -v "$PYTHON") ($("$PYTHON" --version 2>&1))"
echo "checkout: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    "$(git status --short 2>/dev/null | grep -q . && echo '(with local changes)')"

echo "== install"
importable() {
    # run from the checkout, as the tests are: the package itself always comes from here
    "$PYTHON" -c "
import dask, distributed, tblib, bokeh, prometheus_client, pynvml, yaml, click, cloudpickle
import dask_gpuresources.scheduler, dask_gpuresources.worker
" 2>&1
}
if why=$(importable); then
    echo "dependencies already installed"
elif compgen -G "$WHEELHOUSE/*.whl" >/dev/null; then
    echo "not importable ($(echo "$why" | tail -1)); installing from $WHEELHOUSE/ (offline)"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index \
        --find-links "$WHEELHOUSE" dask_gpuresources
    if ! why=$(importable); then
        echo "still not importable after installing from $WHEELHOUSE/: $(echo "$why" | tail -1)"
        exit 3
    fi
    echo "installed from $WHEELHOUSE/"
else
    echo "not importable ($(echo "$why" | tail -1)), and no $WHEELHOUSE/*.whl to install from:"
    echo "build it where PyPI can be reached (bash scripts/make-wheelhouse.sh) and carry it here"
    exit 3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== versions and devices"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
else
    echo "nvidia-smi: not found"
fi
"$PYTHON" - <<'PY'
import importlib.metadata as md

from dask_gpuresources._nvml import NVMLUnavailable, RealNVML

for dist in ("dask_gpuresources", "dask", "distributed", "nvidia-ml-py", "pytest"):
    try:
        print(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist}: not installed (from the checkout)" if dist == "dask_gpuresources"
              else f"{dist}: not installed")
try:
    for d in RealNVML().devices():
        print(f"NVML {d.index}: {d.name} {d.uuid} {d.memory_total / 2**30:.1f} GiB"
              + (f", {len(d.mig)} MIG instances" if d.mig else ""))
except NVMLUnavailable as err:
    print(f"NVML unavailable: {err}")
for name in ("torch", "cupy", "jax", "tensorflow"):
    try:
        module = __import__(name)
        print(f"{name} {module.__version__}")
    except Exception:
        print(f"{name}: not installed")
PY

echo "== gpu tests"
mapfile -t files < <(grep -l 'pytest.mark.gpu' tests/test_*.py)
echo "files: ${files[*]}"
log=$(mktemp)
"$PYTHON" -m pytest -m gpu -rA -q "${files[@]}" "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}

last=$(grep -E '[0-9]+ (passed|failed|skipped|deselected|error)' "$log" | tail -1)
count() { echo "$last" | grep -oE "[0-9]+ $1" | grep -oE '[0-9]+' || echo 0; }
passed=$(count passed); failed=$(( $(count failed) + $(count error) )); skipped=$(count skipped)
outcomes=$(grep -E '^(FAILED|ERROR|SKIPPED)' "$log" | sed 's/^/  /')
rm -f "$log"

bench="not run"
bench_rc=0
if [ "${GPU_CHECK_BENCH:-1}" != 0 ]; then
    echo "== benchmark: benchmarks/gpu_matmul.py"
    json=${GPU_MATMUL_JSON:-benchmarks/results/gpu_matmul.json}
    # shellcheck disable=SC2086  # GPU_MATMUL_ARGS is a list of words
    "$PYTHON" benchmarks/gpu_matmul.py --json "$json" ${GPU_MATMUL_ARGS:-}
    bench_rc=$?
    case $bench_rc in
        0) bench=$("$PYTHON" -c "
import json, sys
rows = json.load(open(sys.argv[1]))['rows']
print(', '.join(f\"{r['variant']} {r['tflops']:.0f} TFLOP/s x{r['ratio_to_direct']:.3f}\"
                + ('' if r['met'] in (True, None) else ' MISSED') for r in rows))
" "$json") ;;
        2) bench="nothing measured (no PyTorch or no CUDA GPU here)" ;;
        *) bench="FAILED (exit $bench_rc)" ;;
    esac
fi

echo "== summary"
echo "gpu tests: ${passed} passed, ${failed} failed, ${skipped} skipped"
[ -n "$outcomes" ] && echo "$outcomes"
echo "gpu_matmul: $bench"
broken=0
if [ "$rc" -ne 0 ]; then
    # a failure, or pytest stopped before any outcome (usage error, internal error)
    if [ "$failed" -gt 0 ] || [ $((passed + skipped)) -eq 0 ]; then broken=1; fi
fi
if [ "$broken" -eq 1 ]; then echo "gpu tests did not pass (pytest exit $rc)"; exit 1; fi
if [ "$passed" -eq 0 ]; then echo "no gpu test ran here"; exit 2; fi
if [ "$bench_rc" -ne 0 ] && [ "$bench_rc" -ne 2 ]; then exit 1; fi
exit 0
