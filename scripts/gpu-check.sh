#!/usr/bin/env bash
# Run every test that needs a real GPU (pytest marker `gpu`) and print a summary.
#
#   bash scripts/gpu-check.sh [extra pytest args]
#
# Exit status: 0 when GPU tests ran and passed, 1 when any failed, 2 when none could run
# (no GPU or NVML here: every `gpu` test was skipped).
set -uo pipefail
cd "$(dirname "$0")/.."

echo "== devices"
if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "nvidia-smi: not found"; fi
python - <<'PY'
from dask_gpuresources._nvml import RealNVML, NVMLUnavailable
try:
    for d in RealNVML().devices():
        print(f"NVML {d.index}: {d.name} {d.uuid} {d.memory_total / 2**30:.1f} GiB"
              + (f", {len(d.mig)} MIG instances" if d.mig else ""))
except NVMLUnavailable as err:
    print(f"NVML unavailable: {err}")
for name in ("torch", "cupy", "tensorflow"):
    try:
        module = __import__(name)
        print(f"{name} {module.__version__}")
    except Exception:
        print(f"{name}: not installed")
PY

echo "== gpu tests"
log=$(mktemp)
python -m pytest -m gpu -rA -q tests "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}

echo "== summary"
last=$(grep -E '[0-9]+ (passed|failed|skipped|deselected|error)' "$log" | tail -1)
count() { echo "$last" | grep -oE "[0-9]+ $1" | grep -oE '[0-9]+' || echo 0; }
passed=$(count passed); failed=$(( $(count failed) + $(count error) )); skipped=$(count skipped)
echo "gpu tests: ${passed} passed, ${failed} failed, ${skipped} skipped"
grep -E '^(FAILED|ERROR|SKIPPED)' "$log" | sed 's/^/  /'
rm -f "$log"
if [ "$rc" -ne 0 ] && [ "$failed" -gt 0 ]; then exit 1; fi
if [ "$passed" -eq 0 ]; then echo "no gpu test ran here"; exit 2; fi
exit 0
