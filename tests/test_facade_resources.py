"""Requests no worker can ever satisfy raise at ``.remote()``, for every resource."""

from __future__ import annotations

import logging

import pytest
from distributed import Scheduler, SpecCluster, Worker

import dask_gpuresources as gr


def where():
    return gr.get_runtime_context().get_node_id()


@pytest.fixture
def plain_cluster():
    """Workers that declare no CPU (2 threads each); one has a custom resource."""
    workers = {
        "plain": {"cls": Worker, "options": {"nthreads": 2, "resources": {"GPU": 1}}},
        "special": {"cls": Worker, "options": {"nthreads": 2, "resources": {"special": 1}}},
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0", "port": 0}}
    with SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.WARNING) as cluster:
        gr.init(address=cluster.scheduler_address)
        try:
            yield cluster
        finally:
            gr.shutdown()


def test_num_cpus_maps_onto_threads_where_workers_declare_no_cpu(plain_cluster):
    f = gr.remote(num_cpus=1)(where)
    assert gr.get(f.remote(), timeout=30)
    assert gr.get(f.options(num_cpus=2).remote(), timeout=30)
    with pytest.raises(gr.InfeasibleRequestError, match=r"CPU=3.*has CPU=2"):
        f.options(num_cpus=3).remote()
    with pytest.raises(gr.InfeasibleRequestError, match=r"CPU=3"):
        gr.remote(num_cpus=3)(type("A", (), {})).remote()


def test_custom_resources_are_checked_like_gpus(plain_cluster):
    special = {w.address for n, w in plain_cluster.workers.items() if n == "special"}
    f = gr.remote(resources={"special": 1})(where)
    assert gr.get(f.remote(), timeout=30) in special
    with pytest.raises(gr.InfeasibleRequestError, match=r"special=2.*has special=1"):
        f.options(resources={"special": 2}).remote()
    with pytest.raises(gr.InfeasibleRequestError, match=r"undeclared.*no worker"):
        f.options(resources={"undeclared": 1}).remote()


def test_cluster_resources_report_what_is_schedulable(plain_cluster):
    assert gr.cluster_resources() == {"CPU": 4.0, "GPU": 1.0, "special": 1.0}
    assert gr.available_resources()["special"] == 1.0


def test_embedded_cluster_cpu_slots():
    gr.init(num_gpus=1, num_cpus=2, dashboard=False)
    try:
        assert gr.cluster_resources() == {"CPU": 2.0, "GPU": 1.0}
        f = gr.remote(num_cpus=2)(where)
        assert gr.get(f.remote(), timeout=30)
        with pytest.raises(gr.InfeasibleRequestError, match=r"CPU=3"):
            f.options(num_cpus=3).remote()
    finally:
        gr.shutdown()
