"""What process isolation costs per task, next to the thread path, in one process run.

One worker declaring 4 GPUs with 4 threads (an in-process cluster, as in ``overhead.py``)
runs a batch of tiny 1-GPU tasks that each call ``get_gpu_ids()``, three ways, on a fresh
cluster each, in alternating order (ABC, CBA, ...) over the repetitions:

1. thread      the worker's thread pool (``isolation="thread"``), the baseline;
2. isolated    warm child processes bound to each lease (``isolation="process"``);
3. max_calls=1 a fresh child process per task (``max_calls=1``): Ray's default for GPU
               functions, with the replacement started as soon as a child is retired.

Reported: wall time per task, the overhead over the thread path per task, and ratios. The
target: isolated children add at most 2 ms per task over the thread path. For max_calls=1
the reference is Ray's fresh process per call, about 400 ms per call on this machine class
(the anchor measured when the target was set; Ray is not installed here).

Also reported: the resident memory (RSS) of an idle warm child (target at most 60 MB) and
the time the first isolated task on a device set waits for its child to start (cold start).

Usage::

    python benchmarks/isolation.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import time
from pathlib import Path

import _report  # benchmarks/_report.py, next to this script
import dask
import psutil
from distributed import Client, LocalCluster

import dask_gpuresources as gr

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "isolation.json"
TARGET_OVERHEAD_MS = 2.0
TARGET_IDLE_RSS_MB = 60.0
RAY_FRESH_PROCESS_MS = 400.0  # anchor from the issue, see the module docstring


def tiny(i):
    return gr.get_gpu_ids()


VARIANTS = {
    "thread": {"isolation": "thread"},
    "isolated": {"isolation": "process"},
    "max_calls=1": {"isolation": "process", "max_calls": 1},
}


def run_variant(name: str, n_tasks: int) -> dict:
    annotations = VARIANTS[name]
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=4,
            processes=False,
            resources={"GPU": 4},
            dashboard_address=None,
            silence_logs=logging.WARNING,
        ) as cluster,
        Client(cluster) as client,
    ):
        gr.install(client)
        client.wait_for_workers(1)
        while not all(
            client.run(lambda dask_worker: "gpuresources" in dask_worker.plugins).values()
        ):
            time.sleep(0.05)
        cold = None
        with dask.annotate(**annotations):
            # warm-up: one task per device (for isolated: starts the four children)
            t0 = time.perf_counter()
            client.gather(client.map(tiny, range(4), resources={"GPU": 1}, pure=False))
            cold = time.perf_counter() - t0
            time.sleep(0.5)  # spares (max_calls=1) are ready
            gc.collect()
            t0 = time.perf_counter()
            results = client.gather(
                client.map(tiny, range(n_tasks), resources={"GPU": 1}, pure=False)
            )
            elapsed = time.perf_counter() - t0
        bad = [r for r in results if len(r) != 1]
        if bad:
            raise AssertionError(f"{len(bad)} tasks did not get exactly one id")
        out = {
            "seconds": elapsed,
            "ms_per_task": elapsed / n_tasks * 1e3,
            "warmup_4_tasks_s": cold,
        }
        if name != "thread":
            (worker,) = cluster.workers.values()
            executor = worker.executors["gpuresources"]
            out["children_started"] = executor.started
            idle = [c["pid"] for c in executor.children() if c["state"] == "idle"]
            rss = [psutil.Process(pid).memory_info().rss / 2**20 for pid in idle]
            out["idle_children"] = len(idle)
            out["idle_child_rss_mb"] = max(rss) if rss else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 tasks, 1 repetition")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    n_tasks = 200 if args.quick else 1000
    reps = 1 if args.quick else 3
    names = list(VARIANTS)
    started = time.perf_counter()

    rows: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            result = run_variant(name, n_tasks)
            rows[name].append(result)
            extra = (
                f", idle child RSS {result['idle_child_rss_mb']:.1f} MB"
                if result.get("idle_child_rss_mb")
                else ""
            )
            print(
                f"  rep {rep} {name:<12} {result['ms_per_task']:8.3f} ms/task "
                f"(warm-up of 4 tasks {result['warmup_4_tasks_s']:.3f} s{extra})",
                flush=True,
            )

    ms = {n: statistics.median(r["ms_per_task"] for r in rows[n]) for n in names}
    # overhead per task, paired by repetition (each repetition ran all three back to back)
    over = {
        n: statistics.median(
            b["ms_per_task"] - t["ms_per_task"]
            for t, b in zip(rows["thread"], rows[n], strict=True)
        )
        for n in names[1:]
    }
    rss = [r["idle_child_rss_mb"] for r in rows["isolated"] if r.get("idle_child_rss_mb")]
    cold = statistics.median(r["warmup_4_tasks_s"] for r in rows["isolated"])
    comparisons = [
        {
            "row": "isolated vs thread",
            "baseline_ms_per_task": ms["thread"],
            "ms_per_task": ms["isolated"],
            "ratio": ms["isolated"] / ms["thread"],
            "overhead_ms_per_task": over["isolated"],
            "target": f"overhead <= {TARGET_OVERHEAD_MS} ms/task",
            "met": over["isolated"] <= TARGET_OVERHEAD_MS,
        },
        {
            "row": "max_calls=1 vs thread",
            "baseline_ms_per_task": ms["thread"],
            "ms_per_task": ms["max_calls=1"],
            "ratio": ms["max_calls=1"] / ms["thread"],
            "overhead_ms_per_task": over["max_calls=1"],
            "target": None,
            "met": None,
        },
        {
            "row": "max_calls=1 vs Ray fresh process (anchor)",
            "baseline_ms_per_task": RAY_FRESH_PROCESS_MS,
            "ms_per_task": ms["max_calls=1"],
            "ratio": ms["max_calls=1"] / RAY_FRESH_PROCESS_MS,
            "overhead_ms_per_task": None,
            "target": "not slower than Ray (ratio <= 1)",
            "met": ms["max_calls=1"] <= RAY_FRESH_PROCESS_MS,
        },
        {
            "row": "idle child RSS",
            "baseline_ms_per_task": None,
            "ms_per_task": None,
            "ratio": None,
            "rss_mb": max(rss) if rss else None,
            "target": f"<= {TARGET_IDLE_RSS_MB} MB",
            "met": bool(rss) and max(rss) <= TARGET_IDLE_RSS_MB,
        },
    ]
    total = time.perf_counter() - started

    print()
    print(f"{'variant':<14} {'ms/task':>9} {'over thread':>12} {'ratio':>7}")
    print("-" * 46)
    for n in names:
        o = f"{over[n]:+.3f}" if n in over else ""
        print(f"{n:<14} {ms[n]:>9.3f} {o:>12} {ms[n] / ms['thread']:>7.2f}")
    print()
    for c in comparisons:
        mark = "" if c["met"] in (True, None) else "  MISSED"
        value = (
            f"{c['rss_mb']:.1f} MB"
            if "rss_mb" in c and c["rss_mb"] is not None
            else f"ratio {c['ratio']:.3f}"
            if c["ratio"] is not None
            else "n/a"
        )
        if c.get("overhead_ms_per_task") is not None:
            value += f", overhead {c['overhead_ms_per_task']:+.3f} ms/task"
        print(f"{c['row']:<44} {value:<40} {c['target'] or '(info)'}{mark}")
    print(f"cold start of 4 isolated children (first 4 tasks): {cold:.3f} s")
    print(_report.footer(args.quick, total, tasks=n_tasks, reps=reps))
    _report.write(
        args.json,
        args.quick,
        total,
        n_tasks=n_tasks,
        reps=reps,
        measurements=rows,
        comparisons=comparisons,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
