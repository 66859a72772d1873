"""A worker with fewer threads than GPUs says so once, naming the flag that fixes it."""

from __future__ import annotations

import logging

from distributed.utils_test import captured_logger, gen_cluster

import dask_gpuresources as gr


@gen_cluster(client=True, nthreads=[])
async def test_fewer_threads_than_gpus_warns_naming_nthreads(c, s):
    from distributed import Worker

    with captured_logger("distributed.gpuresources", level=logging.WARNING) as log:
        await gr.install(c)
        async with Worker(s.address, nthreads=2, resources={"GPU": 4}) as w:
            await c.wait_for_workers(1)
            await gr.install(c)  # registering again does not warn again
            text = log.getvalue()
    assert text.count("declares 4 GPUs but has 2 thread(s)") == 1, text
    assert "--nthreads 4" in text
    assert w.address in text


@gen_cluster(client=True, nthreads=[])
async def test_enough_threads_do_not_warn(c, s):
    from distributed import Worker

    with captured_logger("distributed.gpuresources", level=logging.WARNING) as log:
        await gr.install(c)
        async with Worker(s.address, nthreads=4, resources={"GPU": 4}):
            await c.wait_for_workers(1)
        async with Worker(s.address, nthreads=1, resources={"A": 1}):
            await c.wait_for_workers(1)
    assert "thread(s)" not in log.getvalue()
