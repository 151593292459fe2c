"""Coordinated batching: concurrent sessions share one pass of the middle and get what they would alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tandem.cloud.batching import BatchingConfig
from tandem.cloud.errors import StepNotPending
from tandem.cloud.split import SplitService
from tandem.stages.loading import load_model
from tandem.stages.lora import LoraConfig, flatten, slot_shapes
from tandem.stages.modules import StageLayout
from tandem.testing.models import ARCHS

OWNER = "alice"


def _services(model_dir, **batching):
    plain_m, batched_m = load_model(model_dir), load_model(model_dir)
    layout = StageLayout.parse("2:2", plain_m.config)
    plain = SplitService(plain_m, layout, serve_client_files=False)
    # Generous waits: on a loaded machine the test's threads may start far apart; every member does come.
    batching = {"window_ms": 500, "backward_wait_ms": 10_000, **batching}
    batched = SplitService(batched_m, layout, serve_client_files=False, batching=BatchingConfig(**batching))
    return plain, batched


def _clients(svc_pair, specs, seed=0):
    """Opens the same sessions on both services; returns per-session (session pair, lora flat, h, mask, grad)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b, t, lora in specs:
        sessions = [svc.open_session(OWNER, "", lora, True) for svc in svc_pair]
        s = sessions[0]
        flat = flatten([torch.randn(shape, generator=gen) * 0.1 for shape in slot_shapes(s.slots, lora.rank)])
        h = torch.randn(b, t, svc_pair[0].hidden_size, generator=gen)
        mask = torch.ones(b, t, dtype=torch.uint8)
        mask[0, : t // 3] = 0  # left padding in the first row
        g = torch.randn(b, t, svc_pair[0].hidden_size, generator=gen)
        out.append((sessions, flat, h, mask, g))
    return out


def _concurrently(fns):
    results, errors = [None] * len(fns), []
    barrier = threading.Barrier(len(fns))

    def run(i):
        barrier.wait()
        try:
            results[i] = fns[i]()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    return results


def _close(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12)) <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_forward_and_backward_equal_unbatched(arch, tiny_models):
    plain, batched = _services(tiny_models[arch])
    specs = [
        (2, 16, LoraConfig(rank=4, alpha=8)),
        (1, 16, LoraConfig(rank=8, alpha=8, dropout=0.1)),
        (3, 16, LoraConfig(rank=2, alpha=4)),
        (2, 24, LoraConfig(rank=4, alpha=8)),
    ]  # the last: other length
    cl = _clients((plain, batched), specs)
    want = []
    for i, (sessions, flat, h, mask, g) in enumerate(cl):
        out, _ = plain.forward(sessions[0], 0, h, mask, 0, flat, 100 + i, True)
        gin, glora, _ = plain.backward(sessions[0], 0, g)
        want.append((out, gin, glora))

    fwd = _concurrently(
        [lambda c=c, i=i: batched.forward(c[0][1], 0, c[2], c[3], 0, c[1], 100 + i, True) for i, c in enumerate(cl)]
    )
    n_fwd = batched.batcher.batches
    assert n_fwd < len(cl), "concurrent forwards of one length must share a batch"
    bwd = _concurrently([lambda c=c: batched.backward(c[0][1], 0, c[4]) for c in cl])
    assert batched.batcher.batches - n_fwd < len(cl), "a group's backwards must run together"
    for (out, gin, glora), (bout, _), (bgin, bglora, _) in zip(want, fwd, bwd):
        assert _close(bout, out) and _close(bgin, gin) and _close(bglora, glora)
    assert batched.store.used_bytes == 0, "every member's forward state is released after backward"

    # Eval forwards batch too, without keeping state.
    ev = _concurrently([lambda c=c: batched.forward(c[0][1], 1, c[2], c[3], 0, None, 0, False) for c in cl])
    for c, (out, _) in zip(cl, ev):
        ref, _ = plain.forward(c[0][0], 1, c[2], c[3], 0, None, 0, False)
        assert _close(out, ref)
    assert batched.store.used_bytes == 0
    batched.stop()


