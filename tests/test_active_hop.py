"""Sealing against an active hop that terminates TLS with the server's own certificate and key (a load balancer).

The hop (tandem.testing.proxies.Hop) is a real gRPC proxy between the client and a real `cloud serve`. Passing
through, training equals a direct run; every rewrite it tries - swapping the sealing keys,
re-signing with the TLS key, stripping the signature, reshaping a tensor, flipping train,
changing the dropout seed, dropping the sealed LoRA - is refused with a clear error.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tandem.client.assemble import connect_split
from tandem.client.data import load_split
from tandem.client.errors import ClientError, ServerError
from tandem.client.session import open_session
from tandem.client.trainer import TuneConfig, tune
from tandem.client.transport import Transport, TransportConfig
from tandem.protos import split_pb2 as pb
from tandem.stages.lora import LoraConfig
from tandem.testing.keyswap import KeySwap, minted_sealing_cert
from tandem.testing.proxies import Hop
from tandem.testing.servers import start_server

LORA = LoraConfig(rank=4, alpha=8)


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    s = start_server(tiny_models["llama"], tmp_path_factory.mktemp("hop-server"))
    yield s
    s.stop()


@pytest.fixture
def hop(server):
    h = Hop(server)
    yield h
    h.close()


def _tune(tcfg, data, out):
    cfg = TuneConfig(
        data=data,
        out=str(out),
        steps=2,
        batch_size=2,
        seq_len=24,
        lr=1e-2,
        seed=3,
        lora=LORA,
        audit="no",
        progress=False,
    )
    return tune(cfg, tcfg)


def test_passthrough_trains_exactly_like_a_direct_run(server, hop, sample_data, tmp_path):
    via = _tune(hop.transport_cfg(), sample_data, tmp_path / "via")
    direct = _tune(server.transport_cfg(), sample_data, tmp_path / "direct")
    assert [s["loss"] for s in via["steps"]] == [s["loss"] for s in direct["steps"]]
    assert via["wire"]["sealing"] == direct["wire"]["sealing"] == "authenticated"
    # What the hop saw: every tensor sealed (ciphertext + tag), never the activations themselves.
    fwd = [m for name, m in hop.seen if name == "Forward"]
    assert fwd and all(
        m.hidden.sealed
        and m.attention_mask.sealed
        and len(m.hidden.data) == 4 * m.hidden.shape[0] * m.hidden.shape[1] * m.hidden.shape[2] + 16
        for m in fwd
    )


@pytest.mark.parametrize(
    "resign, expected",
    [
        (False, "handshake signature does not verify"),
        (True, "not a sealing certificate"),
    ],
)
def test_key_swap_is_refused_and_the_hop_reads_nothing(hop, resign, expected):
    mitm = KeySwap(hop, resign=resign)
    t = Transport(hop.transport_cfg(retries=0))
    with pytest.raises(ClientError, match=expected) as ei:
        connect_split(t, LORA, seed=0)
    assert "sealing handshake refused" in str(ei.value) and "\n" not in str(ei.value)
    t.close()
    assert mitm.plaintexts == []  # the client sent no tensor under the hop's keys
    assert not any(name in ("Forward", "Backward") for name, _ in hop.seen)
    # It closed the session it refused (else a hostile hop could use up the identity's session quota).
    assert [name for name, _ in hop.seen] == ["OpenSession", "CloseSession"]


def test_the_same_mitm_reads_everything_when_the_client_skips_the_check(hop, sample_data):
    """Control: the KeySwap adversary is real; only the signature check stops it (what 'unauthenticated' means)."""
    mitm = KeySwap(hop)
    t = Transport(hop.transport_cfg(retries=0))
    t.ca_pem = None  # a client without a CA to check the sealing certificate (as under --insecure)
    sm = connect_split(t, LORA, seed=0)
    assert sm.middle.session.sealing == "unauthenticated"
    data = load_split(sample_data, sm.tokenizer, 24, 2, 0, 0.1)
    loss, _ = sm.loss(data.batch_at(0), 0, 0, train=True)
    loss.backward()
    fields = {(m, f) for m, f, _ in mitm.plaintexts}
    assert {("ForwardRequest", "hidden"), ("ForwardResponse", "hidden"), ("BackwardRequest", "grad_output")} <= fields
    sm.close()
    t.close()


def _sealing_cert_signed_by_the_tls_key(hop):
    return minted_sealing_cert(hop.tls_key, hop.tls_cert)


def test_only_a_ca_in_the_trusted_file_vouches_for_sealing(hop, tmp_path):
    """A CA file that also holds the server's certificate (a "full chain", which TLS accepts) must not let the
    holder of the TLS key issue sealing certificates: only a CA certificate can be an issuer."""
    with open(hop.ca, "rb") as f:
        ca = f.read()
    chain = tmp_path / "fullchain.pem"
    chain.write_bytes(hop.tls_cert + ca)
    mitm = KeySwap(hop, sealing=_sealing_cert_signed_by_the_tls_key(hop))
    t = Transport(hop.transport_cfg(ca=str(chain), retries=0))
    with pytest.raises(ClientError, match="not signed by the CA this client trusts"):
        connect_split(t, LORA, seed=0)
    t.close()
    assert mitm.plaintexts == []


def test_a_replayed_signed_reply_is_refused(hop):
    """The server signs the client's fresh key: its genuine, signed reply to an earlier OpenSession opens nothing."""
    t = Transport(hop.transport_cfg(retries=0))
    first = open_session(t, LORA)
    old = pb.OpenSessionResponse()
    old.CopyFrom(first.info)
    hop.on_response["OpenSession"] = lambda resp: old
    with pytest.raises(ClientError, match="handshake signature does not verify"):
        open_session(t, LORA)
    t.close()


