"""What dask_gpuresources costs, and what it buys, next to plain Dask resources.

Each comparison runs plain Dask (the baseline) and the plugin (the contender) in the same
process run, alternating repetitions (baseline, plugin, baseline, plugin, ...) on fresh
in-process clusters, and reports the median of each (3 repetitions; 1 with ``--quick``).
In rows 1-2 each repetition times 3 batches on its cluster and keeps their median. The order
alternates (plain, plugin, plugin, plain, ...) so that drift over the process run favours
neither; the ratio is the median of the per-repetition ratios. Row 1 uses 12 repetitions (its
per-repetition ratios spread by several percent on a small machine, more than the 5% it has to
resolve), row 2 uses 6, rows 3-4 use 3. The process runs with the garbage-collector thresholds
that ``dask scheduler`` and ``dask worker`` set for themselves (three times Python's defaults).
Rows:

1. throughput      tiny GPU=1 tasks on one worker (GPU=4, 4 threads); tasks/s,
                   ratio = plugin/plain (higher is better).
2. scaling         the same tiny-task run on 1 and on 16 such workers; microseconds per
                   task, ratio = plugin/plain (lower is better), and how that per-task cost
                   grows from 1 to 16 workers.
3. heterogeneous   40 GPU=1 tasks of 0.5 s on workers declaring GPU=1, GPU=1 and GPU=8
                   (8 threads each); makespan / ideal (ideal = 40 / 10 devices * 0.5 s).
4. homogeneous     64 GPU=1 tasks of 0.5 s on 4 workers x GPU=4 (4 threads each);
                   makespan / ideal (ideal = 64 / 16 devices * 0.5 s).

Usage::

    python benchmarks/overhead.py [--quick] [--json PATH]

The script always exits 0; a row that misses its target is marked MISSED.
"""

from __future__ import annotations

import argparse
import collections
import gc
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _report  # benchmarks/_report.py, next to this script
import dask
import distributed.core
from distributed import Client, LocalCluster, Scheduler, SpecCluster, Worker, get_worker

import dask_gpuresources as gr
from dask_gpuresources import get_gpu_ids

SLEEP = 0.5  # seconds per task in the makespan rows
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "overhead.json"


# -- task functions (module level, so their key prefixes are stable) -------------------------


def tiny(i):
    # the same shape of result as tiny_gpu (a one-element list): Dask measures and ships
    # every result, and a list costs more than an int
    return [i]


def tiny_gpu(i):
    # get_gpu_ids by name, not gr.get_gpu_ids: cloudpickle pickles a function of this
    # script by value, and for every module it references (gr) it scans sys.modules, once
    # per pickled function, and Dask pickles the function once per task of a client.map.
    # That is about 0.2 ms per task on the reference machine, which tiny (referencing no
    # module) would not pay: it would be charged to the plugin without being the plugin's.
    return get_gpu_ids()


def warm(i):
    # Warm-up for the makespan rows: its own key prefix, so it teaches the scheduler nothing
    # about the duration of the 0.5 s tasks (identical for baseline and plugin).
    return get_worker().address


def sleepy(i):
    time.sleep(SLEEP)
    return get_worker().address, None


def sleepy_gpu(i):
    ids = get_gpu_ids()
    if len(ids) != 1:
        raise AssertionError(f"task {i} expected exactly one GPU id, got {ids!r}")
    time.sleep(SLEEP)
    return get_worker().address, ids[0]


# -- clusters ----------------------------------------------------------------------------------


def local_cluster(n_workers: int, threads: int, gpus: int) -> LocalCluster:
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads,
        processes=False,
        resources={"GPU": gpus},
        dashboard_address=None,
        silence_logs=logging.WARNING,
        # In-process workers each see the whole process's memory: with many of them, Dask's
        # share-of-the-machine limit (memory / n_workers) pauses them all. No limit.
        memory_limit=0,
    )


def spec_cluster(shape: list[tuple[int, int]]) -> SpecCluster:
    """In-process cluster whose workers each get their own (nthreads, GPU count)."""
    workers = {
        f"w{i}-gpu{gpus}": {
            "cls": Worker,
            "options": {"nthreads": threads, "resources": {"GPU": gpus}},
        }
        for i, (threads, gpus) in enumerate(shape)
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None, "dashboard": False}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.WARNING)


