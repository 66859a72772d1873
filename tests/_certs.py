"""Certificates for the TLS tests: a CA and one certificate per host it signs, as PEM files.

What an operator would have (files, not Dask's in-memory ``Security.temporary()``). Needs
``cryptography`` (Dask's own TLS tests need it too); tests that call this skip without it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

import pytest


def certificates(folder: Path, hosts: dict[str, str]) -> dict:
    """``{"ca": path, name: (cert path, key path), ...}`` for ``hosts`` (name -> IP address,
    which each certificate names as a subject alternative name, with ``localhost``)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    pem = serialization.Encoding.PEM

    def name(text):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def signed(subject, key, issuer, issuer_key, *extensions):
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(path, data):
        path.write_bytes(data)
        os.chmod(path, 0o600)
        return str(path)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = signed(
        "test CA",
        ca_key,
        "test CA",
        ca_key,
        (x509.BasicConstraints(ca=True, path_length=None), True),
    )
    out: dict = {"ca": write(folder / "ca.pem", ca.public_bytes(pem))}
    for host, ip in hosts.items():
        key = ec.generate_private_key(ec.SECP256R1())
        names = [x509.DNSName(f"host-{host}"), x509.DNSName("localhost")]
        names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        cert = signed(
            f"host-{host}",
            key,
            "test CA",
            ca_key,
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.SubjectAlternativeName(names), False),
        )
        private = key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        out[host] = (
            write(folder / f"{host}.pem", cert.public_bytes(pem)),
            write(folder / f"{host}-key.pem", private),
        )
    return out
