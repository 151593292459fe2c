"""Identity bundles: one PEM file with a data owner's private key, certificate and the CA (made by `cloud certs issue`)."""

from __future__ import annotations


def read_bundle(path: str) -> tuple[bytes, bytes, bytes]:
    """(private key, certificate, CA certificate) PEM blocks of an identity bundle."""
    with open(path, "rb") as f:
        data = f.read()
    blocks = [b"-----BEGIN" + part for part in data.split(b"-----BEGIN")[1:]]
    keys = [b for b in blocks if b"PRIVATE KEY" in b.split(b"\n", 1)[0]]
    certs = [b for b in blocks if b"CERTIFICATE" in b.split(b"\n", 1)[0]]
    if len(keys) != 1 or len(certs) != 2:
        raise ValueError(f"{path} is not an identity bundle (expected one private key and two certificates)")
    return keys[0], certs[0], certs[1]
