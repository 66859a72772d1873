"""The facade next to Ray, each row against its Ray twin, in one invocation.

Each engine runs in a fresh Python process of its own (Ray and Dask never share one), one
after the other, three times each in alternating order (the median of each figure is kept),
on this machine, with 4 declared GPUs:

1. init         ``init(num_gpus=4)`` (dashboard on) to the first result of a 1-GPU call.
2. calls        tiny 1-GPU remote calls, submitted together and gathered: the facade's
                default (process isolation, warm children), the facade with thread
                isolation, Ray with worker reuse, and Ray's default for GPU functions
                (a fresh process per call, ``max_calls=1``; fewer calls, it is slow).
3. actors       creating 4 one-GPU actors (to their first reply), then 2,000 sequential
                method calls on one of them: median and 99th percentile latency. Ray's
                actors get ``num_cpus=0``: by default each holds a CPU, and on a 2-core
                machine only 2 of the 4 would ever start.

Ray is an optional extra (``pip install -e ".[ray]"``); without it the Ray rows print
"skipped: ray not installed" and the facade's rows are compared with the anchors measured
when the targets were set.

Usage::

    python benchmarks/ray_compare.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _report  # benchmarks/_report.py, next to this script

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "ray_compare.json"

# Ray 2.60 on this 2-core machine class, measured when the targets were set.
ANCHORS = {
    "init_s": 4.6,
    "call_ms_default": 400.0,
    "call_ms_reuse": 1.2,
    "actors_create_s": 1.4,
    "actor_call_median_ms": 1.25,
    "actor_call_p99_ms": 5.0,
}


# -- one engine, in its own process -----------------------------------------------------------


def _calls(ray, fn, n):
    t0 = time.perf_counter()
    results = ray.get([fn.remote() for _ in range(n)], timeout=600)
    elapsed = time.perf_counter() - t0
    if any(len(r) != 1 for r in results):
        raise AssertionError("a call did not get exactly one GPU id")
    return elapsed / n * 1e3


def _engine(name: str, n_calls: int, n_default: int, n_actor_calls: int) -> dict:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if name == "ray":
        import ray

        init = lambda: ray.init(num_gpus=4, log_to_driver=False)  # noqa: E731
    else:
        import dask_gpuresources as ray

        init = lambda: ray.init(num_gpus=4, dashboard=True)  # noqa: E731

    def gpu_ids():
        return ray.get_gpu_ids()

    out: dict = {}
    t0 = time.perf_counter()
    init()
    first = ray.remote(num_gpus=1)(gpu_ids)
    ray.get(first.remote())
    out["init_s"] = time.perf_counter() - t0

    if name == "ray":
        reuse = ray.remote(num_gpus=1, max_calls=0)(gpu_ids)
        fresh = ray.remote(num_gpus=1)(gpu_ids)  # Ray's default for GPU functions
        _calls(ray, reuse, 100)
        out["call_ms_reuse"] = _calls(ray, reuse, n_calls)
        out["call_ms_default"] = _calls(ray, fresh, n_default)
    else:
        default = ray.remote(num_gpus=1)(gpu_ids)
        threads = ray.remote(num_gpus=1, isolation="thread")(gpu_ids)
        _calls(ray, default, 100)
        out["call_ms_default"] = _calls(ray, default, n_calls)
        _calls(ray, threads, 100)
        out["call_ms_thread"] = _calls(ray, threads, n_calls)

    class Model:
        def __init__(self):
            self.ids = ray.get_gpu_ids()

        def step(self, i):
            return i

    # Ray places an actor with 1 CPU unless told otherwise, so on a 2-core machine only 2 of
    # 4 GPU actors would ever start: num_cpus=0 for Ray (the facade holds no CPU for actors).
    actor_cls = ray.remote(num_gpus=1, **({"num_cpus": 0} if name == "ray" else {}))(Model)
    t0 = time.perf_counter()
    actors = [actor_cls.remote() for _ in range(4)]
    ray.get([a.step.remote(0) for a in actors], timeout=120)
    out["actors_create_s"] = time.perf_counter() - t0
    actor = actors[0]
    for i in range(50):
        ray.get(actor.step.remote(i))
    lat = []
    for i in range(n_actor_calls):
        t = time.perf_counter()
        ray.get(actor.step.remote(i))
        lat.append((time.perf_counter() - t) * 1e3)
    lat.sort()
    out["actor_call_median_ms"] = statistics.median(lat)
    out["actor_call_p99_ms"] = lat[int(0.99 * (len(lat) - 1))]
    ray.shutdown()
    return out


def _median(results: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in results) for k in results[0]}


def _run_engine(name: str, args: argparse.Namespace) -> dict | None:
    if name == "ray" and importlib.util.find_spec("ray") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, __file__, "--engine", name, "--engine-out", str(out)]
        if args.quick:
            cmd.append("--quick")
        subprocess.run(cmd, check=True, timeout=1800, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


# -- the comparison --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--engine", choices=["dask", "ray"], help=argparse.SUPPRESS)
    parser.add_argument("--engine-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    n_calls, n_default, n_actor = (300, 8, 300) if args.quick else (2000, 20, 2000)
    reps = 1 if args.quick else 3

    if args.engine:
        result = _engine(args.engine, n_calls, n_default, n_actor)
        args.engine_out.write_text(json.dumps(result))
        return 0

    started = time.perf_counter()
    # Alternate the engines (dask, ray, ray, dask, ...) and keep each figure's median, so
    # that neither gets the quieter moments of a noisy machine.
    runs: dict[str, list[dict]] = {"dask": [], "ray": []}
    for rep in range(reps):
        for engine in ("dask", "ray") if rep % 2 == 0 else ("ray", "dask"):
            result = _run_engine(engine, args)
            if result is not None:
                runs[engine].append(result)
    ours = _median(runs["dask"])
    theirs = _median(runs["ray"]) if runs["ray"] else None
    ray_note = "measured" if theirs is not None else "skipped: ray not installed (anchors used)"
    ref = theirs if theirs is not None else ANCHORS

    rows = []

    def row(name, value, twin_key, target, met, unit):
        twin = ref[twin_key]
        rows.append(
            {
                "row": name,
                "unit": unit,
                "facade": value,
                "ray": twin,
                "ray_source": "measured" if theirs is not None else "anchor",
                "ratio": value / twin,
                "target": target,
                "met": met(value, twin),
            }
        )

    row(
        "init to first result",
        ours["init_s"],
        "init_s",
        "<= 0.5 x Ray",
        lambda v, r: v <= r / 2,
        "s",
    )
    row(
        "1-GPU call, default (isolated, warm)",
        ours["call_ms_default"],
        "call_ms_default",
        "<= 3 ms and Ray's default / 100",
        lambda v, r: v <= 3.0 and v * 100 <= r,
        "ms/call",
    )
    row(
        "1-GPU call, thread isolation vs Ray reuse",
        ours["call_ms_thread"],
        "call_ms_reuse",
        "<= Ray with reuse",
        lambda v, r: v <= r,
        "ms/call",
    )
    row(
        "create 4 GPU actors",
        ours["actors_create_s"],
        "actors_create_s",
        None,
        lambda v, r: None,
        "s",
    )
    row(
        "actor call, median",
        ours["actor_call_median_ms"],
        "actor_call_median_ms",
        "<= Ray",
        lambda v, r: v <= r,
        "ms",
    )
    row(
        "actor call, p99",
        ours["actor_call_p99_ms"],
        "actor_call_p99_ms",
        "<= Ray",
        lambda v, r: v <= r,
        "ms",
    )
    total = time.perf_counter() - started

    print(f"Ray: {ray_note}")
    print(f"{'row':<44} {'unit':<8} {'facade':>9} {'ray':>9} {'ratio':>7}  target")
    print("-" * 100)
    for r in rows:
        mark = "" if r["met"] in (True, None) else "  MISSED"
        print(
            f"{r['row']:<44} {r['unit']:<8} {r['facade']:>9.3f} {r['ray']:>9.3f} "
            f"{r['ratio']:>7.3f}  {r['target'] or '(info)'}{mark}"
        )
    if theirs is not None:
        print(f"Ray with worker reuse: {theirs['call_ms_reuse']:.3f} ms/call")
    print(
        _report.footer(
            args.quick,
            total,
            reps=reps,
            calls=n_calls,
            ray_default_calls=n_default,
            actor_calls=n_actor,
        )
    )
    _report.write(
        args.json,
        args.quick,
        total,
        ray=ray_note,
        reps=reps,
        facade=ours,
        ray_median=theirs,
        facade_runs=runs["dask"],
        ray_runs=runs["ray"],
        anchors=ANCHORS,
        rows=rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
