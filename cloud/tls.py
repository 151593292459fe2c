"""A local certificate authority and server certificates, made with the `cryptography` package."""
from __future__ import annotations

import datetime as dt
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tandem"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: str, key) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _write_cert(path: str, cert: x509.Certificate) -> None:
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def init_ca(tls_dir: str, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"), days: int = 365) -> None:
    """Creates a CA and a server certificate for `hosts` in tls_dir (keys are mode 0600)."""
    os.makedirs(tls_dir, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(_name("tandem local CA")).issuer_name(_name("tandem local CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(os.path.join(tls_dir, CA_KEY), ca_key)
    _write_cert(os.path.join(tls_dir, CA_CERT), ca)
    issue(tls_dir, "tandem-server", hosts=hosts, days=days, server=True)


def issue(tls_dir: str, name: str, hosts: tuple[str, ...] = (), days: int = 365, server: bool = False,
          not_before: dt.datetime | None = None) -> tuple[str, str]:
    """Issues a certificate signed by the CA in tls_dir; returns (cert path, key path)."""
    with open(os.path.join(tls_dir, CA_KEY), "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), None)
    with open(os.path.join(tls_dir, CA_CERT), "rb") as f:
        ca = x509.load_pem_x509_certificate(f.read())
    now = not_before or dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    b = (
        x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    stem = "server" if server else name
    cert_path, key_path = os.path.join(tls_dir, f"{stem}.pem"), os.path.join(tls_dir, f"{stem}.key")
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def ensure_server_tls(tls_dir: str) -> None:
    """Creates the CA and server certificate on first use; reuses them afterwards."""
    if not os.path.exists(os.path.join(tls_dir, SERVER_CERT)):
        init_ca(tls_dir)


def server_credentials(tls_dir: str):
    """gRPC server credentials from tls_dir (TLS; mutual TLS is a separate step)."""
    import grpc

    with open(os.path.join(tls_dir, SERVER_KEY), "rb") as f:
        key = f.read()
    with open(os.path.join(tls_dir, SERVER_CERT), "rb") as f:
        cert = f.read()
    return grpc.ssl_server_credentials([(key, cert)])
