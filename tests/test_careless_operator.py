"""Careless setups: a wrong, expired or foreign certificate fails at once naming what to check, and `cloud serve`
neither serves plaintext on a public address nor exposes its metrics by accident."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import time

import grpc
import pytest

from tandem.client.errors import ServerError
from tandem.client.transport import Transport
from tandem.protos import split_pb2 as pb
from tandem.testing.servers import BIN

FAST_S = 10.0  # the default --retries 8 used to spend about 90 s retrying a certificate that can never work


@pytest.fixture
def server(tiny_models, server_factory):
    return server_factory(tiny_models["llama"])


def _fails_fast(tcfg) -> str:
    """The call's error message, asserting it came within FAST_S, as one line, and as a handshake failure."""
    t = Transport(tcfg)
    t0 = time.monotonic()
    try:
        with pytest.raises(ServerError) as ei:
            t.call("GetInfo", pb.GetInfoRequest())
    finally:
        t.close()
    took = time.monotonic() - t0
    msg = str(ei.value)
    assert took < FAST_S, (took, msg)
    assert "\n" not in msg and msg.startswith("TLS handshake with "), msg
    assert ei.value.code == grpc.StatusCode.UNAVAILABLE and ei.value.reason == "tls-handshake"
    return msg


def test_an_expired_identity_fails_at_once_naming_its_expiry(server, sample_data, tmp_path):
    from tandem.cloud.tls import issue_bundle

    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    old = issue_bundle(server.tls_dir, "old", days=1, not_before=past)
    msg = _fails_fast(server.transport_cfg(identity=old))
    expired_on = (past + dt.timedelta(days=1)).strftime("%Y-%m-%d")
    assert old in msg and "CN 'old'" in msg and f"expired on {expired_on}" in msg, msg
    assert "cloud certs issue old --force" in msg, msg

    # Through the command line: exit 2 and one line on stderr, in seconds.
    t0 = time.monotonic()
    r = subprocess.run(
        [
            os.path.join(BIN, "client"),
            "tune",
            "--data",
            sample_data,
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "1",
            "--server",
            server.addr,
            "--identity",
            old,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("client tune:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"expired on {expired_on}" in lines[0] and old in lines[0], lines
    assert time.monotonic() - t0 < 60


def test_a_bundle_from_another_ca_fails_at_once_naming_the_ca(server, tmp_path):
    from tandem.cloud.tls import init_ca, issue_bundle

    other = str(tmp_path / "other")
    init_ca(other)  # same CA name ("tandem local CA"), another key: only the signature tells them apart
    eve = issue_bundle(other, "eve")
    msg = _fails_fast(server.transport_cfg(identity=eve, ca=server.ca))
    assert "the server refused the client certificate" in msg, msg
    assert eve in msg and "CN 'eve'" in msg and "valid until" in msg, msg
    assert "not issued by the CA this server trusts" in msg and server.ca in msg, msg

    # The other way round: the server's certificate is not from the CA the client trusts.
    msg = _fails_fast(server.transport_cfg(ca=os.path.join(other, "ca.pem")))
    assert "the server's certificate is not issued by the trusted CA" in msg, msg
    assert os.path.join(other, "ca.pem") in msg and server.identity in msg and "CN 'local'" in msg, msg

    # No client certificate at all: one quick retry (a handshake cut by chance), then the reason.
    msg = _fails_fast(server.transport_cfg(identity=None))
    assert "requires a client certificate" in msg and "--identity" in msg and server.ca in msg, msg
    assert server.proc.poll() is None


def test_a_server_certificate_for_another_name_fails_at_once(tiny_models, server_factory, tmp_path):
    from tandem.cloud.tls import init_ca

    tls = str(tmp_path / "tls-elsewhere")
    init_ca(tls, hosts=("cloud.example.com",))  # the server's certificate names only that host
    server = server_factory(tiny_models["llama"], tls_dir=tls)
    msg = _fails_fast(server.transport_cfg())
    host = server.addr.rsplit(":", 1)[0]
    assert f"does not name '{host}'" in msg and f"--host {host}" in msg and server.identity in msg, msg


def _cloud_serve(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [os.path.join(BIN, "cloud"), "serve", "--threads", "1", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _one_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", ":0"])
def test_plaintext_on_a_public_address_is_refused(tiny_models, listen):
    line = _one_line(_cloud_serve("--model", tiny_models["llama"], "--insecure", "--listen", listen))
    assert line.startswith("cloud serve: --insecure with --listen ") and "--insecure-public" in line, line
    assert "PLAINTEXT" in line and "non-loopback" in line, line


def test_a_taken_metrics_port_is_one_line(tiny_models):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = _one_line(
            _cloud_serve(
                "--model",
                tiny_models["llama"],
                "--listen",
                "127.0.0.1:0",
                "--metrics-port",
                str(port),
                "--tls-dir",
                os.devnull,
            )
        )  # refused before the TLS directory or the model is touched
    assert f"--metrics-port {port}" in line and "in use" in line, line


def _listening(port: int) -> set[str]:
    """The local addresses a socket listens on at `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(addr)
                # /proc prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6, words))
    return found


def test_public_plaintext_needs_its_flag_and_metrics_stay_on_loopback(tiny_models, tmp_path):
    from tandem.testing.servers import free_port

    mport, port = free_port(), free_port()
    cmd = [
        os.path.join(BIN, "cloud"),
        "serve",
        "--threads",
        "1",
        "--model",
        tiny_models["llama"],
        "--insecure",
        "--insecure-public",
        "--listen",
        f"0.0.0.0:{port}",
        "--metrics-port",
        str(mport),
    ]
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()
        assert f"on 0.0.0.0:{port} (plaintext" in line, (line, (tmp_path / "serve.log").read_text())
        assert _listening(port) & {"0.0.0.0", "::"}  # gRPC may bind 0.0.0.0 as the dual-stack "::"
        assert _listening(mport) == {"127.0.0.1"}, _listening(mport)  # not every interface, unlike --listen
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_port_grpc_cannot_bind_is_one_line():
    import types

    from tandem.cloud.server import build_server

    with socket.socket() as s:  # gRPC binds without SO_REUSEPORT (SERVER_OPTIONS): this port is taken for it
        s.bind(("127.0.0.1", 0))
        s.listen()
        listen = f"127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(OSError) as ei:  # newer gRPC raises RuntimeError, which used to escape as a traceback
            build_server(types.SimpleNamespace(), listen, None)
    assert str(ei.value).startswith(f"--listen {listen}: ") and "choose another --listen" in str(ei.value)


class _Failed(grpc.RpcError):
    def __init__(self, details, code=grpc.StatusCode.UNAVAILABLE):
        self._d, self._c = details, code

    def code(self):
        return self._c

    def details(self):
        return self._d


_LAST = "failed to connect to all addresses; last error: "


@pytest.mark.parametrize(
    ("details", "kind"),
    [
        # as gRPC 1.85 words them (the tests above meet each for real, but the TLS 1.2 alert)
        (_LAST + "UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed", "closed"),
        (
            _LAST
            + "UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1a000064:"
            "ECDSA routines:OPENSSL_internal:BAD_SIGNATURE: certificate signature failure: OK",
            "server-ca",
        ),
        (
            _LAST
            + "UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:"
            "SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate has expired: OK",
            "server-expired",
        ),
        (
            _LAST
            + "UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:"
            "SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER",
            "plaintext",
        ),
        (
            _LAST + "UNKNOWN: ipv4:10.0.0.1:1: Custom verification check failed with error: UNAUTHENTICATED: Hostname "
            "Verification Check failed.",
            "hostname",
        ),
        (
            _LAST + "UNKNOWN: ipv4:127.0.0.1:1: Ssl handshake failed: SSL_ERROR_SSL: error:10000418:SSL routines:"
            "OPENSSL_internal:TLSV1_ALERT_UNKNOWN_CA",
            "refused",
        ),
        (_LAST + "UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused", None),  # retried
        ("Socket closed", None),  # a call cut after connecting: retried as before
    ],
)
def test_handshake_failures_are_told_apart_from_outages(details, kind):
    from tandem.client.tls_failure import failure_kind

    assert failure_kind(_Failed(details)) == kind
    assert failure_kind(_Failed(details, grpc.StatusCode.UNKNOWN)) is None
