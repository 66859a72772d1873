#!/usr/bin/env bash
# Build a wheelhouse: every wheel a machine with no package registry needs to install
# dask_gpuresources offline, on top of what its image already holds.
#
#   bash scripts/make-wheelhouse.sh [OUT]          # OUT defaults to wheelhouse/ (git-ignored)
#   PYVER=3.11 bash scripts/make-wheelhouse.sh /tmp/wheelhouse311
#
# Run it where PyPI can be reached; carry OUT to the other machine and install there with
#   python3 -m pip install --no-index --find-links OUT dask_gpuresources
# (scripts/gpu-check.sh does that by itself when it finds wheelhouse/).
#
# The target image (the GPU machines' CUDA image: Python 3.12, x86_64, manylinux) already
# holds PyTorch, CuPy, JAX, NumPy, pytest, pytest-timeout, hypothesis and, of our
# dependencies and theirs: click, cloudpickle, contourpy, fsspec, jinja2, msgpack, narwhals,
# numpy, nvidia-ml-py, packaging, pillow, prometheus-client, psutil, pyyaml,
# sortedcontainers, toolz, zipp. It lacks dask and distributed and these, which the
# wheelhouse therefore carries:
#   distributed: tblib, tornado, zict, locket        dask: partd (-> locket)
#   dask_gpuresources: tblib, bokeh                  bokeh: tornado, xyzservices
#   and on Python < 3.12 only, dask: importlib_metadata (-> zipp, on the image)
# Versions are the ones installed where this runs (the versions the test suite ran
# against) when the package is installed here, otherwise pip's newest.
#
# Knobs (environment): PYVER (default 3.12), PLATFORMS (default manylinux 2_17..2_28 and
# manylinux2014, x86_64), PYTHON (the interpreter that runs pip here, default python3).
# Exit status: 0 built, 1 a download or the build failed.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-wheelhouse}
PYVER=${PYVER:-3.12}
PYTHON=${PYTHON:-python3}
PLATFORMS=${PLATFORMS:-"manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64"}

missing=(dask distributed tblib tornado zict locket partd bokeh xyzservices)
if [ "$("$PYTHON" -c "print(tuple(map(int, '$PYVER'.split('.'))) < (3, 12))")" = True ]; then
    missing+=(importlib_metadata)
fi

# Pin each to the version installed here, when it is.
specs=()
for name in "${missing[@]}"; do
    version=$("$PYTHON" -c "
import importlib.metadata as m
try:
    print(m.version('$name'))
except m.PackageNotFoundError:
    pass
")
    specs+=("${name}${version:+==$version}")
done

platform_args=()
for p in $PLATFORMS; do platform_args+=(--platform "$p"); done

mkdir -p "$OUT"
rm -f "$OUT"/*.whl
echo "== downloading for CPython $PYVER ($PLATFORMS): ${specs[*]}"
"$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps \
    --python-version "$PYVER" --implementation cp "${platform_args[@]}" -d "$OUT" "${specs[@]}"

echo "== building dask_gpuresources"
"$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$OUT" .

echo "== $OUT"
ls -1 "$OUT"
du -sh "$OUT" | awk '{print "wheelhouse size: " $1}'
