"""What the plugin costs a real GPU workload: bf16 matrix products, through Dask and directly.

N tasks each run K products of two SIZE x SIZE bfloat16 matrices with PyTorch on one GPU
(defaults: 16 tasks x 200 products of 8192 x 8192, 2 * 8192**3 floating-point operations
each). Three variants, in one process run:

1. direct    the N tasks' work called one after another in this process, no Dask;
2. thread    N ``GPU=1`` tasks through the plugin in the worker's thread pool
             (``isolation="thread"``; one worker in this process declaring ``GPU=1``);
3. process   the same tasks isolated in a warm child process whose ``CUDA_VISIBLE_DEVICES``
             is the lease (``isolation="process"``).

Each task makes its own matrices, multiplies them K times and synchronises; a variant's time
is the wall time from the first submission to the last result (for ``direct``, of the loop).
Every variant is warmed up first (CUDA context, cuBLAS, the child process). Repetitions
alternate the order (direct, thread, process, process, thread, direct, ...) so that drift
(clocks, heat) favours none; reported are the median seconds, TFLOP/s, and the ratio to
``direct`` (the median of the per-repetition ratios). Target: both plugin variants within 2%
of direct (ratio <= 1.02).

Usage::

    python benchmarks/gpu_matmul.py [--quick] [--tasks N] [--products K] [--size SIZE]
                                    [--reps R] [--json PATH]
    python benchmarks/gpu_matmul.py --cpu      # the script's own check, without a GPU

``--cpu`` runs the same code paths with NumPy float32 products of 256 x 256 matrices on the
CPU: a check that the script works, not a measurement. Exit status: 0 when it ran (a row
that misses its target is marked MISSED), 2 when PyTorch or a CUDA GPU is missing (nothing
measured).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import statistics
import sys
import time
from pathlib import Path

import _report  # benchmarks/_report.py, next to this script
import dask
from distributed import Client, LocalCluster

import dask_gpuresources as gr

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "gpu_matmul.json"
TARGET = 1.02
VARIANTS = ("direct", "thread", "process")


# -- the work (defined in __main__, so Dask ships it to the isolated child by value) -------------


def products(size: int, k: int, backend: str) -> float:
    """Make two ``size`` x ``size`` matrices, multiply them ``k`` times; seconds of products.

    The device is CUDA's device 0 of the calling process: in this process and in a worker
    thread that is the worker's one declared GPU, and in an isolated child it is the lease.
    """
    if backend == "numpy":
        import numpy as np

        rng = np.random.default_rng(0)
        a = rng.standard_normal((size, size), dtype=np.float32)
        b = rng.standard_normal((size, size), dtype=np.float32)
        c = np.empty_like(a)
        start = time.perf_counter()
        for _ in range(k):
            np.matmul(a, b, out=c)
        return time.perf_counter() - start
    import torch

    device = torch.device("cuda", 0)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device, generator=generator)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device, generator=generator)
    c = torch.empty_like(a)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(k):
        torch.matmul(a, b, out=c)
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run_direct(n: int, size: int, k: int, backend: str) -> float:
    start = time.perf_counter()
    for _ in range(n):
        products(size, k, backend)
    return time.perf_counter() - start


def run_tasks(client: Client, isolation: str, n: int, size: int, k: int, backend: str) -> float:
    start = time.perf_counter()
    with dask.annotate(isolation=isolation):
        futures = [
            client.submit(products, size, k, backend, resources={"GPU": 1}, pure=False)
            for _ in range(n)
        ]
    client.gather(futures)
    return time.perf_counter() - start


# -- the run -------------------------------------------------------------------------------------


def gpu_missing() -> str | None:
    """Why no GPU measurement can run here, or None."""
    if importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed here"
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA GPU here (torch {torch.__version__}: torch.cuda.is_available() is False)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 tasks x 50 products, 1 rep")
    parser.add_argument("--tasks", type=int, help="tasks per variant (default 16)")
    parser.add_argument("--products", type=int, help="products per task (default 200)")
    parser.add_argument("--size", type=int, help="matrix size (default 8192)")
    parser.add_argument("--reps", type=int, help="repetitions (default 3)")
    parser.add_argument("--cpu", action="store_true", help="check the script on the CPU")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write JSON")
    args = parser.parse_args(argv)

    backend = "numpy" if args.cpu else "torch"
    if backend == "torch":
        why = gpu_missing()
        if why is not None:
            print(f"gpu_matmul: {why}; nothing measured")
            return 2
    n = args.tasks or (8 if args.quick or args.cpu else 16)
    k = args.products or (50 if args.quick or args.cpu else 200)
    size = args.size or (256 if args.cpu else 8192)
    reps = args.reps or (1 if args.quick or args.cpu else 3)
    flop = 2 * size**3 * n * k

    if backend == "torch":
        import torch

        device = {
            "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        }
    else:
        device = {"device": "cpu (numpy float32: a check of the script, not a measurement)"}
    print(f"{device['device']}: {n} tasks x {k} products of {size} x {size}, {reps} reps")

    logging.getLogger("distributed").setLevel(logging.WARNING)
    started = time.perf_counter()
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,
            resources={"GPU": 1},
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        gr.install(client)
        runners = {
            "direct": lambda: run_direct(n, size, k, backend),
            "thread": lambda: run_tasks(client, "thread", n, size, k, backend),
            "process": lambda: run_tasks(client, "process", n, size, k, backend),
        }
        for variant in VARIANTS:  # warm-up: contexts, libraries, the child process
            if variant == "direct":
                products(size, min(k, 3), backend)
            else:
                with dask.annotate(isolation=variant):
                    client.submit(products, size, min(k, 3), backend, resources={"GPU": 1}).result()
        for rep in range(reps):
            order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                seconds[variant].append(runners[variant]())
                print(f"  rep {rep + 1} {variant:<8} {seconds[variant][-1]:8.3f} s", flush=True)
    total = time.perf_counter() - started

    rows = []
    for variant in VARIANTS:
        ratios = [s / d for s, d in zip(seconds[variant], seconds["direct"], strict=True)]
        median = statistics.median(seconds[variant])
        ratio = statistics.median(ratios)
        met = None if variant == "direct" else ratio <= TARGET
        rows.append(
            {
                "variant": variant,
                "seconds": median,
                "tflops": flop / median / 1e12,
                "ratio_to_direct": ratio,
                "target": None if variant == "direct" else f"<= {TARGET}",
                "met": met,
                "runs": seconds[variant],
            }
        )

    print()
    header = f"{'variant':<10} {'seconds':>9} {'TFLOP/s':>9} {'ratio':>7}  target"
    print(header)
    print("-" * (len(header) + 12))
    for r in rows:
        mark = "" if r["met"] in (True, None) else "  MISSED"
        print(
            f"{r['variant']:<10} {r['seconds']:>9.3f} {r['tflops']:>9.1f} "
            f"{r['ratio_to_direct']:>7.3f}  {r['target'] or '(baseline)'}{mark}"
        )
    print(_report.footer(args.quick, total, tasks=n, products=k, size=size, reps=reps))
    _report.write(
        args.json,
        args.quick,
        total,
        backend=backend,
        **device,
        tasks=n,
        products_per_task=k,
        size=size,
        reps=reps,
        flop_per_variant=flop,
        rows=rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