def _pair_in_one_batch(arch_dir, shape, seed, step):
    """Two sessions on a plain and a batching service (30 ms backward wait); the plain service's results as
    reference, and both sessions' forwards of `step` run as one batch. Returns (plain, batched, clients, want)."""
    plain, batched = _services(arch_dir, backward_wait_ms=30)
    specs = [(*shape, LoraConfig(rank=4, alpha=8)), (*shape, LoraConfig(rank=4, alpha=8))]
    cl = _clients((plain, batched), specs, seed=seed)
    want = []
    for sessions, flat, h, mask, g in cl:
        plain.forward(sessions[0], step, h, mask, 0, flat, 0, True)
        want.append(plain.backward(sessions[0], step, g))
    _concurrently([lambda c=c: batched.forward(c[0][1], step, c[2], c[3], 0, c[1], 0, True) for c in cl])
    return plain, batched, cl, want


def test_late_member_keeps_the_graph_and_a_lone_session_is_bit_exact(tiny_models):
    plain, batched, cl, want = _pair_in_one_batch(tiny_models["llama"], (2, 12), seed=1, step=5)
    # Only the first member sends its backward; it waits 30 ms for the second, then runs alone.
    first = batched.backward(cl[0][0][1], 5, cl[0][4])
    assert _close(first[0], want[0][0]) and _close(first[1], want[0][1])
    assert batched.store.used_bytes > 0, "the late member's state is still held"
    second = batched.backward(cl[1][0][1], 5, cl[1][4])  # the graph was retained for it
    assert _close(second[0], want[1][0]) and _close(second[1], want[1][1])
    assert batched.store.used_bytes == 0

    # A session alone in its batch takes the plain path: bit for bit what the unbatched server computes.
    sessions, flat, h, mask, g = cl[0]
    a, _ = plain.forward(sessions[0], 6, h, mask, 0, None, 0, True)
    b, _ = batched.forward(sessions[1], 6, h, mask, 0, None, 0, True)
    assert torch.equal(a, b)
    assert all(
        torch.equal(x, y)
        for x, y in zip(plain.backward(sessions[0], 6, g)[:2], batched.backward(sessions[1], 6, g)[:2])
    )
    batched.stop()


def test_a_backward_on_its_way_keeps_the_group_graph(tiny_models):
    """A member whose backward request has taken its state from the store, but not yet reached the batcher,
    still counts as waiting: the group's other backward must not free the graph under it (a race seen with
    clients in separate processes)."""
    _, batched, cl, want = _pair_in_one_batch(tiny_models["qwen2"], (1, 10), seed=3, step=2)
    # The first member's request thread has taken its state (as service.backward does first) and is paused.
    first = batched.store.take(cl[0][0][1], 2)
    assert first.group is not None and len(first.group.sizes) == 2, "the two forwards ran as one batch"
    second = batched.backward(cl[1][0][1], 2, cl[1][4])
    assert _close(second[0], want[1][0]) and _close(second[1], want[1][1])
    got = batched.batcher.backward(first.group, first.index, cl[0][4])  # not StateEvicted
    assert _close(got[0], want[0][0]) and _close(got[1], want[0][1])
    batched.stop()


def test_closed_member_does_not_block_its_group(tiny_models):
    _, batched = _services(tiny_models["gpt2"], backward_wait_ms=10_000)
    specs = [(1, 8, LoraConfig(rank=4, alpha=8)), (1, 8, LoraConfig(rank=4, alpha=8))]
    cl = _clients((batched, batched), specs, seed=2)
    _concurrently([lambda c=c: batched.forward(c[0][0], 0, c[2], c[3], 0, c[1], 0, True) for c in cl])
    batched.close_session(cl[1][0][0])  # the other member is gone: no 10 s wait
    t0 = time.monotonic()
    batched.backward(cl[0][0][0], 0, cl[0][4])
    assert time.monotonic() - t0 < 5.0
    assert batched.store.used_bytes == 0
    # A second backward of the same step is refused with the store's error, not a crash in the worker.
    with pytest.raises(StepNotPending, match="no forward of step 0 is pending"):
        batched.backward(cl[0][0][0], 0, cl[0][4])
    batched.stop()


