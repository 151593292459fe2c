"""One tenant cannot stall, exhaust or leak a real `cloud serve` process.

Every test talks to a real server subprocess over mutual TLS; hostile requests go through a raw stub so
that the client library's own checks cannot hide what the server does with them.
"""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.protos import serde
from tandem.protos import split_pb2 as pb
from tandem.protos import split_pb2_grpc as pb_grpc
from tandem.testing.servers import free_port, metric
from tandem.testing.split_runs import split_losses

HIDDEN = 32  # tandem.testing.models: the tiny models' hidden size


def _raw(server):
    from tandem.protos.bundle import read_bundle

    key, cert, ca = read_bundle(server.identity)
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    ch = grpc.secure_channel(
        server.addr,
        creds,
        options=[("grpc.max_send_message_length", 2**28), ("grpc.max_receive_message_length", 2**28)],
    )
    return ch, pb_grpc.SplitTuningStub(ch)


def _open(stub, remote_lora=False, rank=4, **kw) -> pb.OpenSessionResponse:
    return stub.OpenSession(
        pb.OpenSessionRequest(lora=pb.LoraSpec(rank=rank, alpha=8), remote_lora=remote_lora, codec="float32", **kw),
        timeout=30,
    )


def _fwd(sid, h, step=0, train=True, **kw) -> pb.ForwardRequest:
    mask = torch.ones(h.shape[:2], dtype=torch.uint8)
    return pb.ForwardRequest(
        session_id=sid,
        step=step,
        dropout_seed=1,
        train=train,
        hidden=serde.to_proto(h),
        attention_mask=serde.to_proto(mask),
        **kw,
    )


def _health(ch) -> int:
    req = health_pb2.HealthCheckRequest(service="tandem.v1.SplitTuning")
    return health_pb2_grpc.HealthStub(ch).Check(req, timeout=10).status


def _in_threads(fns, timeout=300):
    res, ths = {}, []
    for i, fn in enumerate(fns):

        def run(i=i, fn=fn):
            try:
                res[i] = fn()
            except BaseException as e:  # noqa: BLE001 - checked by the caller
                res[i] = e

        ths.append(threading.Thread(target=run, daemon=True))
        ths[-1].start()
    return ths, res


# 1. A request over --batch-max-tokens but within the step limit ----------------------------------------
def test_an_oversized_legal_forward_runs_alone_while_others_train(tiny_models, sample_data, server_factory):
    server = server_factory(tiny_models["llama"])
    ch, stub = _raw(server)
    big, _other = _open(stub), _open(stub)  # two sessions open: forwards go through the batching worker
    ths, res = _in_threads([lambda s=s: split_losses(server.transport_cfg(), sample_data, s, 4) for s in (1, 2)])
    h = torch.randn(136, 128, HIDDEN)  # 17,408 tokens: over --batch-max-tokens 16,384, under the 65,536 step limit
    out = stub.Forward(_fwd(big.session_id, h), timeout=120)
    assert list(out.hidden.shape) == [136, 128, HIDDEN]
    back = stub.Backward(
        pb.BackwardRequest(session_id=big.session_id, step=0, grad_output=serde.to_proto(torch.ones_like(h))),
        timeout=120,
    )
    assert list(back.grad_input.shape) == [136, 128, HIDDEN]
    for th in ths:
        th.join(300)
    for i in (0, 1):
        assert isinstance(res[i], list) and len(res[i]) == 4 and all(0 < x < 1e3 for x in res[i]), res[i]
    assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
    ch.close()
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0 and time.monotonic() - t0 < 15
    assert "Traceback" not in server.log()