class Session:
    """A fresh cluster plus client, with or without the plugin installed."""

    def __init__(self, make: Callable[[], Any], n_workers: int, plugin: bool) -> None:
        self.cluster = make()
        self.client = Client(self.cluster)
        self.client.wait_for_workers(n_workers)
        if plugin:
            gr.install(self.client)
            # every worker must have the worker plugin before timing starts
            deadline = time.monotonic() + 30
            while True:
                ok = self.client.run(lambda dask_worker: "gpuresources" in dask_worker.plugins)
                if all(ok.values()) and len(ok) == n_workers:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker plugin missing on some workers: {ok}")
                time.sleep(0.05)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.client.close()
        self.cluster.close()
        # distributed caches _expects_comm(handler) without a size limit, keyed by bound
        # methods, so every closed scheduler and worker (with its logs) stays reachable and
        # each later garbage collection walks them: later repetitions would get slower. Clear
        # it, for baseline and plugin alike.
        _expects_comm = getattr(distributed.core, "_expects_comm", None)
        if hasattr(_expects_comm, "cache_clear"):
            _expects_comm.cache_clear()
        gc.collect()


# -- measurements ------------------------------------------------------------------------------


def run_tiny(n_workers: int, n_tasks: int, plugin: bool, batches: int) -> dict:
    """Time ``batches`` batches of ``n_tasks`` tiny tasks on one fresh cluster.

    The repetition's value is the median batch; every batch time is kept in the JSON.
    """
    times = []
    with Session(lambda: local_cluster(n_workers, 4, 4), n_workers, plugin) as s:
        client = s.client
        fn = tiny_gpu if plugin else tiny
        client.gather(client.map(fn, range(50), resources={"GPU": 1}, pure=False))
        for _ in range(batches):
            gc.collect()
            t0 = time.perf_counter()
            futures = client.map(fn, range(n_tasks), resources={"GPU": 1}, pure=False)
            results = client.gather(futures)
            times.append(time.perf_counter() - t0)
            del futures
            if plugin:
                bad = [r for r in results if len(r) != 1]
                if bad:
                    raise AssertionError(f"{len(bad)} tasks did not get exactly one id: {bad[:3]}")
    elapsed = statistics.median(times)
    return {
        "seconds": elapsed,
        "tasks_per_s": n_tasks / elapsed,
        "us_per_task": elapsed / n_tasks * 1e6,
        "batch_seconds": times,
    }


def run_burst(shape: list[tuple[int, int]], n_tasks: int, plugin: bool) -> dict:
    devices = sum(g for _, g in shape)
    ideal = n_tasks / devices * SLEEP
    with Session(lambda: spec_cluster(shape), len(shape), plugin) as s:
        client = s.client
        gpus_of = {
            addr: int(w["resources"].get("GPU", 0))
            for addr, w in client.scheduler_info(n_workers=-1)["workers"].items()
        }
        # Same warm-up for both: a small GPU batch of a different function.
        client.gather(client.map(warm, range(2 * devices), resources={"GPU": 1}, pure=False))
        time.sleep(0.2)
        fn = sleepy_gpu if plugin else sleepy
        wall0 = time.time()
        t0 = time.perf_counter()
        futures = client.map(fn, range(n_tasks), resources={"GPU": 1}, pure=False)
        results = client.gather(futures)
        makespan = time.perf_counter() - t0
        del futures
        # Confirmed work-stealing moves during the timed run (Dask's balance and, with the
        # plugin, its rebalancer both use this protocol), by the GPU counts of the workers.
        steals: collections.Counter = collections.Counter()
        for stamp, event in client.get_events("stealing"):
            if stamp < wall0 or not isinstance(event, (tuple, list)) or len(event) < 5:
                continue
            if event[0] == "confirm":
                victim, thief = event[3], event[4]
                steals[f"GPU={gpus_of.get(victim)}->GPU={gpus_of.get(thief)}"] += 1
    per_worker = collections.Counter(addr for addr, _ in results)
    by_gpus = {
        f"{addr} (GPU={gpus_of.get(addr)})": per_worker.get(addr, 0) for addr in sorted(gpus_of)
    }
    out = {
        "makespan_s": makespan,
        "ideal_s": ideal,
        "ratio_to_ideal": makespan / ideal,
        "tasks_per_worker": by_gpus,
        "steals": dict(steals),
    }
    if plugin:
        ids = collections.Counter((addr, dev) for addr, dev in results)
        out["tasks_per_device"] = {f"{a}#{d}": c for (a, d), c in sorted(ids.items())}
    return out


