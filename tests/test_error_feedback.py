"""Error feedback for the int8/int4 codecs over real `cloud serve` processes (TLS, sealing): the gradient streams carry
their error on both sides (activations travel plain), the state is per session and restarts with it (a cloud restart equals a deliberate reopen),
and float codecs stay exact."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from tandem.client.assemble import connect_split
from tandem.client.checkpoint import settings
from tandem.client.data import load_split
from tandem.client.errors import ClientError, ServerError
from tandem.client.evaluation import evaluate
from tandem.client.transport import Transport, TransportConfig
from tandem.client.tune_config import TuneConfig
from tandem.protos import serde
from tandem.protos import split_pb2 as pb
from tandem.stages.lora import LoraConfig
from tandem.testing.servers import BIN, free_port, start_server
from tandem.testing.split_runs import train_losses


def _model(server, seed=0, **cfg):
    transport = Transport(server.transport_cfg(**cfg))
    return transport, connect_split(transport, LoraConfig(rank=4, alpha=8), seed=seed)


def _run(server, sample_data, steps, seed=0, before=None, **cfg):
    transport, model = _model(server, seed, **cfg)
    data = load_split(sample_data, model.tokenizer, 24, 2, seed, 0.1)
    try:
        return train_losses(model, data, steps, seed, hook=lambda step: before and before(step, model))
    finally:
        model.close()
        transport.close()


INT4_EF = {"codec": "int4", "error_feedback": True}


def test_gradients_carry_their_error_on_both_sides_and_activations_do_not(tiny_models, server_factory):
    """The same input and output gradient N times: with feedback, the mean of the grad_input that came back
    (computed from the grad_output we sent, sent back by the cloud) tracks the exact one; without it the error
    stays put. The activations carry nothing: the same output every step."""
    server = server_factory(tiny_models["llama"])
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 16, 32, generator=gen) * 3
    h[..., 5] *= 20  # an outlier channel, as activations have
    grad = torch.randn(2, 16, 32, generator=gen) * 1e-3
    mask = torch.ones(2, 16, dtype=torch.long)

    def runs(n, feedback, gradient_codec="int4"):
        transport_cfg = server.transport_cfg(codec="int4", gradient_codec=gradient_codec)
        transport_cfg.error_feedback = feedback  # (float32 gradients: past the client's own check)
        transport = Transport(transport_cfg)
        model = connect_split(transport, LoraConfig(rank=4, alpha=8), seed=0)
        outs, grads = [], []
        try:
            for step in range(n):
                outs.append(model.middle.forward_rpc(h, mask, step, 0, train=True))
                grads.append(model.middle.backward_rpc(step, grad, h, mask, 0)[0])
            assert model.middle.session.error_feedback == feedback
        finally:
            model.close()
            transport.close()
        return torch.stack(outs), torch.stack(grads).mean(0)

    errors = {}
    for feedback in (False, True):
        _, exact = runs(1, feedback, "float32")  # the same int4 activations (rotated with feedback), exact gradients
        outs, mean = runs(16, feedback)
        assert all(torch.equal(out, outs[0]) for out in outs)  # activations carry nothing: the same every step
        errors[feedback] = (mean - exact).norm() / exact.norm()
    assert errors[True] < 0.5 * errors[False], errors


def test_a_cloud_restart_equals_a_deliberate_reopen(tiny_models, sample_data, tmp_path):
    """The state restarts with every session, on both sides: a run whose cloud is killed (SIGKILL) and restarted
    before step 3 has exactly the losses of a run that reopens its session there on a live cloud."""
    tls, port = str(tmp_path / "tls"), free_port()
    servers = [start_server(tiny_models["llama"], tmp_path, tls_dir=tls, listen=f"127.0.0.1:{port}")]
    try:
        plain = _run(servers[0], sample_data, 6, **INT4_EF)
        reopened = _run(servers[0], sample_data, 6, before=lambda step, m: step == 3 and m.middle.reopen(), **INT4_EF)

        def crash(step, model):
            if step == 3:
                servers[-1].proc.send_signal(signal.SIGKILL)
                servers[-1].proc.wait()
                time.sleep(0.5)
                servers.append(start_server(tiny_models["llama"], tmp_path, tls_dir=tls, listen=f"127.0.0.1:{port}"))

        crashed = _run(servers[0], sample_data, 6, before=crash, **INT4_EF)
    finally:
        for server in servers:
            server.stop()
    assert len(servers) == 2  # the cloud did restart
    assert crashed == reopened
    assert crashed[:3] == plain[:3]  # the same run up to the restart
    assert crashed[3:] != plain[3:]  # and the reset changed the rest: the state was there to lose


def test_two_sessions_do_not_share_state(tiny_models, sample_data, server_factory):
    server = server_factory(tiny_models["qwen2"])
    alone = _run(server, sample_data, 4, seed=1, **INT4_EF)
    models = [_model(server, seed, **INT4_EF) for seed in (1, 2)]
    datas = [load_split(sample_data, m.tokenizer, 24, 2, seed, 0.1) for seed, (_, m) in zip((1, 2), models)]
    optimizers = [torch.optim.AdamW(m.adapter.parameters(), lr=1e-2) for _, m in models]
    together = []
    for step in range(4):  # the two sessions' steps interleave on one server
        for i, ((_, model), data, optimizer) in enumerate(zip(models, datas, optimizers)):
            optimizer.zero_grad()
            loss, _ = model.loss(data.batch_at(step), step, (1, 2)[i], train=True)
            loss.backward()
            optimizer.step()
            if i == 0:
                together.append(float(loss.detach()))
    for transport, model in models:
        model.close()
        transport.close()
    assert together == alone


def test_float32_stays_exact(tiny_models, sample_data, server_factory):
    """The client refuses --error-feedback with float codecs; a session that asks anyway (an older or other client)
    is echoed and stays bit-exact (the float streams carry nothing)."""
    with pytest.raises(ValueError, match="--error-feedback needs int8 or int4 gradients"):
        TransportConfig(codec="float32", error_feedback=True)
    with pytest.raises(ValueError, match="--error-feedback needs int8 or int4 gradients"):
        TransportConfig(codec="int4", gradient_codec="float32", error_feedback=True)  # activations carry nothing
    server = server_factory(tiny_models["gpt2"])
    reference = _run(server, sample_data, 3)
    transport_cfg = server.transport_cfg()
    transport_cfg.error_feedback = True  # past the client's own check
    transport = Transport(transport_cfg)
    model = connect_split(transport, LoraConfig(rank=4, alpha=8), seed=0)
    assert model.middle.session.error_feedback
    data = load_split(sample_data, model.tokenizer, 24, 2, 0, 0.1)
    assert train_losses(model, data, 3, 0) == reference
    model.close()
    transport.close()


def test_tune_refuses_error_feedback_without_a_lossy_codec_in_one_line(tmp_path):
    r = subprocess.run(
        [os.path.join(BIN, "client"), "tune", "--data", str(tmp_path), "--error-feedback", "--server", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert "--error-feedback needs int8 or int4 gradients" in r.stderr
    assert "Traceback" not in r.stderr


def test_client_refuses_a_server_that_does_not_echo_error_feedback(tiny_models, server_factory, monkeypatch):
    server = server_factory(tiny_models["llama"])
    transport = Transport(server.transport_cfg(seal=False, **INT4_EF))
    real = transport.call

    def old_server(method, req, **kw):  # answers as a server from before error feedback would: no echo
        resp = real(method, req, **kw)
        if method == "OpenSession":
            resp.ClearField("error_feedback")
        return resp

    monkeypatch.setattr(transport, "call", old_server)
    with pytest.raises(ClientError, match="does not support --error-feedback"):
        connect_split(transport, LoraConfig(rank=2), seed=0)
    transport.close()


def test_error_feedback_is_a_setting_a_resume_must_repeat(tmp_path):
    cfg = TuneConfig(data=str(tmp_path))
    on = settings(cfg, TransportConfig(codec="int4", error_feedback=True), "data")
    off = settings(cfg, TransportConfig(codec="int4"), "data")
    assert on["--error-feedback"] is True and off["--error-feedback"] is False


def test_exact_eval_measures_the_adapter_not_the_codec(tiny_models, sample_data, server_factory):
    """--exact-eval: the validation forwards of an int4 session travel in float32 and give exactly a float32
    session's validation loss; training forwards in float32 stay refused in an int4 session."""
    server = server_factory(tiny_models["llama"])
    losses = {}
    for name, cfg in (
        ("float32", {}),
        ("int4 exact", {"codec": "int4", "exact_eval": True}),
        ("int4", {"codec": "int4"}),
    ):
        transport, model = _model(server, **cfg)
        data = load_split(sample_data, model.tokenizer, 24, 2, 0, 0.1)
        losses[name] = evaluate(model, data, 0)["loss"]
        if name == "int4":
            hidden = serde.encode(torch.zeros(1, 4, 32))  # float32, as training
            req = pb.ForwardRequest(
                session_id=model.middle.session_id,
                step=0,
                hidden=hidden,
                attention_mask=serde.to_proto(torch.ones(1, 4, dtype=torch.uint8)),
                train=True,
            )
            with pytest.raises(ServerError, match="negotiated codec int4, got float32"):
                transport.call("Forward", req, sealer=model.middle.session.sealer, step=0, retry=False)
        model.close()
        transport.close()
    assert losses["int4 exact"] == losses["float32"] != losses["int4"]