# 2. Dropped forward state is really freed ----------------------------------------------------------------
def _status_mb(pid: int, key: str) -> float:
    """A size line of /proc/PID/status in MiB: VmRSS (resident now) or VmHWM (its peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key}")


def _rss_mb(pid: int) -> float:
    return _status_mb(pid, "VmRSS")


def test_forward_state_without_backward_is_freed(tiny_models, server_factory, monkeypatch):
    """Training forwards whose backward never comes (superseded, closed, expired) give their memory back."""
    # A fixed mmap threshold: freed tensors go back to the system at once, so RSS shows what is really held.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    mport = free_port()
    server = server_factory(tiny_models["llama"], "--session-ttl", "4", "--metrics-port", str(mport))
    pid = server.proc.pid
    ch, stub = _raw(server)
    h = torch.randn(48, 256, HIDDEN)  # 12,288 tokens: each graph keeps ~30 MB of activations

    def forwards(sids, steps):
        for step in steps:  # each forward of a session supersedes its last one: one graph per session held
            for sid in sids:
                stub.Forward(_fwd(sid, h, step=step), timeout=120)

    def close(*sids):
        for sid in sids:
            stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=30)

    warm = _open(stub).session_id  # the first round sizes the allocator's pools: measure from after it
    forwards([warm], range(3))
    graph = metric(mport, "tandem_forward_state_bytes") / 2**20
    assert graph > 20, f"one graph should hold tens of MB, the server counts {graph:.0f} MB"
    close(warm)
    base = _rss_mb(pid)  # the allocator's noise is about one graph: a leak here is one graph per forward

    a = _open(stub).session_id
    forwards([a], range(10))
    held = _rss_mb(pid) - base
    assert held < 3 * graph, (
        f"superseded graphs kept: {held:.0f} MB held after 10 forwards; one graph is {graph:.0f} MB"
    )
    close(a)
    left = _rss_mb(pid) - base
    assert left < 2 * graph, f"CloseSession left {left:.0f} MB; one graph is {graph:.0f} MB"

    # Two sessions: forwards go through the batching worker (a Group per pass); then one session expires.
    b, c = _open(stub).session_id, _open(stub).session_id
    forwards([b, c], range(6))
    held = _rss_mb(pid) - base
    assert held < 6 * graph, f"batched: 12 forwards of 2 sessions hold {held:.0f} MB; one graph is {graph:.0f} MB"
    close(b)
    time.sleep(4.5)  # c idles past its TTL; the next OpenSession expires it
    close(_open(stub).session_id)
    assert metric(mport, "tandem_forward_state_bytes") == 0 and metric(mport, "tandem_sessions") == 0
    left = _rss_mb(pid) - base
    assert left < 2 * graph, f"closed and expired sessions left {left:.0f} MB; one graph is {graph:.0f} MB"
    ch.close()


# 3. Admission before compute; adapters inside the memory cap; per-identity session quota ------------------
def _peak_mb(pid: int) -> float:
    return _status_mb(pid, "VmHWM")


def _code_reason(call, req):
    with pytest.raises(grpc.RpcError) as ei:
        call(req, timeout=60)
    e = ei.value
    return e.code(), dict(e.trailing_metadata() or ()).get("tandem-reason", ""), e.details()


def test_a_forward_over_the_memory_cap_is_refused_before_it_runs(tiny_models, server_factory, monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    server = server_factory(tiny_models["llama"], "--memory-cap-mb", "16")
    ch, stub = _raw(server)
    info = _open(stub, remote_lora=True)
    sid, n_lora = info.session_id, sum(4 * (x.in_features + x.out_features) for x in info.middle_slots)
    h = torch.randn(8, 64, HIDDEN)  # a step that fits: state ~2 MB
    stub.Forward(_fwd(sid, h, lora=serde.to_proto(torch.zeros(n_lora))), timeout=60)
    peak0 = _peak_mb(server.proc.pid)
    big = torch.randn(256, 256, HIDDEN)  # 65,536 tokens (the step limit): ~200 MB of state if it ran
    code, reason, details = _code_reason(stub.Forward, _fwd(sid, big, step=1, lora_version=0))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason == "too-large", details
    assert "estimated" in details and "over the server's cap of 16.00 MiB" in details, details
    grew = _peak_mb(server.proc.pid) - peak0
    assert grew < 64, f"the refused forward ran anyway: the server's peak RSS grew {grew:.0f} MB"
    ch.close()


def test_a_padded_forward_is_estimated_with_its_mask(tiny_models, server_factory):
    """One padded token makes the attention keep a (batch, seq, seq) mask per block: the estimate must include it."""
    server = server_factory(tiny_models["llama"], "--memory-cap-mb", "72")
    ch, stub = _raw(server)
    sid = _open(stub).session_id
    h = torch.randn(64, 256, HIDDEN)  # unpadded: ~57 MB of state, admitted and kept
    stub.Forward(_fwd(sid, h), timeout=120)
    padded = _fwd(sid, h, step=1)
    mask = torch.ones(64, 256, dtype=torch.uint8)
    mask[:, :100] = 0  # left padding: ~89 MB of state if it ran
    padded.attention_mask.CopyFrom(serde.to_proto(mask))
    code, reason, details = _code_reason(stub.Forward, padded)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason == "too-large", details
    assert "estimated" in details, f"refused only after the compute ran: {details}"
    ch.close()


def test_lora_rank_and_cloud_optimizer_state_count_against_the_cap(tiny_models, server_factory):
    server = server_factory(tiny_models["llama"], "--memory-cap-mb", "16", "--max-lora-rank", "4096")
    ch, stub = _raw(server)
    code, reason, details = _code_reason(
        stub.OpenSession, pb.OpenSessionRequest(lora=pb.LoraSpec(rank=30000, alpha=8), remote_lora=True)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "--max-lora-rank" in details and "30000" in details, details
    opt = pb.AdamW(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    req = pb.OpenSessionRequest(lora=pb.LoraSpec(rank=2048, alpha=8), remote_lora=True, cloud_optimizer=opt)
    first = stub.OpenSession(req, timeout=30)
    per = 4 * 2048 * sum(s.in_features + s.out_features for s in first.middle_slots) * 3  # LoRA + 2 AdamW moments
    fit = int(16 * 2**20 // per)
    assert 1 <= fit < 8, f"each session holds {per / 2**20:.1f} MiB; the test needs a few to fill 16 MiB"
    opened = [first.session_id] + [stub.OpenSession(req, timeout=30).session_id for _ in range(fit - 1)]
    code, reason, details = _code_reason(stub.OpenSession, req)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason == "overloaded", details
    assert "held by other sessions' adapters" in details, details
    stub.CloseSession(pb.CloseSessionRequest(session_id=opened.pop()), timeout=30)
    opened.append(stub.OpenSession(req, timeout=30).session_id)  # the room came back
    for sid in opened:
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=30)
    ch.close()


def test_one_identity_holds_at_most_eight_sessions_by_default(tiny_models, server_factory):
    server = server_factory(tiny_models["gpt2"])
    ch, stub = _raw(server)
    sids = [_open(stub).session_id for _ in range(8)]
    code, reason, details = _code_reason(stub.OpenSession, pb.OpenSessionRequest(lora=pb.LoraSpec(rank=4)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason == "overloaded" and "quota of 8 sessions" in details
    stub.CloseSession(pb.CloseSessionRequest(session_id=sids[0]), timeout=30)
    _open(stub)
    ch.close()


# 4. Every refusal is a bounded, reasoned status and one log line ----------------------------------------
def test_hostile_messages_get_bounded_reasoned_errors(tiny_models, server_factory):
    server = server_factory(tiny_models["llama"])
    ch, stub = _raw(server)
    info = _open(stub, remote_lora=True)
    sid, inv = info.session_id, grpc.StatusCode.INVALID_ARGUMENT
    h = torch.randn(2, 8, HIDDEN)
    lora = lambda **kw: pb.OpenSessionRequest(lora=pb.LoraSpec(**{"rank": 4, "alpha": 8, **kw}), remote_lora=True)  # noqa: E731
    cases = [
        (
            "no LoRA sent yet, version -1",
            stub.Forward,
            _fwd(sid, h, lora_version=-1),
            grpc.StatusCode.FAILED_PRECONDITION,
            "lora-missing",
            "no remote LoRA",
        ),
        (
            "zero-element shape with overflowing dims",
            stub.Forward,
            pb.ForwardRequest(
                session_id=sid,
                hidden=pb.Tensor(shape=[2**62, 2**62, 0], dtype=pb.FLOAT32),
                attention_mask=serde.to_proto(torch.ones(2, 8, dtype=torch.uint8)),
            ),
            inv,
            "invalid",
            "expected shape [batch, seq, 32], got [4611686018427387904, 4611686018427387904, 0]",  # before decoding
        ),
        (
            "100 kB target module",
            stub.OpenSession,
            lora(target_modules=["q" * 100_000]),
            inv,
            "invalid",
            "do not exist",
        ),
        (
            "20 MB model id",
            stub.OpenSession,
            pb.OpenSessionRequest(model_id="m" * 20_000_000),
            inv,
            "invalid",
            "not 'mmm",
        ),
        ("100 kB codec", stub.OpenSession, pb.OpenSessionRequest(codec="c" * 100_000), inv, "invalid", "not supported"),
        ("alpha NaN", stub.OpenSession, lora(alpha=float("nan")), inv, "invalid", "alpha"),
        ("alpha Inf", stub.OpenSession, lora(alpha=float("inf")), inv, "invalid", "alpha"),
        ("alpha 1e38", stub.OpenSession, lora(alpha=1e38), inv, "invalid", "alpha"),
        ("dropout 1", stub.OpenSession, lora(dropout=1.0), inv, "invalid", "dropout"),
        ("dropout -0.5", stub.OpenSession, lora(dropout=-0.5), inv, "invalid", "dropout"),
        ("dropout NaN", stub.OpenSession, lora(dropout=float("nan")), inv, "invalid", "dropout"),
        ("rank -3", stub.OpenSession, lora(rank=-3), inv, "invalid", "rank"),
        (
            "1000 targets",
            stub.OpenSession,
            lora(target_modules=["q_proj"] * 1000),
            inv,
            "invalid",
            "--max-lora-targets",
        ),
    ]
    lines = len(server.log().splitlines())
    for label, call, req, code, reason, needle in cases:
        got, why, details = _code_reason(call, req)
        assert (got, why) == (code, reason), f"{label}: {got.name} {why!r}: {details[:300]}"
        assert needle in details and len(details) <= 1024, f"{label}: {details[:300]}"
    log = server.log()
    assert "Traceback" not in log and len(log.splitlines()) - lines <= len(cases), log[-3000:]
    assert max(len(line) for line in log.splitlines()) < 1000
    ch.close()


def test_an_unexpected_failure_is_internal_with_a_reason_and_one_log_line(tiny_models, caplog):
    """In-process (the failure is forced): a handler bug gives INTERNAL, reason 'internal', one log line, no UNKNOWN."""
    import logging

    from tandem.client.transport import CHANNEL_OPTIONS
    from tandem.cloud.server import build_server
    from tandem.cloud.split import SplitService
    from tandem.stages.loading import load_model
    from tandem.stages.modules import StageLayout

    loaded = load_model(tiny_models["gpt2"])
    service = SplitService(loaded, StageLayout(6, 2, 2), serve_client_files=False)
    server, port = build_server(service, "127.0.0.1:0", None)
    ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    stub = pb_grpc.SplitTuningStub(ch)
    sid = _open(stub).session_id

    def broken(*a, **k):
        raise KeyError("secret-looking internals " * 100)

    service.forward = broken
    caplog.set_level(logging.INFO, logger="tandem.cloud.status")
    code, reason, details = _code_reason(stub.Forward, _fwd(sid, torch.randn(1, 4, HIDDEN)))
    assert code == grpc.StatusCode.INTERNAL and reason == "internal", (code, details)
    assert "secret-looking" not in details
    mine = [r for r in caplog.records if r.name == "tandem.cloud.status"]
    assert len(mine) == 1 and "KeyError" in mine[0].getMessage() and not mine[0].exc_info, [
        r.getMessage() for r in mine
    ]
    ch.close()
    server.stop(0)


# 5. Slow readers ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A Llama of hidden size 256: its client stages (~17 MB) cannot sit in a stalled reader's flow-control window."""
    from tandem.testing.models import make_model

    return make_model("llama", str(tmp_path_factory.mktemp("wide")), hidden=256)