def _strip(resp):
    resp.ClearField("seal_signature")
    resp.ClearField("seal_certificate")
    return resp


def _tls_cert_as_sealing_cert(hop):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate(hop.tls_cert).public_bytes(serialization.Encoding.DER)

    def rewrite(resp):
        resp.seal_certificate = der
        return resp

    return rewrite


def test_stripped_or_replaced_sealing_certificate_is_refused(hop):
    for rewrite, expected in (
        (_strip, "no sealing certificate"),
        (_tls_cert_as_sealing_cert(hop), "not a sealing certificate"),
    ):
        hop.on_response["OpenSession"] = rewrite
        t = Transport(hop.transport_cfg(retries=0))
        with pytest.raises(ClientError, match=expected):
            open_session(t, LORA)
        t.close()


def _set(**fields):
    def rewrite(msg):
        for k, v in fields.items():
            setattr(msg, k, v)
        return msg

    return rewrite


@pytest.mark.parametrize(
    "side, rewrite",
    [
        ("request", _set(codec="int4")),  # the server would compute on 4-bit activations the client never chose
        ("request", _set(remote_lora=False)),
        ("response", _set(client_stages_sha256="0" * 64)),  # the client would accept substituted client stages
        ("response", _set(block_size=7)),
    ],
)
def test_rewritten_session_parameters_are_refused(hop, side, rewrite):
    """The handshake signature covers every OpenSession field, not only the keys."""
    (hop.on_request if side == "request" else hop.on_response)["OpenSession"] = rewrite
    t = Transport(hop.transport_cfg(retries=0))
    with pytest.raises(ClientError, match="handshake signature does not verify"):
        open_session(t, LORA)
    t.close()


def test_the_reply_is_checked_before_it_is_acted_on(hop):
    """A hop that says the server refused the cloud optimizer gets a refused handshake, and the session is closed."""
    hop.on_response["OpenSession"] = _set(cloud_optimizer=False)
    t = Transport(hop.transport_cfg(retries=0))
    adamw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    with pytest.raises(ClientError, match="handshake signature does not verify"):
        open_session(t, LORA, cloud_optimizer=adamw)
    t.close()
    assert [name for name, _ in hop.seen] == ["OpenSession", "CloseSession"]