@pytest.mark.parametrize(
    ("shape", "says"),
    [([1, 1, 1 << 28], "expected shape \\[batch, seq, "), ([1, 1 << 20, None], "1048576 tokens in one step")],
)
def test_a_declared_shape_is_checked_before_it_is_decoded(shape, says, tiny_models, server_factory):
    """A client declares a huge int4 hidden (or grad_output) in an error-feedback session: refused from the declared
    shape, before decoding (and the rotation of its last dimension) would allocate it."""
    server = server_factory(tiny_models["llama"])
    transport, model = _model(server, seal=False, **INT4_EF)
    hidden = model.config.hidden_size
    declared = pb.Tensor(shape=[d if d is not None else hidden for d in shape], dtype=pb.FLOAT32, codec=pb.CODEC_INT4)
    try:
        forward = pb.ForwardRequest(session_id=model.session.id, step=0, hidden=declared, train=True)
        with pytest.raises(ServerError, match=f"hidden: {says}"):
            transport.call("Forward", forward, retry=False)
        backward = pb.BackwardRequest(session_id=model.session.id, step=0, grad_output=declared)
        with pytest.raises(ServerError, match=f"grad_output: {says}"):
            transport.call("Backward", backward, retry=False)
    finally:
        model.close()
        transport.close()