def test_unread_downloads_do_not_freeze_the_server(wide_model, server_factory):
    """Ten readers that never read (the server has 8 workers): four streams run, six are refused, health and
    training calls still answer at once, and the stalled streams are cancelled at their deadline."""
    server = server_factory(wide_model, "--download-timeout", "8")
    chans = [_raw(server) for _ in range(10)]
    ch0, stub0 = chans[0]
    sid, other = _open(stub0).session_id, _open(stub0).session_id
    req = pb.FetchClientStagesRequest(session_id=sid)
    calls = [stub.FetchClientStages(req, timeout=120) for _, stub in chans]
    t0 = time.monotonic()
    deadline = time.monotonic() + 5
    while sum(c.done() for c in calls) < 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    refused = [c for c in calls if c.done()]
    assert len(refused) == 6, f"{len(refused)} downloads refused; the server runs 4 at once"
    for c in refused:
        assert c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "maximum of 4 downloads" in c.details()
        assert dict(c.trailing_metadata())["tandem-reason"] == "overloaded"
    t1 = time.monotonic()
    assert _health(ch0) == health_pb2.HealthCheckResponse.SERVING
    out = stub0.Forward(_fwd(other, torch.randn(1, 8, 256), train=False), timeout=30)
    assert list(out.hidden.shape) == [1, 8, 256] and time.monotonic() - t1 < 20
    # At their 8 s deadline the server cancels the stalled streams, freeing their slots and workers: a reader
    # that reads then gets everything (before, it would have been refused like the six).
    time.sleep(max(0.0, 9.5 - (time.monotonic() - t0)))
    chunks = list(stub0.FetchClientStages(req, timeout=60))
    sizes = {}
    for ck in chunks:
        sizes[ck.name] = sizes.get(ck.name, 0) + len(ck.data)
        assert ck.total_bytes >= sizes[ck.name]
    assert sizes["client_stages.safetensors"] > 8 * 2**20
    for ch, _ in chans:
        ch.close()


