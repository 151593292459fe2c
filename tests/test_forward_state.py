"""Forward state modes (`cloud serve --forward-state`): recompute keeps only the middle's input, reruns the forward
at backward bit-exact with keep mode, and admission counts each mode's own state."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tandem.client.assemble import connect_split
from tandem.client.data import load_split
from tandem.client.errors import ServerError
from tandem.client.session import open_session
from tandem.client.trainer import ADAMW
from tandem.client.transport import Transport
from tandem.cloud.admission import (
    RECOMPUTE_OVERHEAD_BYTES,
    AdapterShape,
    recompute_bytes,
    resolve_mode,
)
from tandem.cloud.split import SplitService
from tandem.protos import serde
from tandem.protos import split_pb2 as pb
from tandem.stages.loading import load_model
from tandem.stages.lora import LoraConfig, flatten, slot_shapes
from tandem.stages.modules import StageLayout
from tandem.testing.models import ARCHS
from tandem.testing.servers import free_port, metric

DROPOUT_LORA = LoraConfig(rank=4, alpha=8, dropout=0.1)
# Batched servers wait long for the other session, so both modes batch the same members in the same order.
BATCHING = ("--batch-window-ms", "3000", "--batch-backward-wait-ms", "20000")


def _serve(server_factory, model_dir, mode, *extra):
    port = free_port()
    server = server_factory(model_dir, "--forward-state", mode, "--metrics-port", str(port), *extra)
    return server, port


def _record(server, data_dir, seed, steps, ready=None, gate=None, cloud_optimizer=None):
    """A split client's steps (dropout on): its losses and, in order, every output, grad_input and remote-LoRA
    gradient the cloud returned. `ready` (a barrier) is passed once connected; `gate(step)` runs before a Forward."""
    transport = Transport(server.transport_cfg())
    model = connect_split(transport, DROPOUT_LORA, seed=seed, cloud_optimizer=cloud_optimizer)
    data = load_split(data_dir, model.tokenizer, 24, 2, seed, 0.1)
    remote, seen = model.middle, []
    forward_rpc, backward_rpc = remote.forward_rpc, remote.backward_rpc

    def forward(h, mask, step, step_seed, train, force_lora=False):
        if gate is not None:
            gate(step)
        out = forward_rpc(h, mask, step, step_seed, train, force_lora)
        seen.append(out.clone())
        return out

    def backward(step, grad_out, h, mask, step_seed):
        grad_in, grads = backward_rpc(step, grad_out, h, mask, step_seed)
        seen.extend([grad_in.clone(), *(g.clone() for g in grads if g is not None)])
        return grad_in, grads

    remote.forward_rpc, remote.backward_rpc = forward, backward
    if ready is not None:
        ready.wait(120)
    optimizer = torch.optim.AdamW(model.adapter.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        loss, _ = model.loss(data.batch_at(step), step, seed, train=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.close()
    transport.close()
    return losses, seen


def _two_clients(server, data_dir, steps):
    """Two clients at once; the second's every Forward is sent 0.5 s after the first's (a fixed batch order)."""
    sent = [threading.Event() for _ in range(steps)]
    ready, results, errors = threading.Barrier(2), {}, []

    def second_gate(step):
        sent[step].wait(60)
        time.sleep(0.5)

    def run(seed, gate):
        try:
            results[seed] = _record(server, data_dir, seed, steps, ready=ready, gate=gate)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            ready.abort()

    threads = [
        threading.Thread(target=run, args=(1, lambda step: sent[step].set())),
        threading.Thread(target=run, args=(2, second_gate)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    return results


def _assert_same(got, want):
    (losses, seen), (want_losses, want_seen) = got, want
    assert losses == want_losses
    assert len(seen) == len(want_seen) > 0
    for a, b in zip(seen, want_seen):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("batching", [False, True], ids=["unbatched", "batched"])
@pytest.mark.parametrize("arch", ARCHS)
def test_recompute_is_bit_exact_with_keep(arch, batching, tiny_models, sample_data, server_factory):
    """Real servers, one per mode: losses, outputs, grad_input and LoRA gradients equal bit for bit, dropout on."""
    extra = BATCHING if batching else ("--no-batching",)
    runs, ports = {}, {}
    for mode in ("keep", "recompute"):
        server, ports[mode] = _serve(server_factory, tiny_models[arch], mode, *extra)
        if batching:
            runs[mode] = _two_clients(server, sample_data, 3)
        else:
            runs[mode] = {1: _record(server, sample_data, 1, 3)}
        assert metric(ports[mode], "tandem_forward_state_bytes") == 0, "every step's state is released"
        if batching:
            assert metric(ports[mode], "tandem_batched_requests") >= 2 * metric(ports[mode], "tandem_batched_passes")
        server.stop()
    for seed, want in runs["keep"].items():
        _assert_same(runs["recompute"][seed], want)


def test_recompute_with_the_cloud_optimizer_is_bit_exact(tiny_models, sample_data, server_factory):
    """The cloud applies AdamW after each rerun backward; `auto` (the default) keeps on the CPU."""
    runs = {}
    for mode, resolved in (("auto", "keep"), ("recompute", "recompute")):
        server, _ = _serve(server_factory, tiny_models["qwen2"], mode)
        assert f"forward state: {resolved}" in server.log()
        runs[resolved] = _record(server, sample_data, 3, 3, cloud_optimizer=ADAMW)
        server.stop()
    _assert_same(runs["recompute"], runs["keep"])


def _forward(transport, session, step, hidden, mask):
    req = pb.ForwardRequest(
        session_id=session.id,
        step=step,
        hidden=serde.encode(hidden, "float32"),
        attention_mask=serde.to_proto(mask),
        train=True,
    )
    return transport.call("Forward", req, kind="Forward", sealer=session.sealer, step=step)


def _backward(transport, session, step, grad):
    req = pb.BackwardRequest(session_id=session.id, step=step, grad_output=serde.encode(grad, "float32"))
    return transport.call("Backward", req, kind="Backward", sealer=session.sealer, step=step)


def test_admission_counts_the_modes_own_state(tiny_models, server_factory):
    """One memory cap: a few pending keep-mode steps fill it (the older ones are evicted) and a big step is
    refused before it runs; recompute mode holds every session's step, takes the big one, and reports exactly
    the inputs' bytes."""
    model_dir = tiny_models["llama"]
    loaded = load_model(model_dir)
    service = SplitService(loaded, StageLayout.parse("2:2", loaded.config), serve_client_files=False)
    hidden_size, (b, t) = service.hidden_size, (2, 64)
    keep = service.state_model.estimate("keep", b, t, False, AdapterShape())
    one = service.state_model.estimate("recompute", b, t)
    assert one == recompute_bytes(b, t, hidden_size, 4) == b * t * hidden_size * 4 + b * t + RECOMPUTE_OVERHEAD_BYTES
    assert keep > 10 * one
    cap = 3.5 * keep
    sessions = 8
    gen = torch.Generator().manual_seed(0)
    hidden = [torch.randn(b, t, hidden_size, generator=gen) for _ in range(sessions)]
    mask = torch.ones(b, t, dtype=torch.uint8)
    survived, held = {}, {}
    for mode in ("keep", "recompute"):
        server, port = _serve(
            server_factory,
            model_dir,
            mode,
            "--no-batching",
            "--memory-cap-mb",
            str(cap / 2**20),
        )
        transport = Transport(server.transport_cfg(retries=0))
        opened = [open_session(transport, LoraConfig(rank=4, alpha=8), remote_lora=False) for _ in range(sessions)]
        for session, h in zip(opened, hidden):
            _forward(transport, session, 0, h, mask)
        held[mode] = metric(port, "tandem_forward_state_bytes")
        survived[mode] = 0
        for session, h in zip(opened, hidden):
            try:
                resp = _backward(transport, session, 0, h)
                survived[mode] += 1
                assert serde.decode(resp.grad_input, "grad_input", "float32", (b, t, hidden_size)).shape == (
                    b,
                    t,
                    hidden_size,
                )
            except ServerError as e:
                assert mode == "keep" and e.reason == "evicted", e
        big = torch.randn(8, t, hidden_size, generator=gen)  # 4x the step: over the cap in keep mode
        try:
            _forward(transport, opened[0], 1, big, torch.ones(8, t, dtype=torch.uint8))
            assert mode == "recompute", "keep mode must refuse a step over the cap before it runs"
            assert metric(port, "tandem_forward_state_bytes") == recompute_bytes(8, t, hidden_size, 4)
        except ServerError as e:
            assert mode == "keep" and e.reason == "too-large", e
        transport.close()
        server.stop()
    assert 1 <= survived["keep"] <= 4 and survived["recompute"] == sessions
    assert 0 < held["keep"] <= cap
    assert held["recompute"] == sessions * one


