"""Mutual TLS identities, revocation, session ownership, quotas, and sealed tensors against real servers."""

from __future__ import annotations

import datetime as dt
import os
import urllib.request

import grpc
import pytest
import torch

from tandem.client.assemble import connect_split
from tandem.client.errors import ServerError
from tandem.client.session import open_session
from tandem.client.transport import CHANNEL_OPTIONS, Transport
from tandem.cloud.tls import issue_bundle
from tandem.protos import serde
from tandem.protos import split_pb2 as pb
from tandem.protos import split_pb2_grpc as pb_grpc
from tandem.protos.bundle import read_bundle
from tandem.stages.lora import LoraConfig

LORA = LoraConfig(rank=2, alpha=4)


def _stub(server, bundle):
    key, cert, ca = read_bundle(bundle)
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    ch = grpc.secure_channel(server.addr, creds, options=CHANNEL_OPTIONS)
    return ch, pb_grpc.SplitTuningStub(ch)


def _code(fn, *a, **k):
    with pytest.raises(grpc.RpcError) as ei:
        fn(*a, timeout=30, **k)
    return ei.value.code(), ei.value.details()


def _fwd(session_id, step=0):
    return pb.ForwardRequest(
        session_id=session_id,
        step=step,
        hidden=serde.to_proto(torch.randn(1, 4, 32)),
        attention_mask=serde.to_proto(torch.ones(1, 4, dtype=torch.uint8)),
        train=False,
    )


