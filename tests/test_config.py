"""Configuration: the plugins keep working when ``gpuresources.*`` has been reset away."""

from __future__ import annotations

import contextlib

import dask.config
from distributed.utils_test import gen_cluster

from dask_gpuresources import _config
from dask_gpuresources.scheduler import GPUSchedulerPlugin


@contextlib.contextmanager
def gpuresources_config_removed():
    """What ``distributed.utils_test.reset_config`` does to a package imported after it:
    ``gpuresources`` vanishes from dask's config (and comes back afterwards here)."""
    saved = dask.config.config.pop("gpuresources", None)
    try:
        yield
    finally:
        if saved is not None:
            dask.config.config["gpuresources"] = saved


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, prefix + key + ".")
        else:
            yield prefix + key, value


def test_every_key_falls_back_to_the_yaml_default():
    leaves = dict(_leaves(_config.defaults()))
    assert "gpuresources.scheduler.overlap" in leaves
    with gpuresources_config_removed():
        for key, default in leaves.items():
            assert _config.get(key) == default, key
    with dask.config.set({"gpuresources.scheduler.overlap": "raise"}):
        assert _config.get("gpuresources.scheduler.overlap") == "raise"


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1, {"resources": {"GPU": 1}})])
async def test_scheduler_plugin_starts_without_gpuresources_config(c, s, a):
    with gpuresources_config_removed():
        await c.register_plugin(GPUSchedulerPlugin())
        plugin = s.plugins["gpuresources"]
        # the default, placement: true (placement wraps the scheduler's valid_workers)
        assert "valid_workers" in vars(s)
        assert plugin._rebalancer is not None  # the default, rebalance-interval: 500ms
        assert await c.submit(lambda: 1, resources={"GPU": 1}) == 1
        assert a.address in plugin.table()
