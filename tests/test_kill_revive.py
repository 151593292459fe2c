"""--kill-revive (DLoRA's Kill-and-Revive): a killed remote-LoRA module's tensors do not travel, split equals local
with the same decisions, a killed module comes back, hostile live_slots are refused, and a resumed run continues
identically."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from tandem.client.assemble import connect_split
from tandem.client.cli import build_parser
from tandem.client.data import load_split
from tandem.client.errors import ClientError, ServerError
from tandem.client.kill_revive import KillRevive, KillReviveConfig
from tandem.client.report import render
from tandem.client.session import open_session
from tandem.client.trainer import TuneConfig, tune
from tandem.client.transport import Transport
from tandem.client.tune_cli import tune_config
from tandem.protos import serde
from tandem.stages.lora import LoraConfig, flatten
from tandem.testing.proxies import Hop

# Short warm-up and probe windows, so that a 12-step run kills and revives on the tiny models.
SCHEDULE = KillReviveConfig(threshold=1.0, warmup=2, probe=2, revive_after=4)
STEPS = 12


def _cfg(data, out, **kw) -> TuneConfig:
    base = dict(
        data=data,
        out=str(out),
        steps=STEPS,
        batch_size=2,
        seq_len=24,
        lr=1e-2,
        seed=5,
        lora=LoraConfig(rank=4, alpha=8),
        checkpoint_every=4,
        audit="no",
        progress=False,
        kill_revive=SCHEDULE,
    )
    return TuneConfig(**(base | kw))


def test_killed_modules_do_not_travel(tiny_models, sample_data, server_factory, tmp_path):
    """Every Forward and Backward through a recording hop (unsealed, to read the tensors): the remote LoRA going up
    and its gradients coming down hold exactly the live slots' values, as the report's live counts say."""
    server = server_factory(tiny_models["llama"])
    hop = Hop(server)
    opened, grads = [], []
    hop.on_response["OpenSession"] = lambda resp: opened.append(resp) or resp
    hop.on_response["Backward"] = lambda resp: grads.append(resp) or resp
    try:
        run = tune(_cfg(sample_data, tmp_path / "run"), hop.transport_cfg(seal=False))
    finally:
        hop.close()
    assert opened[0].kill_revive
    sizes = [4 * (slot.in_features + slot.out_features) for slot in opened[0].middle_slots]  # r=4: A and B
    forwards = [req for method, req in hop.seen if method == "Forward" and req.train]
    assert len(forwards) == len(grads) == STEPS
    live_counts = [s["live_modules"] for s in run["steps"]]
    assert min(live_counts) < len(sizes), "the schedule killed nothing"
    assert run["kill_revive"]["kills"] > 0
    uploads = 0
    for step, (req, resp) in enumerate(zip(forwards, grads)):
        live = list(req.live_slots)
        assert len(live) == len(sizes) and set(live) <= {0, 1}
        assert sum(live) == live_counts[step] or step == 0
        live_size = sum(n for n, on in zip(sizes, live) if on)
        grad = serde.from_proto(resp.lora_grad, "lora_grad")
        assert grad.numel() == live_size, f"step {step}: a killed slot's gradients came down"
        if req.HasField("lora"):
            uploads += 1
            assert serde.from_proto(req.lora, "lora").numel() == live_size, f"step {step}: a killed slot went up"
    assert uploads >= STEPS - 1  # the LoRA changes every step (the first went up with the evaluation before it)
    saved = sum(s["remote_lora_bytes_saved"] for s in run["steps"])
    assert saved > 0 and run["kill_revive"]["remote_lora_bytes_saved"] == saved
    console = Console(record=True, width=200)
    render(run, console)
    assert "modules live on average" in console.export_text()


def test_the_client_refuses_a_server_that_does_not_echo_kill_revive(tiny_models, server_factory):
    server = server_factory(tiny_models["llama"])
    hop = Hop(server)

    def old_server(resp):
        resp.kill_revive = False
        return resp

    hop.on_response["OpenSession"] = old_server
    transport = Transport(hop.transport_cfg(seal=False))
    try:
        with pytest.raises(ClientError, match="does not support --kill-revive"):
            connect_split(transport, LoraConfig(rank=4, alpha=8), seed=1, kill_revive=True)
    finally:
        transport.close()
        hop.close()


@pytest.mark.parametrize("cloud", ["alone", "batched", "recompute"])
def test_split_equals_local_and_a_killed_module_comes_back(cloud, tiny_models, sample_data, server_factory, tmp_path):
    """The same decisions on both sides of the wire, whichever way the cloud runs the step: alone, through the
    batcher (another session is open), or rerunning the forward for the backward."""
    server = server_factory(tiny_models["llama"], *(["--forward-state", "recompute"] if cloud == "recompute" else []))
    idle = Transport(server.transport_cfg())
    if cloud == "batched":  # a second session makes the server batch (this run alone in each pass)
        open_session(idle, LoraConfig(rank=4, alpha=8))
    split = tune(_cfg(sample_data, tmp_path / "split"), server.transport_cfg())
    idle.close()
    local = tune(
        _cfg(sample_data, tmp_path / "local", mode="local", model=tiny_models["llama"], client_blocks="2:2"), None
    )
    assert [s["loss"] for s in split["steps"]] == pytest.approx([s["loss"] for s in local["steps"]], rel=1e-5)
    assert [s["live_modules"] for s in split["steps"]] == [s["live_modules"] for s in local["steps"]]
    assert split["kill_revive"]["revivals"] > 0, "no killed module came back"
    counts = [s["live_modules"] for s in split["steps"]]
    dips = [i for i in range(1, len(counts)) if counts[i] < counts[i - 1]]
    assert dips and any(counts[j] > counts[dips[0]] for j in range(dips[0], len(counts)))


def test_resume_continues_identically(tiny_models, sample_data, server_factory, tmp_path):
    server = server_factory(tiny_models["llama"])
    whole = tune(_cfg(sample_data, tmp_path / "whole"), server.transport_cfg())
    tune(_cfg(sample_data, tmp_path / "half", steps=8), server.transport_cfg())
    resumed = tune(_cfg(sample_data, tmp_path / "half", resume=True), server.transport_cfg())
    assert [s["loss"] for s in resumed["steps"]] == [s["loss"] for s in whole["steps"]]
    assert [s["live_modules"] for s in resumed["steps"]] == [s["live_modules"] for s in whole["steps"]]
    assert resumed["validation"]["after"]["loss"] == whole["validation"]["after"]["loss"]
    other = _cfg(sample_data, tmp_path / "half", resume=True, kill_revive=KillReviveConfig(warmup=3))
    with pytest.raises(Exception, match="--kill-revive"):
        tune(other, server.transport_cfg())


def test_hostile_live_slots_are_refused(tiny_models, sample_data, server_factory):
    server = server_factory(tiny_models["llama"])
    transport = Transport(server.transport_cfg(seal=False))
    lora = LoraConfig(rank=4, alpha=8)
    model = connect_split(transport, lora, seed=1, kill_revive=True)
    plain = connect_split(transport, lora, seed=1)
    data = load_split(sample_data, model.tokenizer, 24, 2, 1, 0.1)
    batch = data.batch_at(0)
    model.loss(batch, 0, 1, train=False)  # the cloud now holds every slot
    middle = model.middle
    n = len(middle.params) // 2

    def forward(session_middle, live: bytes, lora_values=None):
        h = torch.zeros(2, 24, model.config.hidden_size)
        mask = torch.ones(2, 24, dtype=torch.uint8)
        from tandem.protos import split_pb2 as pb

        req = pb.ForwardRequest(
            session_id=session_middle.session.id,
            step=0,
            hidden=serde.to_proto(h),
            attention_mask=serde.to_proto(mask),
            lora_version=12345,
            train=False,
            live_slots=live,
        )
        if lora_values is not None:
            req.lora.CopyFrom(serde.to_proto(lora_values))
        return transport.call("Forward", req, retry=False)

    with pytest.raises(ServerError, match="live_slots: expected"):
        forward(middle, bytes([1] * (n - 1)))
    with pytest.raises(ServerError, match="0 \\(killed\\) or 1"):
        forward(middle, bytes([2] + [1] * (n - 1)))
    with pytest.raises(ServerError, match="did not open with kill_revive"):
        forward(plain.middle, bytes([1] * n))
    live = [0] + [1] * (n - 1)
    whole = flatten(middle.params)
    with pytest.raises(ServerError, match="for the .* live slots"):
        forward(middle, bytes(live), whole)  # every slot's values for a live set without slot 0
    part = flatten(middle.params[2:])
    forward(middle, bytes(live), part)  # the right size is taken
    plain.close()
    model.close()
    transport.close()


def test_the_client_refuses_what_it_cannot_do(sample_data):
    with pytest.raises(ValueError, match="--kill-revive"):
        _cfg(sample_data, "x", cloud_optimizer=True)
    with pytest.raises(ValueError, match="--kill-revive"):
        _cfg(sample_data, "x", middle_lora=False)
    with pytest.raises(ValueError, match="kill-threshold"):
        KillReviveConfig(threshold=0)


def test_the_flags_make_the_schedule(sample_data):
    parser = build_parser()
    args = parser.parse_args(["tune", "--data", sample_data, "--kill-revive", "--kill-threshold", "0.5"])
    assert tune_config(args).kill_revive == KillReviveConfig(threshold=0.5)
    assert tune_config(parser.parse_args(["tune", "--data", sample_data])).kill_revive is None
    with pytest.raises(ClientError, match="--kill-revive"):
        tune_config(parser.parse_args(["tune", "--data", sample_data, "--kill-revive", "--cloud-optimizer"]))


def test_the_schedule_kills_the_insignificant_and_revives_them():
    """The controller alone, on gradients set by hand: a module whose gradient is small is killed after the
    warm-up, comes back after revive_after steps, and early when the others' significance falls below its own."""
    modules = [(torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(3, 2))) for _ in range(3)]
    kr = KillRevive(modules, KillReviveConfig(threshold=0.5, warmup=3, probe=2, revive_after=4, beta=0.0))

    def step(step: int, sizes: list[float]) -> None:
        for (a, b), size in zip(modules, sizes):
            a.grad = torch.full_like(a, size) if a.requires_grad else None
            b.grad = torch.full_like(b, size) if b.requires_grad else None
        kr.after_backward(step)

    for i in range(3):
        step(i, [1.0, 1.0, 0.01])
    assert kr.live == [True, True, False] and modules[2][0].grad is None and not modules[2][0].requires_grad
    saved = kr.state_dict()
    for i in range(3, 7):
        step(i, [1.0, 1.0, 0.01])
    assert kr.live == [True, True, True] and kr.revivals == 1  # revive_after 4 steps
    step(7, [1.0, 1.0, 0.01])
    step(8, [1.0, 1.0, 0.01])
    assert kr.live == [True, True, False]  # the probe says it still does not matter
    step(9, [0.001, 0.001, 0.01])  # the others' updates shrank below the killed module's last significance
    assert kr.live[2]
    kr.load_state_dict(saved)  # a checkpoint puts the decisions back
    assert kr.live == [True, True, False] and not modules[2][1].requires_grad


def test_the_snr_measure_kills_the_noisy_module_not_the_small_steady_one():
    """--kill-measure snr: a module whose gradient flips sign every step is killed, one whose gradient is 100x
    smaller but steady stays live (the gradient measure would kill the small one); its state survives a checkpoint."""
    modules = [(torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(3, 2))) for _ in range(3)]
    kr = KillRevive(modules, KillReviveConfig(threshold=0.9, warmup=4, probe=2, revive_after=50, measure="snr"))
    for i in range(6):
        for (a, b), size in zip(modules, [1.0, 0.01, 1.0 if i % 2 else -1.0]):  # steady, small and steady, noise
            for p in (a, b):
                p.grad = torch.full_like(p, size) if p.requires_grad else None
        kr.after_backward(i)
    assert kr.live == [True, True, False]
    saved = kr.state_dict()
    fresh = KillRevive(modules, KillReviveConfig(threshold=0.9, warmup=4, probe=2, revive_after=50, measure="snr"))
    fresh.load_state_dict(saved)
    assert fresh.live == kr.live and all(torch.equal(x, y) for x, y in zip(fresh.squares[0], kr.squares[0]))
    with pytest.raises(ValueError, match="--kill-measure must be one of"):
        KillReviveConfig(measure="loss")
