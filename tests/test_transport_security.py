"""Mutual TLS identities, revocation, session ownership, quotas, and sealed tensors against real servers."""
from __future__ import annotations

import datetime as dt
import os
import urllib.request

import grpc
import pytest
import torch

from tandem.client.errors import ServerError
from tandem.client.staged import connect_split, open_session
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
    return pb.ForwardRequest(session_id=session_id, step=step, hidden=serde.to_proto(torch.randn(1, 4, 32)),
                             attention_mask=serde.to_proto(torch.ones(1, 4, dtype=torch.uint8)), train=False)


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
    old = issue_bundle(server.tls_dir, "expired", days=1,
                       not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3))
    ch, stub = _stub(server, old)
    assert _code(stub.GetInfo, pb.GetInfoRequest())[0] == grpc.StatusCode.UNAVAILABLE
    ch.close()

    cha, a = _stub(server, alice)
    chb, b = _stub(server, bob)
    sa = a.OpenSession(pb.OpenSessionRequest(lora=pb.LoraSpec(rank=2, alpha=4), remote_lora=False), timeout=30)
    assert len(a.Forward(_fwd(sa.session_id), timeout=30).hidden.data) == 4 * 4 * 32
    # Bob cannot forward, backward, read (fetch) or close Alice's session.
    assert _code(b.Forward, _fwd(sa.session_id))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert _code(b.Backward, pb.BackwardRequest(session_id=sa.session_id, step=0,
                                                grad_output=serde.to_proto(torch.ones(1, 4, 32))))[0] == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as ei:
        list(b.FetchClientStages(pb.FetchClientStagesRequest(session_id=sa.session_id), timeout=30))
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _code(b.CloseSession, pb.CloseSessionRequest(session_id=sa.session_id))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert a.Forward(_fwd(sa.session_id), timeout=30).hidden.data  # still Alice's, still alive

    # Revoking Bob takes effect on his next call, on the open connection, without a restart.
    import subprocess

    from conftest import BIN

    out = subprocess.run([os.path.join(BIN, "cloud"), "certs", "revoke", "bob", "--dir", server.tls_dir],
                         check=True, capture_output=True, text=True).stdout
    assert "revoked identity 'bob'" in out
    code, details = _code(b.GetInfo, pb.GetInfoRequest())
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details
    assert a.GetInfo(pb.GetInfoRequest(), timeout=30).model_id  # Alice is unaffected
    cha.close()
    chb.close()


def test_per_identity_session_quota(tiny_models, server_factory):
    server = server_factory(tiny_models["gpt2"], "--quota-sessions", "2")
    t = Transport(server.tcfg(retries=0))
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
    t = Transport(server.tcfg(retries=0))
    sm = connect_split(t, LORA, seed=0)
    sess = sm.middle.session
    assert sess.sealer is not None and sm.middle.session.codec == "float32" and sess.sealing == "authenticated"

    # A well-formed sealed request works; the payload on the wire is ciphertext, not the tensor.
    h = torch.randn(1, 4, 32)
    req = pb.ForwardRequest(session_id=sess.id, step=0, hidden=serde.to_proto(h),
                            attention_mask=serde.to_proto(torch.ones(1, 4, dtype=torch.uint8)), lora_version=-5, train=False)
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
    t = Transport(server.tcfg(retries=0, seal=False))
    with pytest.raises(ServerError) as ei:
        open_session(t, LORA)
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT and "requires sealed tensors" in str(ei.value)
    t.close()
    t = Transport(server.tcfg(retries=0))
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
        verify(der, sign(key, th), th, ca, now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=400))
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
