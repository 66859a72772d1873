"""TLS on the cluster init() starts: ``init(num_gpus=..., security=...)`` with Dask's
temporary certificates and with certificate files, end to end through worker processes and
isolated children."""

from __future__ import annotations

import asyncio

import pytest
from _certs import certificates
from distributed.comm import connect
from distributed.security import Security

import dask_gpuresources as gr

pytest.importorskip("cryptography")  # Security.temporary() and the certificate files


def double(x):
    return 2 * x


def on_a_gpu(x):
    # an isolated child: its nested call reaches the scheduler over TLS too
    return gr.get(gr.remote(double).remote(x), timeout=30), gr.get_gpu_ids()


class Holder:
    def ids(self):
        return gr.get_gpu_ids()


def _run_everything(info, security):
    assert info.address.startswith("tls://")
    isolated = gr.remote(num_gpus=1)(on_a_gpu)
    threaded = gr.remote(num_gpus=1, isolation="thread")(on_a_gpu)
    actor = gr.remote(num_gpus=1)(Holder).remote()
    (a, a_ids), (b, b_ids), held = gr.get(
        [isolated.remote(1), threaded.remote(2), actor.ids.remote()], timeout=90
    )
    assert (a, b) == (2, 4)
    assert all(len(ids) == 1 and ids[0] in (0, 1) for ids in (a_ids, b_ids, held))
    # the scheduler speaks TLS only: a client without the certificates gets nowhere (Dask
    # refuses a tls:// address without an SSL context)
    with pytest.raises((OSError, TimeoutError, TypeError)):
        asyncio.run(connect(info.address, timeout=3))
    # the session's client, which connected with ``security``, sees the worker
    assert len(gr.api._client().scheduler_info()["workers"]) == 1


def test_init_with_temporary_certificates():
    security = Security.temporary()
    info = gr.init(num_gpus=2, num_cpus=4, dashboard=False, security=security)
    try:
        _run_everything(info, security)
    finally:
        gr.shutdown()


def test_init_with_certificate_files(tmp_path):
    made = certificates(tmp_path, {"local": "127.0.0.1"})
    cert, key = made["local"]
    roles = {f"tls_{role}_cert": cert for role in ("client", "scheduler", "worker")}
    roles.update({f"tls_{role}_key": key for role in ("client", "scheduler", "worker")})
    security = Security(tls_ca_file=made["ca"], require_encryption=True, **roles)
    info = gr.init(num_gpus=2, num_cpus=4, dashboard=False, security=security)
    try:
        _run_everything(info, security)
    finally:
        gr.shutdown()
