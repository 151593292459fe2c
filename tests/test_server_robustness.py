"""Robustness of a real `cloud serve` process: bad input, eviction, TTL, TLS, and a server that is not there.

Every test talks to a real server subprocess over gRPC; bad requests go through a raw stub so that
the client library's own validation cannot hide what the server does with them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import grpc
import pytest
import torch

from tandem.client.assemble import connect_split
from tandem.client.data import load_split
from tandem.client.errors import ClientError, ServerError
from tandem.client.transport import CHANNEL_OPTIONS, Transport, TransportConfig
from tandem.protos import serde
from tandem.protos import split_pb2 as pb
from tandem.protos import split_pb2_grpc as pb_grpc
from tandem.stages.lora import LoraConfig
from tandem.testing.servers import free_port, start_server

LORA = LoraConfig(rank=4, alpha=8, dropout=0.1)
BATCH, SEQ = 2, 24  # 48 tokens a step: under the guarded server's --max-tokens-per-step 64
HIDDEN = 32  # tandem.testing.models: the tiny models' hidden size


# Helpers -----------------------------------------------------------------------------------------
def _raw(server, options=CHANNEL_OPTIONS):
    from tandem.protos.bundle import read_bundle

    key, cert, ca = read_bundle(server.identity)
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    ch = grpc.secure_channel(server.addr, creds, options=options)
    return ch, pb_grpc.SplitTuningStub(ch)


def _open(stub, remote_lora=True, **kw) -> pb.OpenSessionResponse:
    return stub.OpenSession(
        pb.OpenSessionRequest(
            lora=pb.LoraSpec(rank=LORA.rank, alpha=LORA.alpha, dropout=LORA.dropout),
            remote_lora=remote_lora,
            codec="float32",
            **kw,
        ),
        timeout=30,
    )


def _lora_size(info: pb.OpenSessionResponse) -> int:
    return sum(LORA.rank * (s.in_features + s.out_features) for s in info.middle_slots)


def _fwd(sid, h, mask=None, step=0, lora=None, lora_version=0, train=True) -> pb.ForwardRequest:
    if mask is None:
        mask = torch.ones(h.shape[:2] if isinstance(h, torch.Tensor) else (2, 8), dtype=torch.uint8)
    req = pb.ForwardRequest(
        session_id=sid,
        step=step,
        lora_version=lora_version,
        dropout_seed=1,
        train=train,
        hidden=h if isinstance(h, pb.Tensor) else serde.to_proto(h),
        attention_mask=mask if isinstance(mask, pb.Tensor) else serde.to_proto(mask),
    )
    if lora is not None:
        req.lora.CopyFrom(lora if isinstance(lora, pb.Tensor) else serde.to_proto(lora))
    return req


def _reason(e: grpc.RpcError) -> str:
    return dict(e.trailing_metadata() or ()).get("tandem-reason", "")


def _rejects(call, req, code, *needles, reason=None):
    """Asserts the call fails with `code`, a details message containing every needle, and the reason."""
    with pytest.raises(grpc.RpcError) as ei:
        call(req, timeout=60)
    e = ei.value
    assert e.code() == code, f"expected {code.name}, got {e.code().name}: {e.details()}"
    for n in needles:
        assert n.lower() in e.details().lower(), f"{n!r} not in {e.details()!r}"
    if reason is not None:
        assert _reason(e) == reason, f"reason {_reason(e)!r}, expected {reason!r}"
    return e


def _train(t: Transport, sample_data, seed: int, steps: int, before_step=None) -> list[float]:
    """Trains a fresh split session for `steps` steps; returns the losses."""
    m = connect_split(t, LORA, seed=seed)
    data = load_split(sample_data, m.tokenizer, seq_len=SEQ, batch_size=BATCH, seed=seed, val_fraction=0.1)
    opt = torch.optim.AdamW(m.adapter.parameters(), lr=5e-2)
    losses = []
    for step in range(steps):
        if before_step:
            before_step(step)
        opt.zero_grad()
        loss, _ = m.loss(data.batch_at(step), step, seed=seed, train=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    m.close()
    return losses


def _alive(server) -> None:
    assert server.proc.poll() is None, f"the server died:\n{server.log()[-3000:]}"
    ch, stub = _raw(server)
    assert stub.GetInfo(pb.GetInfoRequest(), timeout=30).layout.num_layers == 6
    ch.close()
    assert "Traceback" not in server.log(), server.log()[-3000:]


@pytest.fixture(scope="module")
def guarded(tiny_models, tmp_path_factory):
    """A TLS server with a small per-step token limit, shared by the bad-input and TLS tests."""
    s = start_server(tiny_models["llama"], tmp_path_factory.mktemp("guarded"), "--max-tokens-per-step", "64")
    yield s
    s.stop()


# 1. Bad input --------------------------------------------------------------------------------------
def _bad_requests(stub, sid: str, n_lora: int):
    """(label, rpc, request, code, needles, reason) for malformed requests on a valid session."""
    inv, h = grpc.StatusCode.INVALID_ARGUMENT, torch.randn(2, 8, HIDDEN)
    nan, inf = h.clone(), h.clone()
    nan[1, 3, 5], inf[0, 0, 0] = float("nan"), float("inf")
    ok_lora = torch.zeros(n_lora)
    F, B = stub.Forward, stub.Backward
    return [
        (
            "hidden size 31",
            F,
            _fwd(sid, torch.randn(2, 8, 31), lora=ok_lora),
            inv,
            ["hidden: expected shape [batch, seq, 32], got [2, 8, 31]"],
            "invalid",
        ),
        (
            "hidden 2-d",
            F,
            _fwd(sid, torch.randn(8, HIDDEN), mask=torch.ones(8, 1, dtype=torch.uint8)),
            inv,
            ["expected shape"],
            "invalid",
        ),
        (
            "hidden float16",
            F,
            _fwd(sid, h.half(), lora=ok_lora),
            inv,
            ["expected dtype torch.float32", "float16"],
            "invalid",
        ),
        (
            "hidden int64",
            F,
            _fwd(sid, h.long(), lora=ok_lora),
            inv,
            ["expected dtype torch.float32", "int64"],
            "invalid",
        ),
        (
            "hidden unknown dtype code",
            F,
            _fwd(sid, pb.Tensor(shape=[2, 8, HIDDEN], dtype=99, data=bytes(2048))),
            inv,
            ["unknown dtype code 99"],
            "invalid",
        ),
        (
            "hidden byte count",
            F,
            _fwd(sid, pb.Tensor(shape=[2, 8, HIDDEN], dtype=pb.FLOAT32, data=bytes(100))),
            inv,
            ["hidden: shape [2, 8, 32]", "needs 2048 bytes, got 100"],
            "invalid",
        ),
        (
            "hidden negative dim",
            F,
            _fwd(sid, pb.Tensor(shape=[-2, 8, HIDDEN], dtype=pb.FLOAT32)),
            inv,
            ["negative dimension"],
            "invalid",
        ),
        (
            "hidden empty",
            F,
            _fwd(sid, torch.zeros(0, 8, HIDDEN), mask=torch.ones(0, 8, dtype=torch.uint8)),
            inv,
            ["empty batch"],
            "invalid",
        ),
        ("hidden NaN", F, _fwd(sid, nan, lora=ok_lora), inv, ["hidden: contains NaN or Inf"], "invalid"),
        ("hidden Inf", F, _fwd(sid, inf, lora=ok_lora), inv, ["hidden: contains NaN or Inf"], "invalid"),
        (
            "mask shape",
            F,
            _fwd(sid, h, mask=torch.ones(2, 7, dtype=torch.uint8), lora=ok_lora),
            inv,
            ["attention_mask: expected shape [2, 8], got [2, 7]"],
            "invalid",
        ),
        (
            "mask value 2",
            F,
            _fwd(sid, h, mask=torch.full((2, 8), 2, dtype=torch.uint8), lora=ok_lora),
            inv,
            ["attention_mask: expected uint8 zeros and ones"],
            "invalid",
        ),
        (
            "mask int64",
            F,
            _fwd(sid, h, mask=torch.ones(2, 8, dtype=torch.long), lora=ok_lora),
            inv,
            ["attention_mask: expected uint8 zeros and ones"],
            "invalid",
        ),
        (
            "mask empty row",
            F,
            _fwd(sid, h, mask=torch.tensor([[1] * 8, [0] * 8], dtype=torch.uint8), lora=ok_lora),
            inv,
            ["a row has no real token"],
            "invalid",
        ),
        (
            "too many tokens",
            F,
            _fwd(sid, torch.randn(4, 32, HIDDEN), lora=ok_lora),
            inv,
            ["128 tokens in one step", "limit of 64"],
            "invalid",
        ),
        (
            "lora garbage bytes",
            F,
            _fwd(sid, h, lora=pb.Tensor(shape=[n_lora], dtype=pb.FLOAT32, data=b"garbage!")),
            inv,
            ["lora: shape", "got 8"],
            "invalid",
        ),
        (
            "lora all-NaN bytes",
            F,
            _fwd(sid, h, lora=pb.Tensor(shape=[n_lora], dtype=pb.FLOAT32, data=b"\xff" * 4 * n_lora)),
            inv,
            ["lora: contains NaN or Inf"],
            "invalid",
        ),
        (
            "lora wrong length",
            F,
            _fwd(sid, h, lora=torch.zeros(n_lora - 1)),
            inv,
            [f"adapter vector has {n_lora - 1} values, expected {n_lora}"],
            "invalid",
        ),
        (
            "lora int8",
            F,
            _fwd(sid, h, lora=torch.zeros(n_lora, dtype=torch.int8)),
            inv,
            ["lora: expected dtype torch.float32, got torch.int8"],
            "invalid",
        ),
        (
            "lora 2-d",
            F,
            _fwd(sid, h, lora=torch.zeros(1, n_lora)),
            inv,
            ["lora: expected a flat float32 vector"],
            "invalid",
        ),
        (
            "lora version never sent",
            F,
            _fwd(sid, h, lora_version=7),
            grpc.StatusCode.FAILED_PRECONDITION,
            ["resend the adapter"],
            "lora-missing",
        ),
        (
            "unknown session",
            F,
            _fwd("no-such-session", h, lora=ok_lora),
            grpc.StatusCode.NOT_FOUND,
            ["does not exist", "open a new session"],
            "no-session",
        ),
        (
            "backward without forward",
            B,
            pb.BackwardRequest(session_id=sid, step=99, grad_output=serde.to_proto(h)),
            grpc.StatusCode.FAILED_PRECONDITION,
            ["no forward of step 99 is pending"],
            "no-step",
        ),
        (
            "backward unknown session",
            B,
            pb.BackwardRequest(session_id="nope", step=0, grad_output=serde.to_proto(h)),
            grpc.StatusCode.NOT_FOUND,
            ["does not exist"],
            "no-session",
        ),
        (
            "backward grad NaN",
            B,
            pb.BackwardRequest(session_id=sid, step=0, grad_output=serde.to_proto(nan)),
            inv,
            ["grad_output: contains NaN or Inf"],
            "invalid",
        ),
        (
            "open: wrong model",
            stub.OpenSession,
            pb.OpenSessionRequest(model_id="gpt-17", codec="float32"),
            inv,
            ["this server serves", "gpt-17"],
            "invalid",
        ),
        (
            "open: unknown codec",
            stub.OpenSession,
            pb.OpenSessionRequest(codec="int3"),
            inv,
            ["codec 'int3' is not supported"],
            "invalid",
        ),
        (
            "open: unknown target",
            stub.OpenSession,
            pb.OpenSessionRequest(lora=pb.LoraSpec(rank=4, target_modules=["nope_proj"]), remote_lora=True),
            inv,
            ["['nope_proj'] do not exist in this model"],
            "invalid",
        ),
        (
            "fetch: unknown session",
            lambda r, timeout: list(stub.FetchClientStages(r, timeout=timeout)),
            pb.FetchClientStagesRequest(session_id="nope"),
            grpc.StatusCode.NOT_FOUND,
            ["does not exist"],
            "no-session",
        ),
        (
            "close: unknown session",
            stub.CloseSession,
            pb.CloseSessionRequest(session_id="nope"),
            grpc.StatusCode.NOT_FOUND,
            ["does not exist"],
            "no-session",
        ),
    ]


def test_bad_input_is_rejected_while_another_session_trains(guarded, sample_data):
    steps = 6
    t = Transport(guarded.transport_cfg(retries=0))
    permits: queue.Queue = queue.Queue()
    result: dict = {}

    def session_a():
        try:
            result["losses"] = _train(
                t, sample_data, seed=11, steps=steps, before_step=lambda _s: permits.get(timeout=120)
            )
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            result["error"] = e

    worker = threading.Thread(target=session_a, daemon=True)
    worker.start()

    ch, stub = _raw(guarded)
    info = _open(stub)
    sid, n_lora = info.session_id, _lora_size(info)
    assert n_lora > 0
    bad = _bad_requests(stub, sid, n_lora)
    per_step = max(1, len(bad) // steps)
    for i, (label, rpc, req, code, needles, reason) in enumerate(bad):
        try:
            _rejects(rpc, req, code, *needles, reason=reason)
        except AssertionError as e:
            raise AssertionError(f"{label}: {e}") from None
        if i % per_step == 0:
            permits.put(i)  # session A runs its next step while the next bad requests arrive
    for _ in range(steps):
        permits.put(-1)

    # A message over the server's receive limit (256 MiB): refused by gRPC itself, the server survives.
    big_ch, big_stub = _raw(
        guarded, [("grpc.max_send_message_length", 2**30), ("grpc.max_receive_message_length", 2**30)]
    )
    huge = _fwd(sid, pb.Tensor(shape=[1], dtype=pb.FLOAT32, data=bytes(serde.MAX_MESSAGE_BYTES + 1024)))
    assert huge.ByteSize() > serde.MAX_MESSAGE_BYTES
    _rejects(big_stub.Forward, huge, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max")
    del huge
    big_ch.close()

    worker.join(timeout=180)
    assert not worker.is_alive(), "session A did not finish"
    if "error" in result:
        raise result["error"]
    losses = result["losses"]
    assert len(losses) == steps and all(0 < x < 1e3 for x in losses)

    # Session B still works after all that: a correct step, then a wrong-shape gradient that the server
    # rejects while keeping the step's state, so the correct gradient afterwards succeeds.
    h = torch.randn(2, 8, HIDDEN)
    out = stub.Forward(_fwd(sid, h, step=3, lora=torch.full((n_lora,), 0.01)), timeout=60)
    assert list(out.hidden.shape) == [2, 8, HIDDEN]
    _rejects(
        stub.Backward,
        pb.BackwardRequest(session_id=sid, step=3, grad_output=serde.to_proto(torch.ones(2, 9, HIDDEN))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "grad_output: expected shape [2, 8, 32], got [2, 9, 32]",
        reason="invalid",
    )
    back = stub.Backward(
        pb.BackwardRequest(session_id=sid, step=3, grad_output=serde.to_proto(torch.ones(2, 8, HIDDEN))), timeout=60
    )
    assert list(back.grad_input.shape) == [2, 8, HIDDEN]
    assert list(back.lora_grad.shape) == [n_lora]
    assert torch.isfinite(serde.from_proto(back.lora_grad)).all()
    # The state is consumed: a second backward of the same step is a precondition failure.
    _rejects(
        stub.Backward,
        pb.BackwardRequest(session_id=sid, step=3, grad_output=serde.to_proto(torch.ones(2, 8, HIDDEN))),
        grpc.StatusCode.FAILED_PRECONDITION,
        "no forward of step 3",
        reason="no-step",
    )
    stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=30)
    _rejects(stub.Forward, _fwd(sid, h, lora=torch.zeros(n_lora)), grpc.StatusCode.NOT_FOUND, "does not exist")
    ch.close()

    # The undisturbed run with the same seed gives bit-identical losses.
    assert _train(t, sample_data, seed=11, steps=steps) == losses
    t.close()
    _alive(guarded)


# 2. Memory cap and eviction ------------------------------------------------------------------------
def _step_bytes(model_dir: str) -> int:
    """Forward state one (BATCH, SEQ) training step leaves in the cloud, measured in-process."""
    from tandem.cloud.split import SplitService
    from tandem.stages.loading import load_model
    from tandem.stages.modules import StageLayout

    loaded = load_model(model_dir)
    svc = SplitService(loaded, StageLayout.parse("2:2", loaded.config))
    s = svc.open_session("me", "", LORA, True, "float32")
    n = sum(LORA.rank * (x.in_features + x.out_features) for x in s.slots)
    sizes = set()
    for step in range(2):
        am = torch.ones(BATCH, SEQ, dtype=torch.uint8)
        svc.forward(s, step, torch.randn(BATCH, SEQ, HIDDEN), am, 0, torch.randn(n) * 0.1, step, True)
        sizes.add(svc.store.used_bytes)
    assert len(sizes) == 1, sizes
    return sizes.pop()


def test_memory_cap_evicts_and_client_recomputes(tiny_models, sample_data, server_factory, caplog):
    one = _step_bytes(tiny_models["llama"])
    cap_mb = 1.5 * one / 2**20  # one step fits, two do not
    server = server_factory(tiny_models["llama"], "--memory-cap-mb", f"{cap_mb:.6f}")

    # The protocol: a second session's forward evicts the first's state; its backward is ABORTED/"evicted".
    ch, stub = _raw(server)
    a, b = _open(stub), _open(stub)
    n = _lora_size(a)
    h = torch.randn(BATCH, SEQ, HIDDEN)
    g = serde.to_proto(torch.ones(BATCH, SEQ, HIDDEN))
    stub.Forward(_fwd(a.session_id, h, lora=torch.zeros(n)), timeout=60)
    stub.Forward(_fwd(b.session_id, h, lora=torch.zeros(n)), timeout=60)
    _rejects(
        stub.Backward,
        pb.BackwardRequest(session_id=a.session_id, step=0, grad_output=g),
        grpc.StatusCode.ABORTED,
        "evicted",
        "redo the step's forward",
        reason="evicted",
    )
    _rejects(
        stub.Backward,
        pb.BackwardRequest(session_id=a.session_id, step=0, grad_output=g),
        grpc.StatusCode.FAILED_PRECONDITION,
        "no forward of step 0",
        reason="no-step",
    )
    stub.Backward(pb.BackwardRequest(session_id=b.session_id, step=0, grad_output=g), timeout=60)
    # One step bigger than the whole cap: RESOURCE_EXHAUSTED telling to shrink the batch.
    _rejects(
        stub.Forward,
        _fwd(a.session_id, torch.randn(4, 2 * SEQ, HIDDEN), step=1),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "over the server's cap",
        "--batch-size",
        reason="too-large",
    )
    for s in (a, b):
        stub.CloseSession(pb.CloseSessionRequest(session_id=s.session_id), timeout=30)
    ch.close()

    # The same through the client library: the user sees an actionable ServerError.
    t = Transport(server.transport_cfg(retries=1, backoff_s=0.01))
    m = connect_split(t, LORA, seed=1)
    data = load_split(sample_data, m.tokenizer, seq_len=2 * SEQ, batch_size=4, seed=1, val_fraction=0.1)
    with pytest.raises(ServerError) as ei:
        m.loss(data.batch_at(0), 0, seed=1, train=True)
    assert ei.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and ei.value.reason == "too-large"
    assert "smaller --batch-size" in str(ei.value)
    m.close()

    # Two sessions interleaved: forward A, forward B (evicts A), backward A (evicted -> the client
    # recomputes A's forward, evicting B), backward B (evicted -> recomputed). Losses are unaffected.
    steps, seeds = 3, (1, 2)
    caplog.set_level(logging.WARNING, logger="tandem.client.remote")
    models = [connect_split(t, LORA, seed=s) for s in seeds]
    datas = [
        load_split(sample_data, m.tokenizer, seq_len=SEQ, batch_size=BATCH, seed=s, val_fraction=0.1)
        for m, s in zip(models, seeds)
    ]
    opts = [torch.optim.AdamW(m.adapter.parameters(), lr=5e-2) for m in models]
    interleaved = [[], []]
    for step in range(steps):
        losses = []
        for m, d, o, s in zip(models, datas, opts, seeds):
            o.zero_grad()
            losses.append(m.loss(d.batch_at(step), step, seed=s, train=True)[0])
        for i, loss in enumerate(losses):
            loss.backward()
            interleaved[i].append(float(loss.detach()))
        for o in opts:
            o.step()
    evictions = [r for r in caplog.records if "evicted its forward state" in r.getMessage()]
    assert len(evictions) == 2 * steps, [r.getMessage() for r in caplog.records]
    for m in models:
        m.close()

    # Undisturbed: one session at a time, nothing evicted, the same losses bit for bit.
    caplog.clear()
    for i, s in enumerate(seeds):
        assert _train(t, sample_data, seed=s, steps=steps) == interleaved[i]
    assert not [r for r in caplog.records if "evicted" in r.getMessage()]
    t.close()
    _alive(server)


# 3. Session TTL ------------------------------------------------------------------------------------
def test_idle_session_expires_after_ttl(tiny_models, server_factory):
    server = server_factory(tiny_models["llama"], "--session-ttl", "1")
    ch, stub = _raw(server)
    h = torch.randn(1, 4, HIDDEN)
    idle, busy = _open(stub, remote_lora=False), _open(stub, remote_lora=False)
    assert idle.ttl_s == 1.0
    stub.Forward(_fwd(idle.session_id, h, train=False), timeout=30)
    # A session in use stays open past the TTL; an idle one expires on its next call even though the
    # server's periodic reaper (every 30 s) has not run.
    t_end = time.monotonic() + 2.5
    while time.monotonic() < t_end:
        stub.Forward(_fwd(busy.session_id, h, train=False), timeout=30)
        time.sleep(0.3)
    _rejects(
        stub.Forward,
        _fwd(idle.session_id, h, train=False),
        grpc.StatusCode.NOT_FOUND,
        "expired",
        "open a new session",
        reason="no-session",
    )
    _rejects(
        stub.Backward,
        pb.BackwardRequest(session_id=idle.session_id, step=0, grad_output=serde.to_proto(h)),
        grpc.StatusCode.NOT_FOUND,
        "does not exist",
    )
    out = stub.Forward(_fwd(busy.session_id, h, train=False), timeout=30)
    assert list(out.hidden.shape) == [1, 4, HIDDEN]
    ch.close()

    # Through the client library.
    t = Transport(server.transport_cfg(retries=0))
    sid = t.call("OpenSession", pb.OpenSessionRequest(codec="float32")).session_id
    time.sleep(2.2)
    with pytest.raises(ServerError) as ei:
        t.call("Forward", _fwd(sid, h, train=False))
    assert ei.value.code == grpc.StatusCode.NOT_FOUND and ei.value.reason == "no-session"
    assert "the session is gone" in str(ei.value) and "expired" in str(ei.value)
    t.close()
    _alive(server)


# 4. TLS by default ---------------------------------------------------------------------------------
def test_tls_is_required_and_verified(guarded, tmp_path):
    from tandem.cloud.tls import init_ca

    # Plaintext against the TLS server.
    ch = grpc.insecure_channel(guarded.addr)
    _rejects(pb_grpc.SplitTuningStub(ch).GetInfo, pb.GetInfoRequest(), grpc.StatusCode.UNAVAILABLE)
    ch.close()
    t = Transport(TransportConfig(server=guarded.addr, insecure=True, retries=0))
    with pytest.raises(ServerError) as ei:
        t.call("GetInfo", pb.GetInfoRequest())
    assert ei.value.code == grpc.StatusCode.UNAVAILABLE and "--insecure" in str(ei.value)
    t.close()

    # A CA that did not sign the server's certificate.
    init_ca(str(tmp_path / "other"))
    t = Transport(TransportConfig(server=guarded.addr, ca=str(tmp_path / "other" / "ca.pem"), retries=0))
    with pytest.raises(ServerError) as ei:
        t.call("GetInfo", pb.GetInfoRequest())
    msg = str(ei.value)
    assert ei.value.code == grpc.StatusCode.UNAVAILABLE and ei.value.reason == "tls-handshake"
    assert "the server's certificate is not issued by the trusted CA" in msg and "--ca" in msg, msg
    assert str(tmp_path / "other" / "ca.pem") in msg, msg
    t.close()

    # No CA file at all.
    with pytest.raises(ClientError) as ei:
        Transport(TransportConfig(server=guarded.addr, ca=str(tmp_path / "missing.pem")))
    assert not isinstance(ei.value, ServerError)
    assert "missing.pem" in str(ei.value) and "--ca" in str(ei.value)

    # The right CA works.
    t = Transport(guarded.transport_cfg(retries=0))
    assert t.call("GetInfo", pb.GetInfoRequest()).max_tokens_per_step == 64
    t.close()
    _alive(guarded)


def test_insecure_server_needs_insecure_client(tiny_models, sample_data, server_factory, tmp_path):
    from tandem.cloud.tls import init_ca

    server = server_factory(tiny_models["llama"], insecure=True)
    assert server.ca is None
    assert "PLAINTEXT" in server.log()
    t = Transport(TransportConfig(server=server.addr, insecure=True, retries=0))
    losses = _train(t, sample_data, seed=4, steps=2)
    assert len(losses) == 2 and all(0 < x < 1e3 for x in losses)
    t.close()

    # A TLS client does not silently fall back to plaintext.
    init_ca(str(tmp_path / "ca"))
    t = Transport(TransportConfig(server=server.addr, ca=str(tmp_path / "ca" / "ca.pem"), retries=0))
    with pytest.raises(ServerError) as ei:
        t.call("GetInfo", pb.GetInfoRequest())
    assert ei.value.code == grpc.StatusCode.UNAVAILABLE
    t.close()
    assert server.proc.poll() is None


# 5. No server --------------------------------------------------------------------------------------
def test_no_server_is_unavailable_with_a_hint(tmp_path):
    from tandem.cloud.tls import init_ca

    init_ca(str(tmp_path / "ca"))
    addr = f"127.0.0.1:{free_port()}"
    t = Transport(TransportConfig(server=addr, ca=str(tmp_path / "ca" / "ca.pem"), retries=1, backoff_s=0.05))
    t0 = time.monotonic()
    with pytest.raises(ServerError) as ei:
        t.call("GetInfo", pb.GetInfoRequest())
    assert time.monotonic() - t0 < 10
    msg = str(ei.value)
    assert ei.value.code == grpc.StatusCode.UNAVAILABLE
    assert f"the server at {addr} is not reachable" in msg and "is `cloud serve` running there" in msg, msg
    assert "[UNAVAILABLE:" in msg
    t.close()