def test_concurrent_clients_through_a_batching_server_match_an_unbatched_one(tiny_models, sample_data, server_factory):
    """Real `cloud serve` processes: two clients at once, batched (the default) vs --no-batching."""
    import socket
    import urllib.request

    from tandem.testing.split_runs import split_losses

    def both(server):
        res = {}
        ths = [
            threading.Thread(
                target=lambda s=seed: res.__setitem__(s, split_losses(server.transport_cfg(), sample_data, s, 4))
            )
            for seed in (1, 2)
        ]
        for th in ths:
            th.start()
        for th in ths:
            th.join(300)
        return res

    plain = server_factory(tiny_models["qwen2"], "--no-batching")
    ref = both(plain)
    plain.stop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    batched = server_factory(
        tiny_models["qwen2"],
        "--batch-window-ms",
        "300",
        "--batch-backward-wait-ms",
        "5000",
        "--metrics-port",
        str(port),
    )
    got = both(batched)
    for seed in (1, 2):
        assert got[seed] == pytest.approx(ref[seed], rel=1e-5)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    vals = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("tandem_batched_")}
    assert vals["tandem_batched_requests"] > vals["tandem_batched_passes"] > 0, "some passes served both clients"
    assert 0 < vals["tandem_batched_compute_seconds"] < 300, "the worker's compute time is counted, in seconds"


def test_cloud_optimizer_sessions_update_inside_the_batch(tiny_models):
    """Two --cloud-optimizer sessions share passes; the worker applies each one's AdamW update after the group's
    backward, and the cloud's LoRA follows the client-optimizer reference (an unbatched service + torch AdamW)."""
    from tandem.cloud.optimizer import AdamWSpec

    plain, batched = _services(tiny_models["llama"])
    lora, gen = LoraConfig(rank=4, alpha=8), torch.Generator().manual_seed(5)
    sess = []
    for _ in range(2):
        ps = plain.open_session(OWNER, "", lora, True)
        bs = batched.open_session(OWNER, "", lora, True, optimizer=AdamWSpec(lr=1e-2))
        shapes = slot_shapes(ps.slots, lora.rank)
        param = torch.nn.Parameter(flatten([torch.randn(sh, generator=gen) * 0.1 for sh in shapes]))
        h, g = (
            torch.randn(2, 16, plain.hidden_size, generator=gen),
            torch.randn(2, 16, plain.hidden_size, generator=gen),
        )
        sess.append(
            (
                ps,
                bs,
                param,
                torch.optim.AdamW([param], lr=1e-2),
                h,
                torch.ones(2, 16, dtype=torch.uint8),
                g,
                param.detach().clone(),
            )
        )
    n_req = 0
    for step in range(3):
        for ps, _, param, opt, h, mask, g, _ in sess:  # the client's own optimizer
            plain.forward(ps, step, h, mask, step, param.detach().clone(), 0, True)
            param.grad = plain.backward(ps, step, g)[1]
            opt.step()
        fwd = _concurrently(
            [
                lambda c=c: batched.forward(c[1], step, c[4], c[5], step, c[7] if step == 0 else None, 0, True)  # noqa: B023
                for c in sess
            ]
        )
        bwd = _concurrently([lambda c=c: batched.backward(c[1], step, c[6]) for c in sess])  # noqa: B023
        n_req += 2 * len(sess)
        assert all(out.shape == (2, 16, plain.hidden_size) for out, _ in fwd)
        assert all(glora.numel() == 0 for _, glora, _ in bwd), "the cloud applied the update; no LoRA gradients go back"
    assert batched.batcher.batches < n_req, "the sessions must have shared passes"
    for _, bs, param, *rest in sess:
        st = batched.remote_state(bs)
        assert st["steps"] == 3 and st["version"] == 3
        # Adam divides by the gradients' RMS, so the batched pass's rounding (1e-6 relative) can move an update by
        # a fraction of a step where a gradient is near zero: compare in units of the learning rate (1e-2).
        moved = (st["lora"] - rest[-1]).abs()
        assert float(moved.mean()) > 1e-2, "three AdamW steps of lr 1e-2 must have moved the LoRA"
        assert float((st["lora"] - param.detach()).abs().max()) <= 1e-2 * 0.05
    batched.stop()