# -- bookkeeping -------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.measurements: list[dict] = []
        self.comparisons: list[dict] = []

    def measure(self, comparison: str, variant: str, rep: int, fn: Callable[[], dict]) -> dict:
        result = fn()
        row = {"comparison": comparison, "variant": variant, "rep": rep, **result}
        self.measurements.append(row)
        line = ", ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float))
        if "tasks_per_worker" in result:
            line += f"; tasks/worker {list(result['tasks_per_worker'].values())}"
            line += f"; steals {result['steals'] or '{}'}"
        print(f"  {comparison:<14} {variant:<14} rep {rep}: {line}", flush=True)
        return result

    def compare(
        self,
        name: str,
        unit: str,
        baseline: float,
        plugin: float,
        ratio: float,
        target: str | None,
        met: bool | None,
        **extra: Any,
    ) -> None:
        self.comparisons.append(
            {
                "row": name,
                "unit": unit,
                "baseline": baseline,
                "plugin": plugin,
                "ratio": ratio,
                "target": target,
                "met": met,
                **extra,
            }
        )


def alternate(
    reps: int, variants: list[tuple[str, Callable[[], dict]]], rec: Recorder, comparison: str
) -> dict[str, list[dict]]:
    """Run every variant ``reps`` times, reversing the order on every other repetition.

    ABBA order: a process that drifts (warming caches, or slowing as closed clusters leave
    threads behind) then favours neither variant.
    """
    out: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for rep in range(reps):
        for name, fn in variants if rep % 2 == 0 else variants[::-1]:
            out[name].append(rec.measure(comparison, name, rep, fn))
    return out


