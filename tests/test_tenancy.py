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

from conftest import split_losses

HIDDEN = 32  # tests/tiny.py


def _raw(server):
    from tandem.protos.bundle import read_bundle

    key, cert, ca = read_bundle(server.identity)
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    ch = grpc.secure_channel(server.addr, creds, options=[("grpc.max_send_message_length", 2**28),
                                                          ("grpc.max_receive_message_length", 2**28)])
    return ch, pb_grpc.SplitTuningStub(ch)


def _open(stub, remote_lora=False, rank=4, **kw) -> pb.OpenSessionResponse:
    return stub.OpenSession(pb.OpenSessionRequest(lora=pb.LoraSpec(rank=rank, alpha=8), remote_lora=remote_lora,
                                                  codec="float32", **kw), timeout=30)


def _fwd(sid, h, step=0, train=True, **kw) -> pb.ForwardRequest:
    mask = torch.ones(h.shape[:2], dtype=torch.uint8)
    return pb.ForwardRequest(session_id=sid, step=step, dropout_seed=1, train=train, hidden=serde.to_proto(h),
                             attention_mask=serde.to_proto(mask), **kw)


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
    ths, res = _in_threads([lambda s=s: split_losses(server.tcfg(), sample_data, s, 4) for s in (1, 2)])
    h = torch.randn(136, 128, HIDDEN)  # 17,408 tokens: over --batch-max-tokens 16,384, under the 65,536 step limit
    out = stub.Forward(_fwd(big.session_id, h), timeout=120)
    assert list(out.hidden.shape) == [136, 128, HIDDEN]
    back = stub.Backward(pb.BackwardRequest(session_id=big.session_id, step=0,
                                            grad_output=serde.to_proto(torch.ones_like(h))), timeout=120)
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
