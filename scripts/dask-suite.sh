#!/usr/bin/env bash
# Does preloading dask_gpuresources change ordinary Dask behaviour?
#
# Runs a chosen part of distributed's own test suite twice against the INSTALLED distributed:
# once plainly ("baseline") and once with the plugin preloaded into every scheduler
# (DASK_DISTRIBUTED__SCHEDULER__PRELOAD='["dask_gpuresources"]', "plugin"), then prints the
# tests whose outcome differs. Differing tests are run again both ways to tell a consistent
# difference (the plugin's doing) from flakiness. Nothing is fetched at run time.
#
#   bash scripts/dask-suite.sh [DISTRIBUTED_SRC] [TEST_FILE ...]
#
#   DISTRIBUTED_SRC   checkout (or `git archive` export) of dask/distributed at the release
#                     matching the installed distributed; see scripts/README.md
#   TEST_FILE         paths relative to the checkout (default: $DASK_SUITE_TESTS or the
#                     list below); `distributed/tests/test_x.py::test_y` node ids work too
#
# Environment (all optional):
#   DASK_SUITE_TESTS    default test files, space separated
#   DASK_SUITE_OUT      results folder (default /tmp/dask-suite-YYYYmmdd-HHMMSS)
#   DASK_SUITE_TIMEOUT  per-test timeout in seconds, pytest-timeout (default 120)
#   DASK_SUITE_RECHECK  reruns of the differing tests, each way (default 1; 0 = none)
#   DASK_SUITE_MODES    "baseline plugin" (default); one of them to run a single side
#   DASK_SUITE_NICE     niceness of the pytest processes (default 19)
#   DASK_SUITE_PYTEST_ARGS  extra pytest arguments (e.g. "-k resources")
#   PYTHON              interpreter (default python3)
#
# Results: $DASK_SUITE_OUT/{baseline,plugin}/<file>.{xml,log}, runs.tsv (one line per pytest
# run: mode, file, seconds, exit status, git commit, package state), recheck/, summary.txt.
# Exit status: 0 no consistent difference, 1 some test differs consistently (or unchecked),
# 2 setup error.
set -uo pipefail
{ # the whole script is one block: bash reads it completely before running, so editing this
  # file during a (long) run cannot derail that run

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
PYTHON=${PYTHON:-python3}
NICE=${DASK_SUITE_NICE:-19}
TIMEOUT=${DASK_SUITE_TIMEOUT:-120}
RECHECK=${DASK_SUITE_RECHECK:-1}
MODES=${DASK_SUITE_MODES:-"baseline plugin"}
PRELOAD='["dask_gpuresources"]'
DEFAULT_TESTS="distributed/tests/test_resources.py distributed/tests/test_actor.py
distributed/tests/test_cancelled_state.py distributed/tests/test_worker_state_machine.py
distributed/tests/test_scheduler.py distributed/tests/test_steal.py distributed/tests/test_worker.py"

src=${DISTRIBUTED_SRC:-}
if [[ $# -gt 0 && -d "$1" ]]; then src=$1; shift; fi
if [[ -z "$src" || ! -f "$src/distributed/utils_test.py" || ! -f "$src/conftest.py" ]]; then
    echo "usage: $0 DISTRIBUTED_SRC [TEST_FILE ...]  (or set DISTRIBUTED_SRC)" >&2
    echo "DISTRIBUTED_SRC must be a checkout of dask/distributed (with conftest.py and" >&2
    echo "distributed/tests/); see scripts/README.md for how to get one offline." >&2
    exit 2
fi
src=$(cd "$src" && pwd)
if [[ $# -gt 0 ]]; then tests=("$@"); else read -r -a tests <<<"$(echo ${DASK_SUITE_TESTS:-$DEFAULT_TESTS})"; fi

out=${DASK_SUITE_OUT:-/tmp/dask-suite-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
work=$out/work

# --- versions: the checkout must match the installed distributed ---------------------------
installed=$(cd / && "$PYTHON" -c 'import distributed; print(distributed.__version__)') || {
    echo "cannot import distributed with $PYTHON" >&2; exit 2; }
src_version=$( (cd "$src" && git describe --tags 2>/dev/null) || cat "$src/.dask-suite-version" 2>/dev/null || echo unknown)
echo "== distributed installed: $installed; checkout: $src ($src_version)"
case "$src_version" in
    "$installed"|unknown|*"$installed"*) ;;
    *) echo "warning: checkout version '$src_version' is not the installed $installed" >&2 ;;
esac

# --- work folder: distributed's tests/ + its conftest and pytest config, no package --------
# Running inside the checkout would put the checkout's `distributed` first on sys.path (the
# root conftest.py is imported with its folder prepended). The copy has no `distributed`
# folder, so `import distributed` resolves to site-packages; the probe below checks it.
rm -rf "$work"
mkdir -p "$work/tests" "$work/_probe"
cp -r "$src/distributed/tests/." "$work/tests/"
cp "$src/conftest.py" "$work/conftest.py"
cp "$src/pyproject.toml" "$work/pyproject.toml"   # [tool.pytest.ini_options]: markers, filterwarnings
cat >"$work/_probe/_dask_suite_probe.py" <<'PY'
"""pytest plugin of dask-suite.sh: proves which distributed runs and whether the preload ran."""
import json
import os
import sys

import pytest


def pytest_configure(config):
    # distributed's tests use @pytest.mark.flaky (pytest-rerunfailures) in some files; with
    # --strict-markers an unknown marker is a collection error, so register it when absent.
    if not config.pluginmanager.hasplugin("rerunfailures"):
        config.addinivalue_line("markers", "flaky: rerun marker (pytest-rerunfailures absent)")
    config.addinivalue_line("markers", "repeat: pytest-repeat marker")


def _where():
    import distributed
    import distributed.utils_test as ut

    src = os.environ.get("DASK_SUITE_SRC", "")
    work = os.environ.get("DASK_SUITE_WORK", "")
    path = os.path.realpath(distributed.__file__)
    # TLS tests look for certificates beside the installed utils_test (tests/ is not
    # installed); point them at the copied tests folder.
    ut.certs_dir = os.path.join(work, "tests")
    return distributed, path, src, work


def pytest_sessionstart(session):
    # the header lines, also under -q (which hides pytest_report_header)
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None and session.config.option.verbose < 0:
        for line in pytest_report_header(session.config):
            tr.write_line(line)


def pytest_report_header(config):
    import dask

    distributed, path, src, work = _where()
    if (src and path.startswith(os.path.realpath(src) + os.sep)) or (
        work and path.startswith(os.path.realpath(work) + os.sep)
    ):
        raise pytest.UsageError(f"distributed imported from the checkout: {path}")
    preload = dask.config.get("distributed.scheduler.preload", None)
    return [
        f"dask-suite: distributed {distributed.__version__} from {path}",
        f"dask-suite: distributed.scheduler.preload = {preload!r}",
    ]


def pytest_sessionfinish(session, exitstatus):
    import dask

    try:
        distributed, path, _, _ = _where()
    except Exception as err:  # pragma: no cover
        path = f"<{err}>"
    info = {
        "distributed_file": path,
        "preload_env": os.environ.get("DASK_DISTRIBUTED__SCHEDULER__PRELOAD"),
        # imported lazily by dask_gpuresources.dask_setup only: proof the preload really ran
        "plugin_loaded": "dask_gpuresources.scheduler" in sys.modules,
        "plugin_file": getattr(sys.modules.get("dask_gpuresources"), "__file__", None),
        "exitstatus": int(exitstatus),
    }
    target = os.environ.get("DASK_SUITE_PROBE_OUT")
    if target:
        with open(target, "w") as f:
            json.dump(info, f)
PY

have_timeout=$("$PYTHON" -c 'import pytest_timeout' 2>/dev/null && echo 1 || echo 0)
pytest_args=(-q -rA --color=no -p no:cacheprovider -p no:randomly
    -o addopts= -p no:asyncio -p no:legacypath --strict-markers
    -o junit_family=xunit1 -o console_output_style=classic
    --durations=10 -p _dask_suite_probe)
if [[ $have_timeout == 1 ]]; then
    pytest_args+=(--timeout="$TIMEOUT" --timeout-method=signal)
else
    echo "warning: pytest-timeout not installed: no per-test timeout" >&2
    pytest_args+=(-o timeout= -o timeout_method=)
fi
# shellcheck disable=SC2206
extra=(${DASK_SUITE_PYTEST_ARGS:-})

pkg_state() {  # commit, dirty files in the package, hash of the package's sources
    local commit status h
    commit=$(git -C "$repo" rev-parse --short=12 HEAD 2>/dev/null || echo none)
    status=$(git -C "$repo" status --short dask_gpuresources 2>/dev/null | tr '\n' ';' | tr -s ' ')
    h=$(cd "$repo" && find dask_gpuresources -name '*.py' -o -name '*.yaml' | sort | xargs cat | sha1sum | cut -c1-10)
    printf '%s\t%s\t%s' "$commit" "${status:-clean}" "$h"
}

[[ -f "$out/runs.tsv" ]] || printf 'mode\ttarget\tstart\tseconds\trc\tcommit\tpackage_status\tpackage_hash\tplugin_loaded\n' >"$out/runs.tsv"

# run_pytest MODE NAME TARGET... : one pytest process, results under $out/MODE/NAME.{xml,log}
run_pytest() {
    local mode=$1 name=$2; shift 2
    local dir=$out/$mode
    mkdir -p "$dir"
    local env_args=(env -u DASK_DISTRIBUTED__SCHEDULER__PRELOAD -u DASK_DISTRIBUTED__WORKER__PRELOAD)
    [[ $mode == *plugin ]] && env_args+=(DASK_DISTRIBUTED__SCHEDULER__PRELOAD="$PRELOAD")
    local state start t0 rc secs loaded
    state=$(pkg_state)
    start=$(date +%H:%M:%S); t0=$(date +%s)
    echo "-- [$start] $mode: $* ($(echo "$state" | cut -f1,3))"
    (cd "$work" && "${env_args[@]}" PYTHONPATH="$work/_probe${PYTHONPATH:+:$PYTHONPATH}" \
        DASK_SUITE_SRC="$src" DASK_SUITE_WORK="$work" DASK_SUITE_PROBE_OUT="$dir/$name.probe.json" \
        nice -n "$NICE" "$PYTHON" -m pytest "${pytest_args[@]}" "${extra[@]}" \
        --junitxml="$dir/$name.xml" "$@") >"$dir/$name.log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - t0 ))
    loaded=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["plugin_loaded"])' \
        "$dir/$name.probe.json" 2>/dev/null || echo "?")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$name" "$start" "$secs" "$rc" "$state" "$loaded" >>"$out/runs.tsv"
    echo "   rc=$rc ${secs}s plugin_loaded=$loaded  $(grep -E '^(=+ )?[0-9]+ (passed|failed|error)|no tests ran' "$dir/$name.log" | tail -1)"
    if [[ $mode == *plugin && $loaded != True ]] || [[ $mode == *baseline && $loaded == True ]]; then
        echo "   WARNING: preload state unexpected for $mode (plugin_loaded=$loaded)" >&2
    fi
    grep -m1 '^dask-suite: distributed ' "$dir/$name.log" | sed 's/^/   /'
    [[ $mode == *plugin ]] && "$PYTHON" -c 'import json,sys; print("   dask-suite: dask_gpuresources from", json.load(open(sys.argv[1]))["plugin_file"])' \
        "$dir/$name.probe.json" 2>/dev/null
    return 0
}

echo "== results in $out"
for t in "${tests[@]}"; do
    name=$(echo "${t#distributed/}" | tr '/:[]' '____' | sed 's/\.py$//; s/\.py_/_/')
    target=tests/${t#distributed/tests/}
    for mode in $MODES; do
        run_pytest "$mode" "$name" "$target"
    done
done

if [[ $MODES != *baseline* || $MODES != *plugin* ]]; then
    echo "== one side only (DASK_SUITE_MODES=$MODES): compare later with"
    echo "   $PYTHON $here/dask_suite_compare.py --baseline $out/baseline --plugin $out/plugin"
    exit 0
fi

echo "== comparison"
"$PYTHON" "$here/dask_suite_compare.py" --baseline "$out/baseline" --plugin "$out/plugin" \
    --write-differing "$out/differing.txt" >"$out/summary.txt"
cat "$out/summary.txt"

if [[ $RECHECK -gt 0 && -s "$out/differing.txt" ]]; then
    mapfile -t ids <"$out/differing.txt"
    echo "== recheck: ${#ids[@]} differing test(s), $RECHECK more time(s) each way"
    for i in $(seq 1 "$RECHECK"); do
        for mode in baseline plugin; do
            run_pytest "recheck-$mode" "attempt$i" "${ids[@]}"
        done
    done
    echo "== comparison with rechecks"
    "$PYTHON" "$here/dask_suite_compare.py" --baseline "$out/baseline" --plugin "$out/plugin" \
        --recheck-baseline "$out/recheck-baseline" --recheck-plugin "$out/recheck-plugin" \
        --markdown "$out/summary.md" >"$out/summary.txt"
    rc=$?
    cat "$out/summary.txt"
else
    "$PYTHON" "$here/dask_suite_compare.py" --baseline "$out/baseline" --plugin "$out/plugin" \
        --markdown "$out/summary.md" >/dev/null
    rc=$?
fi
echo "== runs (seconds per pytest process)"
column -t -s $'\t' "$out/runs.tsv" 2>/dev/null || cat "$out/runs.tsv"
echo "== results in $out (summary.txt, summary.md, runs.tsv, */*.log)"
exit "$rc"
}