def test_the_modes_and_their_checks():
    assert resolve_mode("auto", "cpu") == "keep" and resolve_mode("auto", "cuda:0") == "recompute"
    assert resolve_mode("recompute", "cpu") == "recompute"
    with pytest.raises(ValueError, match="forward state mode"):
        resolve_mode("hold", "cpu")


def _service(model_dir, mode, **store):
    from tandem.cloud.batching import BatchingConfig
    from tandem.cloud.sessions import StoreConfig

    loaded = load_model(model_dir)
    batching = BatchingConfig(window_ms=1000, backward_wait_ms=30)
    layout = StageLayout.parse("2:2", loaded.config)
    return SplitService(
        loaded,
        layout,
        StoreConfig(**store),
        serve_client_files=False,
        batching=batching,
        forward_state=mode,
    )


def _in_order(calls):
    """Starts each call 0.2 s after the previous one (so they queue in order) and returns their results."""
    results = [None] * len(calls)

    def run(i):
        results[i] = calls[i]()

    threads = []
    for i in range(len(calls)):
        threads.append(threading.Thread(target=run, args=(i,)))
        threads[-1].start()
        time.sleep(0.2)
    for thread in threads:
        thread.join(120)
    return results


def _late_member_run(model_dir, mode: str, lora: LoraConfig, seed: int):
    """Two sessions' forwards in one pass; the first member's backward runs without the second's (30 ms wait),
    then the second's. Returns (outputs, grad_input and LoRA grads of each, state held in between)."""
    service = _service(model_dir, mode)
    sessions = [service.open_session("alice", "", lora, True) for _ in range(2)]
    gen = torch.Generator().manual_seed(seed)
    shapes = slot_shapes(sessions[0].slots, lora.rank)
    flats = [flatten([torch.randn(s, generator=gen) * 0.1 for s in shapes]) for _ in range(2)]
    hidden = [torch.randn(2, 12, service.hidden_size, generator=gen) for _ in range(2)]
    grads = [torch.randn(2, 12, service.hidden_size, generator=gen) for _ in range(2)]
    mask = torch.ones(2, 12, dtype=torch.uint8)

    def forward(i):
        return service.forward(sessions[i], 3, hidden[i], mask, 0, flats[i], 50 + i, True)[0]

    outs = _in_order([lambda: forward(0), lambda: forward(1)])
    assert service.batcher.batches == 1, "the two forwards ran as one pass"
    first = service.backward(sessions[0], 3, grads[0])[:2]
    held = service.store.used_bytes
    second = service.backward(sessions[1], 3, grads[1])[:2]
    assert service.store.used_bytes == 0
    service.stop()
    return [*outs, *first, *second], held