def test_identities_ownership_and_revocation(tiny_models, server_factory, tmp_path):
    server = server_factory(tiny_models["llama"])
    alice = issue_bundle(server.tls_dir, "alice")
    bob = issue_bundle(server.tls_dir, "bob")
    # Without a client certificate the TLS handshake itself refuses the caller.
    with open(server.ca, "rb") as f:
        ch = grpc.secure_channel(server.addr, grpc.ssl_channel_credentials(root_certificates=f.read()))
    code, _ = _code(pb_grpc.SplitTuningStub(ch).GetInfo, pb.GetInfoRequest())
    assert code == grpc.StatusCode.UNAVAILABLE
    ch.close()
    # An expired certificate (valid yesterday only) is refused too.
    old = issue_bundle(server.tls_dir, "expired", days=1, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    ch, stub = _stub(server, old)
    assert _code(stub.GetInfo, pb.GetInfoRequest())[0] == grpc.StatusCode.UNAVAILABLE
    ch.close()

    cha, a = _stub(server, alice)
    chb, b = _stub(server, bob)
    sa = a.OpenSession(pb.OpenSessionRequest(lora=pb.LoraSpec(rank=2, alpha=4), remote_lora=False), timeout=30)
    assert len(a.Forward(_fwd(sa.session_id), timeout=30).hidden.data) == 4 * 4 * 32
    # Bob cannot forward, backward, read (fetch) or close Alice's session.
    assert _code(b.Forward, _fwd(sa.session_id))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert (
        _code(
            b.Backward,
            pb.BackwardRequest(session_id=sa.session_id, step=0, grad_output=serde.to_proto(torch.ones(1, 4, 32))),
        )[0]
        == grpc.StatusCode.PERMISSION_DENIED
    )
    with pytest.raises(grpc.RpcError) as ei:
        list(b.FetchClientStages(pb.FetchClientStagesRequest(session_id=sa.session_id), timeout=30))
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (
        _code(b.CloseSession, pb.CloseSessionRequest(session_id=sa.session_id))[0] == grpc.StatusCode.PERMISSION_DENIED
    )
    assert a.Forward(_fwd(sa.session_id), timeout=30).hidden.data  # still Alice's, still alive

    # Revoking Bob takes effect on his next call, on the open connection, without a restart.
    import subprocess

    from tandem.testing.servers import BIN

    out = subprocess.run(
        [os.path.join(BIN, "cloud"), "certs", "revoke", "bob", "--dir", server.tls_dir],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "revoked identity 'bob'" in out
    code, details = _code(b.GetInfo, pb.GetInfoRequest())
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details
    assert a.GetInfo(pb.GetInfoRequest(), timeout=30).model_id  # Alice is unaffected
    cha.close()
    chb.close()


def test_per_identity_session_quota(tiny_models, server_factory):
    server = server_factory(tiny_models["gpt2"], "--quota-sessions", "2")
    t = Transport(server.transport_cfg(retries=0))
    s1, _ = open_session(t, LORA), open_session(t, LORA)
    with pytest.raises(ServerError) as ei:
        open_session(t, LORA)
    assert ei.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota of 2 sessions" in str(ei.value)
    t.call("CloseSession", pb.CloseSessionRequest(session_id=s1.id))
    assert open_session(t, LORA).id  # a freed slot can be used again
    t.close()


def test_sealed_tensors_reject_tamper_and_replay(tiny_models, sample_data, server_factory):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        mport = s.getsockname()[1]
    server = server_factory(tiny_models["qwen2"], "--metrics-port", str(mport))
    t = Transport(server.transport_cfg(retries=0))
    sm = connect_split(t, LORA, seed=0)
    sess = sm.middle.session
    assert sess.sealer is not None and sm.middle.session.codec == "float32" and sess.sealing == "authenticated"

    # A well-formed sealed request works; the payload on the wire is ciphertext, not the tensor.
    h = torch.randn(1, 4, 32)
    req = pb.ForwardRequest(
        session_id=sess.id,
        step=0,
        hidden=serde.to_proto(h),
        attention_mask=serde.to_proto(torch.ones(1, 4, dtype=torch.uint8)),
        lora_version=-5,
        train=False,
    )
    req.lora.CopyFrom(serde.to_proto(torch.zeros(sum(p.numel() for p in sm.middle.params))))
    sealed = pb.ForwardRequest()
    sealed.CopyFrom(req)
    sess.sealer.seal(sealed, 0)
    assert sealed.hidden.sealed and sealed.hidden.data != req.hidden.data
    assert len(sealed.hidden.data) == len(req.hidden.data) + 16  # GCM tag
    resp = t.stub.Forward(sealed, timeout=30)
    assert resp.hidden.sealed

    # Replaying the same bytes fails closed.
    code, details = _code(t.stub.Forward, sealed)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "already used" in details
    # Tampering with one byte fails closed.
    bad = pb.ForwardRequest()
    bad.CopyFrom(req)
    sess.sealer.seal(bad, 0)
    data = bytearray(bad.hidden.data)
    data[7] ^= 1
    bad.hidden.data = bytes(data)
    code, details = _code(t.stub.Forward, bad)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "authentication failed" in details
    # Sealed for another step (associated data mismatch) fails closed.
    other = pb.ForwardRequest()
    other.CopyFrom(req)
    sess.sealer.seal(other, 1)
    assert _code(t.stub.Forward, other)[0] == grpc.StatusCode.INVALID_ARGUMENT
    # Unsealed tensors in a sealed session are refused.
    assert "not sealed" in _code(t.stub.Forward, req)[1]

    # The failures are visible in the server's metrics.
    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
    assert 'tandem_seal_failures_total{kind="replay"} 1.0' in text
    assert 'tandem_seal_failures_total{kind="tamper"} 2.0' in text
    assert 'tandem_seal_failures_total{kind="missing"} 1.0' in text
    assert 'tandem_requests_total{code="INVALID_ARGUMENT",method="Forward"} 4.0' in text

    # The session survives all of it: a normal training step through the client still works.
    from tandem.client.data import load_split

    data_ = load_split(sample_data, sm.tokenizer, 16, 2, 0, 0.1)
    loss, _ = sm.loss(data_.batch_at(0), 0, 0, train=True)
    loss.backward()
    assert torch.isfinite(loss)
    sm.close()
    t.close()


def test_require_sealing_refuses_unsealed_sessions(tiny_models, server_factory):
    server = server_factory(tiny_models["gpt2"], "--require-sealing")
    t = Transport(server.transport_cfg(retries=0, seal=False))
    with pytest.raises(ServerError) as ei:
        open_session(t, LORA)
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT and "requires sealed tensors" in str(ei.value)
    t.close()
    t = Transport(server.transport_cfg(retries=0))
    assert open_session(t, LORA).sealer is not None
    t.close()


def test_sealing_certificate_has_its_own_purpose_and_is_checked(tmp_path):
    """`cloud certs init` issues a sealing certificate; verify() accepts only it, signed by the trusted CA, in validity."""
    import stat

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from tandem.cloud.tls import ensure_server_tls, init_ca, load_sealing
    from tandem.protos.handshake import SEALING_EKU, HandshakeError, sign, verify

    d = str(tmp_path / "tls")
    init_ca(d)
    key, der = load_sealing(d)
    assert stat.S_IMODE(os.stat(os.path.join(d, "sealing.key")).st_mode) == 0o600
    eku = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [SEALING_EKU] and ExtendedKeyUsageOID.SERVER_AUTH not in eku
    with open(os.path.join(d, "ca.pem"), "rb") as f:
        ca = f.read()
    th = b"t" * 32
    verify(der, sign(key, th), th, ca)  # the genuine article
    with pytest.raises(HandshakeError, match="does not verify"):
        verify(der, sign(key, th), b"u" * 32, ca)
    with pytest.raises(HandshakeError, match="validity"):
        verify(der, sign(key, th), th, ca, now=dt.datetime.now(dt.UTC) + dt.timedelta(days=400))
    # The TLS server certificate and key (what a load balancer holds) cannot vouch for sealing keys.
    with open(os.path.join(d, "server.key"), "rb") as f:
        tls_key = serialization.load_pem_private_key(f.read(), None)
    with open(os.path.join(d, "server.pem"), "rb") as f:
        tls_der = x509.load_pem_x509_certificate(f.read()).public_bytes(serialization.Encoding.DER)
    with pytest.raises(HandshakeError, match="not a sealing certificate"):
        verify(tls_der, sign(tls_key, th), th, ca)
    # A sealing certificate of another CA is refused.
    other = str(tmp_path / "other")
    init_ca(other)
    okey, oder = load_sealing(other)
    with pytest.raises(HandshakeError, match="not signed by the CA"):
        verify(oder, sign(okey, th), th, ca)
    # A tls_dir made before authenticated sealing gets its sealing certificate on the next `cloud serve`.
    os.remove(os.path.join(d, "sealing.pem"))
    os.remove(os.path.join(d, "sealing.key"))
    ensure_server_tls(d)
    assert load_sealing(d) is not None and load_sealing(d)[1] != der


# Identities: revocation by serial, re-issue, the CA, reserved names ------------------------------------------
def _cloud(*args):
    import subprocess

    from tandem.testing.servers import BIN

    return subprocess.run([os.path.join(BIN, "cloud"), *args], capture_output=True, text=True, check=False)


def _refused_as_revoked(server, bundle) -> bool:
    ch, stub = _stub(server, bundle)
    try:
        stub.GetInfo(pb.GetInfoRequest(), timeout=30)
        return False
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in e.details(), e.details()
        return True
    finally:
        ch.close()


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _copy(path, tmp_path, name):
    dst = tmp_path / name
    dst.write_bytes(_read(path))
    return str(dst)


def test_revocation_is_by_certificate_and_a_name_can_be_issued_again(tiny_models, server_factory, tmp_path):
    server = server_factory(tiny_models["gpt2"])
    d = server.tls_dir
    bob1 = _copy(issue_bundle(d, "bob"), tmp_path, "bob1.pem")
    assert not _refused_as_revoked(server, bob1)
    assert _cloud("certs", "revoke", "bob", "--dir", d).returncode == 0
    assert _refused_as_revoked(server, bob1)
    # Issuing a name again is explicit: without --force it is refused (its bundle would be overwritten).
    r = _cloud("certs", "issue", "bob", "--dir", d)
    assert (
        r.returncode == 2 and "issued before" in r.stderr and "--force" in r.stderr and len(r.stderr.splitlines()) == 1
    )
    r = _cloud("certs", "issue", "bob", "--dir", d, "--force")
    assert r.returncode == 0, r.stderr
    bob2 = _copy(os.path.join(d, "clients", "bob.pem"), tmp_path, "bob2.pem")
    assert not _refused_as_revoked(server, bob2)  # the new certificate works, on the running server
    assert _refused_as_revoked(server, bob1)  # the revoked one stays revoked
    # Re-issuing a live name revokes the certificate it replaces: an overwritten bundle cannot linger.
    assert _cloud("certs", "issue", "bob", "--dir", d, "--force").returncode == 0
    assert _refused_as_revoked(server, bob2)
    assert not _refused_as_revoked(server, os.path.join(d, "clients", "bob.pem"))
    # Names differing only in letter case are one name.
    assert issue_bundle(d, "carol") and _cloud("certs", "issue", "Carol", "--dir", d).returncode == 2
    # The health service checks the certificate like every other service (the live one still gets answers).
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for bundle, refused in ((bob1, True), (os.path.join(d, "clients", "bob.pem"), False)):
        ch, _ = _stub(server, bundle)
        try:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=30).status
            assert not refused and status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError as e:
            assert refused and e.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in e.details(), e.details()
        finally:
            ch.close()


def test_name_entries_of_older_revocation_files_still_refuse_old_certificates(tiny_models, server_factory, tmp_path):
    """Older versions revoked by name and serial, and overwrote a re-issued name's certificate file."""
    import json

    from tandem.cloud.identity import cert_serial

    server = server_factory(tiny_models["gpt2"])
    d = server.tls_dir
    lost = _copy(issue_bundle(d, "dave"), tmp_path, "lost.pem")  # issued, then overwritten (its serial forgotten)
    os.remove(os.path.join(d, "clients", "dave.cert.pem"))
    last = _copy(issue_bundle(d, "dave"), tmp_path, "last.pem")
    with open(os.path.join(d, "revoked.json"), "w") as f:
        json.dump({"serials": [cert_serial(os.path.join(d, "clients", "dave.cert.pem"))], "names": ["dave"]}, f)
    assert _refused_as_revoked(server, lost) and _refused_as_revoked(server, last)
    assert _cloud("certs", "issue", "dave", "--dir", d, "--force").returncode == 0
    assert not _refused_as_revoked(server, os.path.join(d, "clients", "dave.pem"))
    assert _refused_as_revoked(server, lost) and _refused_as_revoked(server, last)
    assert json.loads(_read(os.path.join(d, "revoked.json")))["names"] == ["dave"]  # kept: it still guards `lost`


def test_certs_init_keeps_an_existing_ca(tiny_models, server_factory, tmp_path):
    server = server_factory(tiny_models["gpt2"])
    d = server.tls_dir
    ca = _read(server.ca)
    r = _cloud("certs", "init", "--dir", d)
    assert r.returncode == 2 and "already holds a CA" in r.stderr and "--force" in r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    assert _read(server.ca) == ca
    t = Transport(server.transport_cfg(retries=0))  # issued bundles still connect
    assert t.call("GetInfo", pb.GetInfoRequest()).model_id
    t.close()
    # A lost server certificate is re-made under the same CA on the next start, so issued bundles keep working.
    server.stop()
    os.remove(os.path.join(d, "server.pem"))
    again = server_factory(tiny_models["gpt2"], tls_dir=d)
    assert _read(again.ca) == ca
    t = Transport(again.transport_cfg(retries=0))
    assert t.call("GetInfo", pb.GetInfoRequest()).model_id
    t.close()
    r = _cloud("certs", "init", "--dir", d, "--force")
    assert r.returncode == 0 and "re-issue" in r.stdout and _read(again.ca) != ca


def test_reserved_and_malformed_identity_names_are_refused(tmp_path):
    d = str(tmp_path / "tls")
    assert _cloud("certs", "init", "--dir", d).returncode == 0
    before = sorted(os.listdir(d))
    for bad in (
        "anonymous",
        "Anonymous",
        "server",
        "CA",
        "tandem-server",
        "Tandem-Sealing",
        "bob\n",
        "b\u00f3b",
        "../x",
        "x" * 65,
        "",
    ):
        r = _cloud("certs", "issue", bad, "--dir", d)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, (bad, r.stderr)
        assert "reserved" in r.stderr or "identity name" in r.stderr, r.stderr
    assert sorted(os.listdir(d)) == before  # nothing written
    assert _cloud("certs", "issue", "local", "--dir", d).returncode == 0  # the default identity `cloud serve` issues


# Byte quota: every byte, both ways; a request above the burst is refused once, not retried ------------------
def _requests(port: int, method: str, code: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("tandem_requests_total{") and f'method="{method}"' in line and f'code="{code}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_request_larger_than_the_quota_burst_is_refused_not_retried(tiny_models, server_factory):
    from tandem.testing.servers import free_port

    mport = free_port()
    server = server_factory(tiny_models["llama"], "--quota-mbps", "0.01", "--metrics-port", str(mport))  # burst 40 KiB
    t = Transport(server.transport_cfg(retries=3, backoff_s=0.05))
    req = pb.ForwardRequest(
        session_id="x" * 32,
        step=0,
        hidden=serde.to_proto(torch.randn(1, 400, 32)),  # 50 KiB
        attention_mask=serde.to_proto(torch.ones(1, 400, dtype=torch.uint8)),
        train=False,
    )
    with pytest.raises(ServerError) as ei:
        t.call("Forward", req)
    e = ei.value
    assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == "over-quota-burst", str(e)
    assert "0.05 MiB" in str(e) and "0.04 MiB" in str(e) and "smaller batch" in str(e) and "--quota-mbps" in str(e)
    assert "retrying cannot help" in str(e)
    assert _requests(mport, "Forward", "RESOURCE_EXHAUSTED") == 1  # one attempt reached the server
    t.close()


def test_responses_count_against_the_byte_quota(tiny_models, server_factory):
    server = server_factory(tiny_models["llama"], "--quota-mbps", str(100 / 2**20))  # 100 B/s, burst 400 B
    t = Transport(server.transport_cfg(retries=0))
    info = t.call("GetInfo", pb.GetInfoRequest())  # an empty request; a reply of the model's config
    assert info.ByteSize() > 1000
    with pytest.raises(ServerError) as ei:  # the reply put the identity in debt: its next call waits
        t.call("GetInfo", pb.GetInfoRequest())
    assert ei.value.reason == "overloaded" and "over its quota" in str(ei.value)
    wait = float(str(ei.value).split("retry in ")[1].split(" s")[0])
    assert wait >= (info.ByteSize() - 400) / 100 * 0.8
    t.close()
