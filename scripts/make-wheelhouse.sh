#!/usr/bin/env bash
# Build a wheelhouse: every wheel a machine with no package registry needs to install
# dask_gpuresources offline, on top of what its image already holds.
#
#   bash scripts/make-wheelhouse.sh [OUT]   # OUT: the checkout's wheelhouse/ (git-ignored) unless
#                                           # named; the wheels already in it are removed first
#   PYVER=3.11 bash scripts/make-wheelhouse.sh /tmp/wheelhouse311
#
# Run it where PyPI can be reached; carry OUT to the other machine and install there with
#   python3 -m pip install --no-index --find-links OUT dask_gpuresources
# (scripts/gpu-check.sh does that by itself when it finds wheelhouse/).
#
# The target image (the GPU check machines' image: Python 3.12, x86_64, manylinux) already
# holds the packages listed in scripts/gpu-image-packages.txt: PyTorch, CuPy, JAX, NumPy,
# pytest, pytest-timeout, hypothesis and, of our dependencies and theirs, click, cloudpickle,
# contourpy, fsspec, jinja2, msgpack, narwhals, nvidia-ml-py, packaging, pillow,
# prometheus-client, psutil, pyyaml, sortedcontainers, toolz, zipp. It lacks dask and
# distributed and these, which the wheelhouse therefore carries:
#   distributed: tblib, tornado, zict, locket        dask: partd (-> locket)
#   dask_gpuresources: tblib, bokeh                  bokeh: tornado, xyzservices
#   and on Python < 3.12 only, dask: importlib_metadata (-> lazy-importer)
# Versions are the ones installed where this runs (the versions the test suite ran
# against) when the package is installed here, otherwise pip's newest. After downloading,
# the script reads every wheel's requirements (markers evaluated for the target) and fetches
# any that neither a wheel here nor the image list meets, so a new release's new
# requirement is carried too; it fails if some stay unmet.
#
# Knobs (environment): PYVER (default 3.12), PLATFORMS (default manylinux 2_17..2_28 and
# manylinux2014, x86_64), PYTHON (the interpreter that runs pip here, default python3).
# Exit status: 0 built, 1 a download or the build failed.
set -euo pipefail
OUT=$(realpath -m "${1:-$(dirname "$0")/../wheelhouse}")  # relative to where it is called
cd "$(dirname "$0")/.."

PYVER=${PYVER:-3.12}
PYTHON=${PYTHON:-python3}
PLATFORMS=${PLATFORMS:-"manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64"}

carried=(dask distributed tblib tornado zict locket partd bokeh xyzservices)
if [ "$("$PYTHON" -c "print(tuple(map(int, '$PYVER'.split('.'))) < (3, 12))")" = True ]; then
    carried+=(importlib_metadata)
fi

# Pin each to the version installed here, when it is.
specs=()
for name in "${carried[@]}"; do
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

# Every requirement of every wheel here (markers evaluated for the target) must be met by a
# wheel here or a package of the image (scripts/gpu-image-packages.txt); fetch what is not
# (a new release can add a requirement), until nothing is missing.
unmet() {
    "$PYTHON" - "$OUT" "$PYVER" scripts/gpu-image-packages.txt <<'PY'
import re
import sys
import zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement

out, pyver, image_list = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


image = {norm(line) for line in image_list.read_text().split() if not line.startswith("#")}
env = {
    "python_version": pyver,
    "python_full_version": pyver + ".0",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}
wheels = {}
for wheel in out.glob("*.whl"):
    with zipfile.ZipFile(wheel) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        text = zf.read(meta).decode()
    name = re.search(r"^Name: (.+)$", text, re.M).group(1).strip()
    wheels[norm(name)] = re.findall(r"^Requires-Dist: (.+)$", text, re.M)
for name, requires in sorted(wheels.items()):
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        if norm(req.name) not in wheels and norm(req.name) not in image:
            print(f"{req.name}{req.specifier}  (needed by {name})")
PY
}
for round in 1 2 3 4 5; do
    missing=$(unmet)
    [ -z "$missing" ] && break
    echo "== round $round: fetching requirements met neither here nor on the image:"
    echo "$missing" | sed 's/^/  /'
    mapfile -t more < <(echo "$missing" | sed 's/  (needed by.*//' | sort -u)
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
        --no-deps --python-version "$PYVER" --implementation cp "${platform_args[@]}" \
        -d "$OUT" "${more[@]}"
done
missing=$(unmet)
if [ -n "$missing" ]; then
    echo "still unmet:"; echo "$missing" | sed 's/^/  /'; exit 1
fi
echo "requirements: all met by $OUT or the image (scripts/gpu-image-packages.txt)"

echo "== $OUT"
ls -1 "$OUT"
du -sh "$OUT" | awk '{print "wheelhouse size: " $1}'
