"""TLS on the cluster init() starts: ``init(num_gpus=..., security=...)`` with Dask's
temporary certificates and with certificate files, end to end through worker processes and
isolated children."""

from __future__ import annotations

import datetime

import pytest
from distributed import Client
from distributed.security import Security

import dask_gpuresources as gr

x509 = pytest.importorskip("cryptography.x509")


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
        Client(info.address, timeout=3).close()
    with Client(info.address, security=security, timeout=30) as client:
        assert len(client.scheduler_info()["workers"]) == 1


def test_init_with_temporary_certificates():
    security = Security.temporary()
    info = gr.init(num_gpus=2, num_cpus=4, dashboard=False, security=security)
    try:
        _run_everything(info, security)
    finally:
        gr.shutdown()


def _certificate_files(folder):
    """A CA and one certificate it signs, as PEM files (what an operator would have)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(text):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def build(subject, key, issuer, issuer_key, ca):
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(issuer_key, hashes.SHA256())
        )

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = build("test CA", ca_key, "test CA", ca_key, True)
    cert = build("dask", key, "test CA", ca_key, False)
    files = {
        "ca": ca.public_bytes(serialization.Encoding.PEM),
        "cert": cert.public_bytes(serialization.Encoding.PEM),
        "key": key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    }
    paths = {}
    for what, data in files.items():
        path = folder / f"{what}.pem"
        path.write_bytes(data)
        path.chmod(0o600)
        paths[what] = str(path)
    return paths


def test_init_with_certificate_files(tmp_path):
    files = _certificate_files(tmp_path)
    roles = {
        f"tls_{role}_{part}": files[part]
        for role in ("client", "scheduler", "worker")
        for part in ("cert", "key")
    }
    security = Security(tls_ca_file=files["ca"], require_encryption=True, **roles)
    info = gr.init(num_gpus=2, num_cpus=4, dashboard=False, security=security)
    try:
        _run_everything(info, security)
    finally:
        gr.shutdown()