def test_unread_emulator_downloads_do_not_freeze_the_server(wide_model, server_factory, tmp_path):
    """FetchEmulator streams take the same download slots: ten tenants' readers that never read leave health
    checks and training calls answering (before, none was refused: each held a worker thread until its reader left)."""
    from tandem.emulator.build import build_emulator
    from tandem.emulator.distill import DistillConfig
    from tandem.protos import offsite_pb2, offsite_pb2_grpc

    pkg = str(tmp_path / "pkg")
    build_emulator(wide_model, "2:2", pkg, None, DistillConfig(steps=0), keep=1)
    server = server_factory(wide_model, "--emulator", pkg, "--download-timeout", "8")
    chans = [_raw(server) for _ in range(10)]
    ch0, stub0 = chans[0]
    sid = _open(stub0).session_id
    calls = [
        offsite_pb2_grpc.OffsiteTuningStub(ch).FetchEmulator(offsite_pb2.FetchEmulatorRequest(), timeout=120)
        for ch, _ in chans
    ]
    deadline = time.monotonic() + 5
    while sum(c.done() for c in calls) < 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    refused = [c for c in calls if c.done()]
    assert len(refused) == 6, f"{len(refused)} emulator downloads refused; the server runs 4 downloads at once"
    assert all(
        c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "maximum of 4 downloads" in c.details() for c in refused
    )
    t1 = time.monotonic()
    assert _health(ch0) == health_pb2.HealthCheckResponse.SERVING
    out = stub0.Forward(_fwd(sid, torch.randn(1, 8, 256), train=False), timeout=30)
    assert list(out.hidden.shape) == [1, 8, 256] and time.monotonic() - t1 < 20
    for ch, _ in chans:
        ch.close()