def test_error_details_from_the_path_are_one_bounded_printable_line(hop):
    """Status details come from whoever answers (a hop, a hostile cloud): the client shows them clipped, one line,
    without terminal control sequences that could forge output or rewrite the terminal."""
    import grpc

    forged = "fine\nclient tune: finished, adapter saved\x1b[2J\x1b]0;owned\x07" + "A" * 6000
    hop.fail["OpenSession"] = (grpc.StatusCode.INVALID_ARGUMENT, forged, "invalid")
    t = Transport(hop.transport_cfg(retries=0))
    with pytest.raises(ServerError) as ei:
        open_session(t, LORA)
    t.close()
    msg = str(ei.value)
    assert "\n" not in msg and "\x1b" not in msg and "\x07" not in msg and len(msg) < 1500, msg[:300]
    assert "fine client tune: finished" in msg


def _halve(t: pb.Tensor, tail: int) -> None:
    """(B, T, ...) -> (2B, T/2, ...): same bytes, other meaning."""
    b, n = t.shape[0], t.shape[1]
    new = [2 * b, n // 2] if n % 2 == 0 else [b * n, 1]
    del t.shape[:]
    t.shape.extend(new + ([tail] if tail else []))


def _reshape(msg):
    _halve(msg.hidden, msg.hidden.shape[2])
    _halve(msg.attention_mask, 0)
    return msg


def _flip_train(msg):
    msg.train = not msg.train
    return msg


def _reseed(msg):
    msg.dropout_seed += 1
    return msg


class _StaleLora:
    """Drops the sealed LoRA of every later Forward and names the first version again (stale adapter)."""

    def __init__(self):
        self.first, self.dropped = None, 0

    def __call__(self, msg):
        if msg.HasField("lora"):
            if self.first is None:
                self.first = msg.lora_version
            elif msg.lora_version != self.first:
                msg.ClearField("lora")
                msg.lora_version = self.first
                self.dropped += 1
        return msg


@pytest.mark.parametrize(
    "name, rewrite",
    [
        ("reshape", lambda: _reshape),
        ("flip-train", lambda: _flip_train),
        ("dropout-seed", lambda: _reseed),
        ("stale-lora", _StaleLora),
    ],
)
def test_rewritten_forward_requests_fail_closed(server, hop, sample_data, name, rewrite):
    hook = hop.on_request["Forward"] = rewrite()
    t = Transport(hop.transport_cfg(retries=0))
    sm = connect_split(t, LORA, seed=0)
    data = load_split(sample_data, sm.tokenizer, 24, 2, 0, 0.1)
    opt = torch.optim.AdamW(sm.adapter.parameters(), lr=1e-2)
    with pytest.raises(ServerError) as ei:
        for step in range(2):  # stale-lora bites on the second step (the first sends version 0)
            opt.zero_grad()
            loss, _ = sm.loss(data.batch_at(step), step, 0, train=True)
            loss.backward()
            opt.step()
    assert "authentication failed" in str(ei.value) and ei.value.code.name == "INVALID_ARGUMENT", name
    assert "sealed payload rejected (tamper)" in server.log()
    assert name != "stale-lora" or hook.dropped == 1
    sm.close()
    t.close()


def _reshape_response(resp):
    _halve(resp.hidden, resp.hidden.shape[2])
    return resp


def test_rewritten_response_fails_closed_at_the_client(hop, sample_data):
    hop.on_response["Forward"] = _reshape_response
    t = Transport(hop.transport_cfg(retries=0))
    sm = connect_split(t, LORA, seed=0)
    data = load_split(sample_data, sm.tokenizer, 24, 2, 0, 0.1)
    with pytest.raises(ClientError, match="seal check.*authentication failed"):
        sm.loss(data.batch_at(0), 0, 0, train=True)
    sm.close()
    t.close()


def test_insecure_report_says_unauthenticated(tiny_models, sample_data, tmp_path, caplog):
    s = start_server(tiny_models["llama"], tmp_path, insecure=True)
    try:
        with caplog.at_level(logging.WARNING, logger="tandem.client"):
            report = _tune(TransportConfig(server=s.addr, insecure=True), sample_data, tmp_path / "run")
    finally:
        s.stop()
    assert report["wire"]["sealed"] is True and report["wire"]["sealing"] == "unauthenticated"
    assert sum("UNAUTHENTICATED" in r.getMessage() for r in caplog.records) == 1
