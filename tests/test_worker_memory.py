"""Isolated children's host memory is the worker's memory, as Dask measures and shows it."""

from __future__ import annotations

import logging
import time

import psutil
from distributed import LocalCluster

import dask_gpuresources as gr

TIMEOUT = 30
BIG = 200 * 2**20


@gr.remote(num_gpus=1)  # isolated: its own child process
class Ballast:
    def __init__(self):
        self.block = bytearray(BIG)
        self.block[::4096] = b"x" * len(self.block[::4096])  # touch every page

    def pid(self):
        import os

        return os.getpid()


def _poll(condition):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_isolated_childrens_memory_counts_as_the_workers():
    with LocalCluster(
        n_workers=1,
        processes=False,
        threads_per_worker=1,
        resources={"GPU": 1},
        dashboard_address=":0",
        silence_logs=logging.WARNING,
    ) as cluster:
        gr.init(address=cluster.scheduler_address)
        try:
            actor = Ballast.remote()
            child = gr.get(actor.pid.remote(), timeout=TIMEOUT)
            (ws,) = cluster.scheduler.workers.values()

            def published():
                return ws.metrics.get("gpuresources", {}).get("children", [])

            # the heartbeat names the child with its memory
            assert _poll(lambda: any(r["pid"] == child and r["rss"] >= BIG for r in published()))
            # and Dask's own measure of the worker (this process, in-process worker) has it
            own = psutil.Process().memory_info().rss
            assert _poll(lambda: ws.memory.process >= own + BIG * 0.9), (ws.memory, own)
            gr.kill(actor)
            assert _poll(lambda: not published())
            assert _poll(lambda: ws.memory.process < psutil.Process().memory_info().rss + BIG / 2)
        finally:
            gr.shutdown()