def test_forwards_in_flight_reserve_their_estimate():
    """Concurrent training forwards are admitted against memory the others have not yet claimed: each admitted
    forward holds its estimate until its state is stored (or it fails), so N workers cannot each take the cap."""
    from tandem.cloud.errors import Overloaded, TooLarge
    from tandem.cloud.sessions import Pending, SessionStore, StoreConfig
    from tandem.stages.lora import LoraConfig

    mib = 2**20
    store = SessionStore(StoreConfig(memory_bytes=100 * mib, max_sessions_per_identity=0))
    a, b, c = (store.open(name, LoraConfig(rank=4), [], False, "float32") for name in "abc")
    store.admit(a, 0, 60 * mib)  # a computes...
    with pytest.raises(Overloaded, match="in flight"):
        store.admit(b, 0, 60 * mib)  # ...so b may not count on the same 60 MiB
    store.admit(c, 0, 30 * mib)  # what is left still admits
    with pytest.raises(TooLarge):
        store.admit(b, 0, 101 * mib)  # never fits: too large, not a retry
    store.unreserve(c, 0)  # c failed: its reservation is given back
    store.put(a, 0, Pending(None, torch.zeros(1), [], 50 * mib))  # a stored its real state, replacing the estimate
    assert store.used_bytes == 50 * mib
    store.admit(b, 0, 45 * mib)  # 50 held + 45 reserved fit
    store.admit(c, 1, 10 * mib)  # 50 + 45 + 10 > 100: a's stored state (least recently used) is evicted for it
    assert 0 in a.evicted and store.used_bytes == 0
    with pytest.raises(Overloaded, match="in flight"):
        store.admit(a, 1, 50 * mib)  # 45 + 10 reserved by forwards still running, nothing left to evict
    store.put(b, 0, Pending(None, torch.zeros(1), [], 45 * mib))
    store.unreserve(c, 1)
    store.admit(a, 1, 50 * mib)  # b's real state + a's estimate fit once c gave its reservation back