def test_a_batched_group_reruns_for_a_late_member(tiny_models):
    """Recompute mode reruns the group's pass for each backward, keeps no graph in between, and matches keep
    mode bit for bit."""
    lora = LoraConfig(rank=4, alpha=8, dropout=0.2)
    keep, keep_held = _late_member_run(tiny_models["gpt2"], "keep", lora, 4)
    recompute, held = _late_member_run(tiny_models["gpt2"], "recompute", lora, 4)
    assert held == recompute_bytes(2, 12, 32, 4) < keep_held
    assert len(recompute) == len(keep) == 6
    for a, b in zip(recompute, keep):
        assert torch.equal(a, b)


def test_recompute_state_is_evicted_like_keep_state(tiny_models):
    from tandem.cloud.errors import StateEvicted

    one = recompute_bytes(1, 8, 32, 4)
    service = _service(tiny_models["llama"], "recompute", memory_bytes=int(2.5 * one))
    sessions = [service.open_session("alice", "", LoraConfig(rank=2, alpha=4), False) for _ in range(3)]
    h, mask = torch.randn(1, 8, 32), torch.ones(1, 8, dtype=torch.uint8)
    for session in sessions:
        service.forward(session, 0, h, mask, 0, None, 0, True)  # one session at a time: each runs alone
    assert service.store.used_bytes == 2 * one
    with pytest.raises(StateEvicted, match="evicted"):
        service.backward(sessions[0], 0, h)
    service.forward(sessions[0], 0, h, mask, 0, None, 0, True)  # what the client does: redo the forward
    assert service.backward(sessions[0], 0, h)[0].shape == h.shape
    service.stop()