def _two_sessions(svc, shapes, seed=0):
    """Opens one session per (b, T) on `svc` (no remote LoRA); returns [(session, h, mask)]."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b, t in shapes:
        session = svc.open_session(OWNER, "", LoraConfig(rank=4, alpha=8), False)
        out.append((session, torch.randn(b, t, svc.hidden_size, generator=gen), torch.ones(b, t, dtype=torch.uint8)))
    return out


def test_a_failing_pass_fails_only_its_own_group(tiny_models):
    """A pass that raises (forced here) fails its own requests; another group, and every later request, runs."""
    _, batched = _services(tiny_models["llama"], window_ms=50)
    bad, good = _two_sessions(batched, [(1, 7), (2, 8)])  # different lengths: two groups
    real = batched.batcher.middle

    def middle(h, am):
        if h.shape[1] == 7:
            raise RuntimeError("forced failure of this pass")
        return real(h, am)

    batched.batcher.middle = middle
    res = {}

    def call(c):
        try:
            res[c[0].id] = batched.forward(c[0], 0, c[1], c[2], -1, None, 0, True)[0]
        except RuntimeError as e:
            res[c[0].id] = e

    ths = [threading.Thread(target=call, args=(c,)) for c in (bad, good)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(60)
    assert isinstance(res[bad[0].id], RuntimeError) and "forced failure" in str(res[bad[0].id])
    assert res[good[0].id].shape == (2, 8, batched.hidden_size)
    assert batched.backward(good[0], 0, torch.ones_like(good[1]))[0].shape == good[1].shape
    # A failure in choosing a batch fails the oldest request only; the worker goes on.
    real_pick, calls = batched.batcher._pick, []

    def pick():
        calls.append(1)
        if len(calls) == 1:
            raise IndexError("forced failure of a pick")
        return real_pick()

    batched.batcher._pick = pick
    with pytest.raises(IndexError, match="forced failure of a pick"):
        batched.forward(good[0], 1, good[1], good[2], -1, None, 0, False)
    assert batched.forward(good[0], 2, good[1], good[2], -1, None, 0, False)[0].shape == good[1].shape
    assert batched.batcher.alive
    batched.stop()


def test_a_dead_worker_fails_fast_and_health_says_not_serving(tiny_models):
    """If the worker thread itself dies, waiting and later requests fail at once (no hang) and health turns NOT_SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tandem.cloud.errors import Overloaded
    from tandem.cloud.server import build_server

    _, batched = _services(tiny_models["gpt2"], window_ms=50)
    a, b = _two_sessions(batched, [(1, 8), (1, 8)])
    server, port = build_server(batched, "127.0.0.1:0", None)
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(ch)
    check = lambda: health.Check(health_pb2.HealthCheckRequest(service="tandem.v1.SplitTuning"), timeout=10).status  # noqa: E731
    assert check() == health_pb2.HealthCheckResponse.SERVING

    def broken():
        raise SystemExit("forced death of the worker")

    batched.batcher._next = broken  # taken by the worker after its current pass
    assert batched.forward(a[0], 0, a[1], a[2], -1, None, 0, False)[0].shape == a[1].shape
    deadline = time.monotonic() + 10
    while batched.batcher.alive and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not batched.batcher.alive
    with pytest.raises(Overloaded, match="compute worker stopped"):
        batched.forward(b[0], 0, b[1], b[2], -1, None, 0, False)
    assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
    ch.close()
    server.stop(0)