def test_a_session_closed_while_its_request_runs_leaves_nothing_counted():
    """A tenant closes its session while its own Forward computes (or its Backward encodes): what the request then
    tries to count (forward state, error-feedback residuals, a KV cache) is refused, and the cap stays whole."""
    from tandem.cloud.errors import SessionNotFound
    from tandem.cloud.sessions import Pending, SessionStore, StoreConfig
    from tandem.stages.lora import LoraConfig

    mib = 2**20
    store = SessionStore(StoreConfig(memory_bytes=100 * mib, max_sessions_per_identity=0))
    mallory, alice = (store.open(name, LoraConfig(rank=4), [], False, "float32") for name in ("mallory", "alice"))
    store.admit(mallory, 0, 60 * mib)  # mallory's forward computes...
    store.close(mallory)  # ...while mallory closes the session
    with pytest.raises(SessionNotFound, match="closed while this request ran"):
        store.put(mallory, 0, Pending(None, torch.zeros(1), [], 60 * mib))
    with pytest.raises(SessionNotFound):
        store.hold(mallory, 30 * mib)
    with pytest.raises(SessionNotFound):
        store.admit(mallory, 1, 10 * mib)
    assert store.used_bytes == 0
    store.admit(alice, 0, 99 * mib)  # the whole cap is still there for others
    store.put(alice, 0, Pending(None, torch.zeros(1), [], 99 * mib))
    assert store.used_bytes == 99 * mib
