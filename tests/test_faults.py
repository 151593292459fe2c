"""Faults: the cloud killed and restarted mid-run, 8 concurrent clients, fuzzing, SIGTERM drain, abandoned sessions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import grpc
import pytest
import torch

from tandem.client.assemble import connect_split
from tandem.client.data import load_split
from tandem.client.errors import ServerError
from tandem.client.transport import Transport
from tandem.protos import split_pb2 as pb
from tandem.stages.lora import LoraConfig
from tandem.testing.servers import BIN, free_port, metric, start_server


def _tune(server, data, out, steps, seed=7, extra=()):
    return [
        os.path.join(BIN, "client"),
        "tune",
        *server.cli_args(),
        "--data",
        data,
        "--out",
        out,
        "--steps",
        str(steps),
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--no-progress",
        "--seed",
        str(seed),
        "--threads",
        "1",
        *extra,
    ]


def test_cloud_killed_mid_run_and_restarted_gives_identical_run(tiny_models, sample_data, tmp_path):
    tls = str(tmp_path / "tls")
    ref_server = start_server(tiny_models["llama"], tmp_path, tls_dir=tls)
    try:
        r = subprocess.run(_tune(ref_server, sample_data, str(tmp_path / "ref"), 10), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    finally:
        ref_server.stop()

    port, mport = free_port(), free_port()
    args = ("--metrics-port", str(mport))
    server = start_server(tiny_models["llama"], tmp_path, *args, tls_dir=tls, listen=f"127.0.0.1:{port}")
    client = subprocess.Popen(
        _tune(server, sample_data, str(tmp_path / "cut"), 10), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while metric(mport, "tandem_steps_total") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGKILL)  # no drain: a crash
        server.proc.wait()
        time.sleep(1.0)
        server = start_server(tiny_models["llama"], tmp_path, tls_dir=tls, listen=f"127.0.0.1:{port}")
        _, err = client.communicate(timeout=240)
        assert client.returncode == 0, err
        assert "opening a new one" in err  # the client noticed the lost session and reopened it
    finally:
        client.kill()
        server.stop()
    a = json.load(open(tmp_path / "ref" / "report.json"))
    b = json.load(open(tmp_path / "cut" / "report.json"))
    assert [s["loss"] for s in b["steps"]] == [s["loss"] for s in a["steps"]]
    assert b["validation"]["after"]["loss"] == a["validation"]["after"]["loss"]
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_eight_concurrent_clients_train_to_completion(tiny_models, sample_data, server_factory, tmp_path):
    server = server_factory(tiny_models["gpt2"])
    procs = [
        subprocess.Popen(
            _tune(server, sample_data, str(tmp_path / f"c{i}"), 3),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(8)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    reports = [json.load(open(tmp_path / f"c{i}" / "report.json")) for i in range(8)]
    first = [s["loss"] for s in reports[0]["steps"]]
    assert len(first) == 3
    for r in reports[1:]:  # same seed and data: sessions do not disturb each other
        assert [s["loss"] for s in r["steps"]] == first


def test_fuzzed_messages_do_not_disturb_a_training_session(tiny_models, sample_data, server_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    server = server_factory(tiny_models["qwen2"])
    lora = LoraConfig(rank=2, alpha=4)

    def train(steps, hook=None):
        t = Transport(server.transport_cfg())
        sm = connect_split(t, lora, seed=9)
        data = load_split(sample_data, sm.tokenizer, 24, 2, 9, 0.1)
        opt = torch.optim.AdamW(sm.adapter.parameters(), lr=1e-2)
        out = []
        for step in range(steps):
            if hook:
                hook(sm)
            opt.zero_grad()
            loss, _ = sm.loss(data.batch_at(step), step, 9, train=True)
            loss.backward()
            opt.step()
            out.append(float(loss.detach()))
        sm.close()
        t.close()
        return out

    reference = train(4)
    fuzz_t = Transport(server.transport_cfg(retries=0, seal=False))
    victim: dict = {}
    sent = {"n": 0, "codes": set()}
    dtypes = st.sampled_from([pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16, pb.INT8, pb.UINT8, pb.INT64, 0, 17])
    tensors = st.builds(
        lambda shape, dtype, data, codec, block: pb.Tensor(
            shape=shape, dtype=dtype, data=data, codec=codec, block_size=block
        ),
        st.lists(st.integers(-2, 40), max_size=4),
        dtypes,
        st.binary(max_size=512),
        st.integers(0, 6),
        st.integers(-1, 300),
    )

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        kind=st.sampled_from(["fwd", "bwd", "close", "open"]),
        sid=st.sampled_from(["victim", "bogus", ""]),
        step=st.integers(-3, 10**12),
        a=tensors,
        b=tensors,
        train_=st.booleans(),
        lv=st.integers(-5, 5),
    )
    def fuzz(kind, sid, step, a, b, train_, lv):
        sid = victim.get("id", "") if sid == "victim" else sid
        if kind == "fwd":
            req = pb.ForwardRequest(
                session_id=sid, step=step, hidden=a, attention_mask=b, lora_version=lv, train=train_
            )
        elif kind == "bwd":
            req = pb.BackwardRequest(session_id=sid, step=step, grad_output=a)
        elif kind == "close":
            req = pb.CloseSessionRequest(session_id="bogus-" + sid)
        else:
            req = pb.OpenSessionRequest(
                lora=pb.LoraSpec(rank=max(1, lv), target_modules=["q_proj"] if train_ else ["nope"]),
                codec=["float32", "int9", "int8", ""][step % 4],
            )
        method = {"fwd": "Forward", "bwd": "Backward", "close": "CloseSession", "open": "OpenSession"}[kind]
        try:
            resp = getattr(fuzz_t.stub, method)(req, timeout=30)
            if kind == "open":
                fuzz_t.stub.CloseSession(pb.CloseSessionRequest(session_id=resp.session_id), timeout=30)
        except grpc.RpcError as e:
            assert e.code() != grpc.StatusCode.UNKNOWN and e.code() != grpc.StatusCode.INTERNAL, e.details()
            sent["codes"].add(e.code())
        sent["n"] += 1

    # The fuzzer runs while the victim trains: each victim step lets the fuzzer fire at its session id.
    done = threading.Event()

    def fuzzer():
        while "id" not in victim:
            time.sleep(0.01)
        fuzz()
        done.set()

    th = threading.Thread(target=fuzzer)
    th.start()
    disturbed = train(4, hook=lambda sm: victim.setdefault("id", sm.middle.session_id) and time.sleep(0.5))
    th.join(timeout=600)
    assert done.is_set() and sent["n"] >= 300
    assert grpc.StatusCode.INVALID_ARGUMENT in sent["codes"] and grpc.StatusCode.NOT_FOUND in sent["codes"]
    assert disturbed == reference
    assert server.proc.poll() is None and "Traceback" not in server.log()
    assert "PERMISSION_DENIED" not in str(sent["codes"])  # same identity: the fuzzer could touch the victim's session
    fuzz_t.close()


def test_sigterm_stops_cleanly_and_health_reports(tiny_models, server_factory):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = server_factory(tiny_models["gpt2"])
    t = Transport(server.transport_cfg())
    health = health_pb2_grpc.HealthStub(t.channel)
    ok = health.Check(health_pb2.HealthCheckRequest(service="tandem.v1.SplitTuning"), timeout=10)
    assert ok.status == health_pb2.HealthCheckResponse.SERVING
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(30)
    assert server.proc.returncode == 0 and "draining" in server.log()
    t.close()


def test_stop_drains_in_flight_steps(tiny_models):
    """Deterministic drain check in-process: a step in flight at shutdown completes; new calls are refused."""
    from tandem.client.transport import TransportConfig
    from tandem.cloud.server import build_server
    from tandem.cloud.split import SplitService
    from tandem.stages.loading import load_model
    from tandem.stages.modules import StageLayout

    loaded = load_model(tiny_models["gpt2"])
    service = SplitService(loaded, StageLayout(6, 2, 2))
    server, port = build_server(service, "127.0.0.1:0", None)
    entered, release = threading.Event(), threading.Event()
    real = service.forward

    def slow(*a, **k):
        entered.set()
        release.wait(30)
        return real(*a, **k)

    service.forward = slow
    t = Transport(TransportConfig(server=f"127.0.0.1:{port}", insecure=True, seal=False, retries=0))
    sm = connect_split(t, LoraConfig(rank=2), seed=0)
    h = torch.randn(2, 8, 32)
    result = {}
    th = threading.Thread(
        target=lambda: result.setdefault(
            "out", sm.middle.forward_rpc(h, torch.ones(2, 8, dtype=torch.long), 0, 0, train=False)
        )
    )
    th.start()
    assert entered.wait(30)
    stopped = server.stop(grace=30)  # what SIGTERM triggers
    time.sleep(0.2)
    t2 = Transport(TransportConfig(server=f"127.0.0.1:{port}", insecure=True, seal=False, retries=0))
    with pytest.raises(ServerError):
        t2.call("GetInfo", pb.GetInfoRequest())  # no new work is accepted
    release.set()
    th.join(30)
    assert stopped.wait(30)
    assert result["out"].shape == h.shape  # the in-flight step finished
    t.close()
    t2.close()


def test_abandoned_session_frees_memory_after_ttl(tiny_models, server_factory):
    mport = free_port()
    server = server_factory(tiny_models["llama"], "--session-ttl", "1", "--metrics-port", str(mport))
    t = Transport(server.transport_cfg())
    sm = connect_split(t, LoraConfig(rank=2), seed=0)
    h = torch.randn(2, 16, 32)
    sm.middle.forward_rpc(
        h, torch.ones(2, 16, dtype=torch.long), 0, 0, train=True
    )  # state kept for a backward that never comes
    t.call("GetInfo", pb.GetInfoRequest())
    assert metric(mport, "tandem_forward_state_bytes") > 0
    time.sleep(1.5)
    # Any later call (from anyone) expires idle sessions; the client's next call learns its session is gone.
    t2 = Transport(server.transport_cfg())
    connect_split(t2, LoraConfig(rank=2), seed=0)
    assert metric(mport, "tandem_forward_state_bytes") == 0
    assert metric(mport, "tandem_sessions") == 1
    t.close()
    t2.close()