def paired_ratio(rows_a: list[dict], rows_b: list[dict], key: str) -> float:
    """Median over repetitions of b/a, each pair measured back to back."""
    return statistics.median(b[key] / a[key] for a, b in zip(rows_a, rows_b, strict=True))


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 repetition")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    args = parser.parse_args(argv)

    reps = 1 if args.quick else 3
    throughput_reps = 1 if args.quick else 12
    tiny_reps = 1 if args.quick else 6
    # As `dask scheduler` and `dask worker` do (distributed/cli): the clusters here run
    # in this process, so they get the collector settings of Dask's own processes.
    g0, g1, g2 = gc.get_threshold()
    gc.set_threshold(g0 * 3, g1 * 3, g2 * 3)
    # In-process workers all share one host and declare the same devices: the scheduler's
    # overlap warning is right about them, and says nothing about what is measured here.
    dask.config.set({"gpuresources.scheduler.overlap": "ignore"})
    n_tiny = 300 if args.quick else 2000
    batches = 1 if args.quick else 3  # timed batches per cluster in rows 1-2 (median kept)
    many = 16
    rec = Recorder()
    started = time.perf_counter()

    # 1. throughput ---------------------------------------------------------------------------
    print("throughput", flush=True)
    res = alternate(
        throughput_reps,
        [
            ("plain", lambda: run_tiny(1, n_tiny, False, batches)),
            ("plugin", lambda: run_tiny(1, n_tiny, True, batches)),
        ],
        rec,
        "throughput",
    )
    base, plug = median(res["plain"], "tasks_per_s"), median(res["plugin"], "tasks_per_s")
    ratio = paired_ratio(res["plain"], res["plugin"], "tasks_per_s")
    rec.compare(
        "throughput",
        "tasks/s",
        base,
        plug,
        ratio,
        ">= 0.95",
        ratio >= 0.95,
        n_tasks=n_tiny,
    )

    # 2. scaling --------------------------------------------------------------------------------
    print("scaling", flush=True)
    res = alternate(
        tiny_reps,
        [
            ("plain-1w", lambda: run_tiny(1, n_tiny, False, batches)),
            ("plugin-1w", lambda: run_tiny(1, n_tiny, True, batches)),
            (f"plain-{many}w", lambda: run_tiny(many, n_tiny, False, batches)),
            (f"plugin-{many}w", lambda: run_tiny(many, n_tiny, True, batches)),
        ],
        rec,
        "scaling",
    )
    us = {k: median(v, "us_per_task") for k, v in res.items()}
    for w in (1, many):
        b, p = us[f"plain-{w}w"], us[f"plugin-{w}w"]
        ratio = paired_ratio(res[f"plain-{w}w"], res[f"plugin-{w}w"], "us_per_task")
        rec.compare(
            f"scaling {w}w", "us/task", b, p, ratio, None, None, n_tasks=n_tiny, n_workers=w
        )
    # The target: the plugin's per-task cost does not grow with the number of workers, i.e.
    # its growth from 1 to 16 workers is plain Dask's, within 5%.
    growth_plain = us[f"plain-{many}w"] / us["plain-1w"]
    growth_plugin = us[f"plugin-{many}w"] / us["plugin-1w"]
    rec.compare(
        f"scaling 1->{many}w",
        "us/task growth",
        growth_plain,
        growth_plugin,
        growth_plugin / growth_plain,
        "<= 1.05",
        growth_plugin / growth_plain <= 1.05,
        n_tasks=n_tiny,
    )

    def burst_row(name, shape, n_tasks, target, met):
        """Plain vs plugin makespan/ideal for ``n_tasks`` sleeps on workers of ``shape``."""
        print(name, flush=True)
        res = alternate(
            reps,
            [
                ("plain", lambda: run_burst(shape, n_tasks, False)),
                ("plugin", lambda: run_burst(shape, n_tasks, True)),
            ],
            rec,
            name,
        )
        b, p = median(res["plain"], "ratio_to_ideal"), median(res["plugin"], "ratio_to_ideal")
        devices = sum(gpus for _, gpus in shape)
        rec.compare(
            name,
            "makespan/ideal",
            b,
            p,
            p / b,
            target,
            met(b, p),
            n_tasks=n_tasks,
            ideal_s=n_tasks / devices * SLEEP,
        )

    # 3. heterogeneous burst: devices 1:1:8, threads 8:8:8 ---------------------------------------
    burst_row(
        "heterogeneous", [(8, 1), (8, 1), (8, 8)], 40, "plugin <= 1.15", lambda b, p: p <= 1.15
    )
    # 4. homogeneous: "not worse", with 2% slack for timer noise ----------------------------------
    burst_row("homogeneous", [(4, 4)] * 4, 64, "plugin <= plain*1.02", lambda b, p: p <= b * 1.02)

    total = time.perf_counter() - started

    # -- report ----------------------------------------------------------------------------------
    print()
    header = f"{'row':<16} {'unit':<16} {'baseline':>10} {'plugin':>10} {'ratio':>7}  target"
    print(header)
    print("-" * (len(header) + 16))
    for c in rec.comparisons:
        mark = "" if c["met"] in (True, None) else "  MISSED"
        print(
            f"{c['row']:<16} {c['unit']:<16} {c['baseline']:>10.4g} {c['plugin']:>10.4g} "
            f"{c['ratio']:>7.3f}  {c['target'] or '(info)'}{mark}"
        )
    print(_report.footer(args.quick, total, reps=f"{reps}/{tiny_reps}/{throughput_reps}"))
    _report.write(
        args.json,
        args.quick,
        total,
        reps=reps,
        tiny_reps=tiny_reps,
        throughput_reps=throughput_reps,
        tiny_batches_per_rep=batches,
        gc_threshold=gc.get_threshold(),
        measurements=rec.measurements,
        comparisons=rec.comparisons,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
