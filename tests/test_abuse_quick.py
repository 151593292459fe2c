"""bench/abuse.py --quick against a real `cloud serve` (mutual TLS, loopback): a fuzzer over every RPC next to a
legitimate client, clients that vanish mid-step, and a crowd around an oversized batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_abuse_quick_fuzz_vanish_crowd(tmp_path):
    out = tmp_path / "abuse.json"
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "abuse.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.exists(), r.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"fuzz", "vanish", "crowd"}, r.stderr[-3000:]

    fuzz = res["fuzz"]
    assert fuzz["n"] == 300 and fuzz["server_alive"] and fuzz["hangs"] == 0, fuzz["hang_examples"]
    assert fuzz["unknown"] == 0 and fuzz["internal_bugs"] == 0, fuzz["internal_examples"]
    assert fuzz["internal_undecodable"] == 0 and fuzz["status_histogram"].get("INTERNAL", 0) == 0  # cloud/malformed.py
    assert json.loads(out.read_text())["server_log_tracebacks"] == 0
    rpcs = {k.split(" ")[0] for k in fuzz["per_rpc"]}
    assert rpcs == {
        "GetInfo",
        "OpenSession",
        "FetchClientStages",
        "Forward",
        "Backward",
        "CloseSession",
        "GetRemoteState",
        "PutRemoteState",
        "FetchEmulator",
        "PushAdapter",
        "ListAdapters",
        "Generate",
    }
    assert {"INVALID_ARGUMENT", "NOT_FOUND"} <= set(fuzz["status_histogram"])  # refused, with a status that says why
    # The legitimate client trained through it all, with the undisturbed run's losses.
    assert fuzz["legit_runs"] >= 1 and not fuzz["legit_errors"] and fuzz["max_loss_diff"] <= 1e-6
    # After the TTL the server holds nothing for the fuzzer's sessions, and its memory went back (cloud/allocator.py).
    assert fuzz["held_after"] == {"sessions": 0.0, "forward_state_bytes": 0.0}
    assert fuzz["pass"]["rss_back"] and fuzz["pass"]["rss_stable"], fuzz["rss_mib"]

    # Clients that vanished mid-step: their sessions expire and the memory goes back to the OS (within 10%).
    van = res["vanish"]
    assert van["server_alive"] and van["killed_processes"] == 2 and sum(van["outcomes"].values()) == 16
    assert set(van["outcomes"]) <= {"cancel:ok", "after:ok", "killed-process"}, van["outcomes"]  # all got that far
    assert van["held_after"] == {"sessions": 0.0, "forward_state_bytes": 0.0}
    rss = van["rss_mib"]
    assert rss["peak"] > rss["start"] * 1.2, rss  # the sessions really held memory
    assert rss["after"] <= rss["start"] * 1.10, rss

    crowd = res["crowd"]
    assert crowd["server_alive"] and crowd["finished"] == crowd["n"] == 4, crowd["clients"]
    big = next(c for c in crowd["clients"] if c["name"] == "big")
    assert big["steps"] == 2 and crowd["big_tokens"] > 1024  # above --batch-max-tokens, still served


def test_huge_names_get_a_bounded_refusal_from_every_service(tiny_models, server_factory, tmp_path):
    """Found by the fuzzer: PushAdapter and Generate quoted a 300 KB adapter or file name whole in the status details,
    a header over gRPC's 16 KiB limit: the client got RESOURCE_EXHAUSTED 'Stream removed' without a reason instead
    of the refusal. Every service's refusal is one bounded line with its tandem-reason."""
    import grpc

    from tandem.protos import offsite_pb2 as opb
    from tandem.protos import offsite_pb2_grpc as opb_grpc
    from tandem.protos import serving_pb2 as spb
    from tandem.protos import serving_pb2_grpc as spb_grpc
    from tandem.protos import split_pb2 as pb
    from tandem.protos import split_pb2_grpc as pb_grpc
    from tandem.protos.bundle import read_bundle

    server = server_factory(tiny_models["gpt2"], "--adapter-registry", str(tmp_path / "registry"))
    key, cert, ca = read_bundle(server.identity)
    ch = grpc.secure_channel(server.addr, grpc.ssl_channel_credentials(ca, key, cert))
    big = "x" * 300_000
    calls = [
        (opb_grpc.OffsiteTuningStub(ch).PushAdapter, opb.PushAdapterRequest(name=big), "INVALID_ARGUMENT"),
        (
            opb_grpc.OffsiteTuningStub(ch).PushAdapter,
            opb.PushAdapterRequest(name="a", files=[opb.AdapterFile(name=big, data=b"{}")]),
            "INVALID_ARGUMENT",
        ),
        (spb_grpc.AdapterServingStub(ch).Generate, spb.GenerateRequest(adapter=big, prompts=["hi"]), "NOT_FOUND"),
        (pb_grpc.SplitTuningStub(ch).OpenSession, pb.OpenSessionRequest(model_id=big), "INVALID_ARGUMENT"),
    ]
    for fn, req, code in calls:
        with pytest.raises(grpc.RpcError) as e:
            fn(req, timeout=60)
        reason = dict(e.value.trailing_metadata() or ()).get("tandem-reason")
        assert (e.value.code().name, bool(reason)) == (code, True), e.value.details()[:200]
        assert len(e.value.details()) <= 1024 and "xxxxxxxx" in e.value.details()
    ch.close()
