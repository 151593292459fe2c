"""--cloud-optimizer: the cloud applies the remote LoRA's AdamW updates. The run must equal the client's own optimizer
bit for bit, carry no LoRA-sized traffic per step, resume exactly, and survive a cloud that loses its state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tandem.client.assemble import connect_split
from tandem.client.data import load_split
from tandem.client.errors import ServerError
from tandem.client.trainer import TuneConfig, tune
from tandem.stages.lora import LoraConfig
from tandem.testing.servers import BIN, free_port, metric, start_server

STEPS = 6


def _run(server, data, out, steps=STEPS, cloud=True, resume=False, checkpoint_every=3):
    cfg = TuneConfig(
        data=data,
        out=str(out),
        steps=steps,
        batch_size=2,
        seq_len=24,
        lr=1e-2,
        seed=11,
        lora=LoraConfig(rank=4, alpha=8),
        checkpoint_every=checkpoint_every,
        audit="no",
        progress=False,
        cloud_optimizer=cloud,
        resume=resume,
    )
    return tune(cfg, server.transport_cfg())


def _adapter(out) -> dict:
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cloud_optimizer_equals_the_clients_and_resumes_exactly(
    arch, tiny_models, sample_data, server_factory, tmp_path
):
    server = server_factory(tiny_models[arch])
    own = _run(server, sample_data, tmp_path / "own", cloud=False)
    cloud = _run(server, sample_data, tmp_path / "cloud")
    # Same update, bit for bit: the same losses and the same adapter (the remote LoRA fetched from the cloud).
    assert [s["loss"] for s in cloud["steps"]] == [s["loss"] for s in own["steps"]]
    assert cloud["validation"]["after"]["loss"] == own["validation"]["after"]["loss"]
    wa, wb = _adapter(tmp_path / "own"), _adapter(tmp_path / "cloud")
    assert wa.keys() == wb.keys()
    mid = [k for k in wa if (".layers.2." in k or ".h.2." in k) and bool((wa[k] != 0).any())]
    assert mid, "the remote LoRA must have been trained"
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k

    # No LoRA up and no LoRA gradients down per step: only the checkpoints fetch it (steps 3 and 6).
    n = own["adapter"]["remote_lora_params"]
    assert n > 0 and cloud["adapter"]["remote_lora_params"] == n
    for a, b in zip(own["steps"][1:], cloud["steps"][1:]):
        assert a["bytes_sent"] - b["bytes_sent"] >= 4 * n  # the LoRA no longer goes up
    for i in (1, 3, 4):  # steps without a checkpoint: no gradients come down either
        assert own["steps"][i]["bytes_received"] - cloud["steps"][i]["bytes_received"] >= 4 * n
    for i in (2, 5):  # checkpoints: the LoRA and both AdamW moments come down instead of the gradients
        assert cloud["steps"][i]["bytes_received"] - own["steps"][i]["bytes_received"] >= 8 * n
    assert cloud["per_token"]["expected_bytes_per_step"] < own["per_token"]["expected_bytes_per_step"] - 8 * n + 1

    # Stopped after 4 steps (a checkpoint at 3 and at 4), resumed to 6: the same run.
    _run(server, sample_data, tmp_path / "cut", steps=4)
    resumed = _run(server, sample_data, tmp_path / "cut", resume=True)
    assert [s["loss"] for s in resumed["steps"]] == [s["loss"] for s in own["steps"]]
    wc = _adapter(tmp_path / "cut")
    assert all(torch.equal(wa[k], wc[k]) for k in wa)

    # A checkpoint made with one setting does not resume with the other.
    with pytest.raises(Exception, match="cloud-optimizer"):
        _run(server, sample_data, tmp_path / "cut", cloud=False, resume=True)


def test_cloud_optimizer_state_rejects_bad_input_and_other_sessions(tiny_models, sample_data, server_factory):
    server = server_factory(tiny_models["llama"])
    from tandem.client.transport import Transport

    t = Transport(server.transport_cfg())
    lora = LoraConfig(rank=4, alpha=8)
    sm = connect_split(
        t, lora, seed=1, cloud_optimizer={"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    )
    data = load_split(sample_data, sm.tokenizer, 24, 2, 1, 0.1)
    with pytest.raises(ServerError, match="no remote LoRA"):
        sm.middle.fetch_state(0)  # nothing sent yet
    loss, _ = sm.loss(data.batch_at(0), 0, 1, train=True)
    loss.backward()
    mid = sm.middle.params
    assert all(p.grad is None for p in mid), "the client must not get the remote LoRA's gradients"
    st = sm.middle.fetch_state(0)
    assert st["steps"] == 1 and st["version"] == 1 and st["exp_avg"].numel() == sum(p.numel() for p in mid)
    before = [p.detach().clone() for p in mid]

    bad = dict(st, exp_avg=torch.zeros(3))
    with pytest.raises(ServerError, match="moments"):
        sm.middle.put_state(bad, 1)
    with pytest.raises(ServerError, match="finite"):
        sm.middle.put_state(dict(st, exp_avg_sq=torch.full_like(st["exp_avg_sq"], float("nan"))), 1)
    again = sm.middle.fetch_state(1)  # the rejected states changed nothing
    assert again["steps"] == 1 and torch.equal(again["exp_avg"], st["exp_avg"])
    assert all(torch.equal(a, b) for a, b in zip(before, mid))

    # A session with the client's own optimizer has no cloud state to get or put.
    own = connect_split(t, lora, seed=1)
    with pytest.raises(ServerError, match="does not use a cloud optimizer"):
        own.middle.fetch_state(0)
    own.close()
    # The session still trains.
    loss, _ = sm.loss(data.batch_at(1), 1, 1, train=True)
    loss.backward()
    assert sm.middle.fetch_state(2)["steps"] == 2
    sm.close()
    t.close()


def test_cloud_killed_mid_run_rolls_back_to_the_checkpoint(tiny_models, sample_data, tmp_path):
    """The cloud held the only copy of the remote LoRA's last updates; after a crash the client goes back to its
    last checkpoint, puts that state into a new session and redoes the steps: the same run."""

    def cmd(server, out):
        return [
            os.path.join(BIN, "client"),
            "tune",
            *server.cli_args(),
            "--data",
            sample_data,
            "--out",
            out,
            "--steps",
            "30",
            "--checkpoint-every",
            "3",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--no-progress",
            "--seed",
            "7",
            "--threads",
            "1",
            "--cloud-optimizer",
            "--audit",
            "no",
        ]

    tls = str(tmp_path / "tls")
    ref = start_server(tiny_models["llama"], tmp_path, tls_dir=tls)
    try:
        r = subprocess.run(cmd(ref, str(tmp_path / "ref")), capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr
    finally:
        ref.stop()
    port, mport = free_port(), free_port()
    server = start_server(
        tiny_models["llama"], tmp_path, "--metrics-port", str(mport), tls_dir=tls, listen=f"127.0.0.1:{port}"
    )
    client = subprocess.Popen(
        ["nice", "-n", "15", *cmd(server, str(tmp_path / "cut"))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # low priority: the kill lands mid-run on a loaded machine too
    try:
        deadline = time.monotonic() + 120
        while metric(mport, "tandem_steps_total") < 5 and time.monotonic() < deadline:  # past the checkpoint at 3
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        time.sleep(1.0)
        server = start_server(tiny_models["llama"], tmp_path, tls_dir=tls, listen=f"127.0.0.1:{port}")
        _, err = client.communicate(timeout=240)
        assert client.returncode == 0, err
        # Usually the crash lands between checkpoints (go back); right after a checkpoint's fetch the client
        # can put that state into a new session and just redo the step.
        assert "going back to step" in err or "opening a new one" in err, err
    finally:
        client.kill()
        server.stop()
    a, b = (json.loads((tmp_path / run / "report.json").read_text()) for run in ("ref", "cut"))
    assert [s["step"] for s in b["steps"]] == list(range(30))
    assert [s["loss"] for s in b["steps"]] == [s["loss"] for s in a["steps"]]
    wa, wb = _adapter(tmp_path / "ref"), _adapter(tmp_path / "cut")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_lost_session_goes_back_to_the_checkpoint_in_process(
    tiny_models, sample_data, server_factory, tmp_path, monkeypatch, caplog
):
    """Deterministic: the session is closed under the client at step 4 (after the checkpoint at 3)."""
    from tandem.client.remote import RemoteMiddle

    server = server_factory(tiny_models["llama"])
    ref = _run(server, sample_data, tmp_path / "ref")
    real, lost = RemoteMiddle.backward_rpc, []

    def backward_rpc(self, step, *args):
        if step == 4 and not lost:
            lost.append(step)
            self.close()  # the cloud forgets the session, and the LoRA updates of step 3
        return real(self, step, *args)

    monkeypatch.setattr(RemoteMiddle, "backward_rpc", backward_rpc)
    with caplog.at_level("WARNING"):
        got = _run(server, sample_data, tmp_path / "cut")
    assert lost and "going back to step 3" in caplog.text
    assert [s["step"] for s in got["steps"]] == list(range(STEPS))
    assert [s["loss"] for s in got["steps"]] == [s["loss"] for s in ref["steps"]]
    wa, wb = _adapter(tmp_path / "ref"), _adapter(tmp_path / "cut")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_an_operator_can_refuse_cloud_optimizer_sessions(tiny_models, sample_data, server_factory, tmp_path):
    server = server_factory(tiny_models["llama"], "--no-cloud-optimizer")
    with pytest.raises(ServerError, match="does not run optimizers for clients.*tune without --cloud-optimizer"):
        _run(server, sample_data, tmp_path / "cloud", steps=2)
    report = _run(server, sample_data, tmp_path / "own", steps=2, cloud=False)  # the client's own optimizer still tunes
    assert len(report["steps"]) == 2


# Ten crashes, each placed on one RPC of the run: (method, its n-th call counting redone ones, when). "before": the
# server dies just before the call reaches it; "after": it handled the call and died before the reply arrived, so
# the client's retry meets a new server (a Backward's update, a checkpoint's fetch or a recovery's put is lost).
# The first 18 Forwards evaluate; the run is deterministic, so each crash lands on the same step every time.
KILLS = [
    ("Forward", 22, "before"),  # step 3, right after the checkpoint: a new session, the same state
    ("Backward", 6, "after"),  # the cloud's update of step 5 lost: back to step 3
    ("PutRemoteState", 2, "before"),  # the recovery itself loses its new session...
    ("PutRemoteState", 3, "after"),  # ...twice: three lost sessions in a row, still no manual step
    ("GetRemoteState", 4, "after"),  # the checkpoint at 12 lost with its fetch: back to 9
    ("Backward", 16, "before"),  # step 9 again, before the cloud applied it: a new session suffices
    ("Backward", 21, "after"),  # step 13: back to 12
    ("Forward", 45, "after"),  # step 16: back to 15
    ("GetRemoteState", 8, "before"),  # the checkpoint at 21 lost: back to 18
    ("Forward", 65, "after"),
]  # the evaluation after tuning: a new session with the final state


def test_ten_cloud_crashes_in_one_run_end_identical_with_no_manual_step(
    tiny_models, sample_data, tmp_path, monkeypatch, caplog
):
    """`client tune --cloud-optimizer` survives any number of lost sessions while it keeps reaching checkpoints:
    ten SIGKILLed servers (some during the recovery from the previous one) give the undisturbed run's losses
    and adapter, in one process."""
    from tandem.client.transport import Transport, TransportConfig
    from tandem.testing.warm_servers import WarmServers

    port = free_port()
    argv = [
        "--model",
        tiny_models["llama"],
        "--listen",
        f"127.0.0.1:{port}",
        "--threads",
        "1",
        "--tls-dir",
        str(tmp_path / "tls"),
        "--adapter-registry",
        str(tmp_path / "registry"),
    ]
    servers = WarmServers(tmp_path)  # a restart costs the tiny model's load, not the imports
    try:
        pid, addr = servers.start(argv)
        tls = tmp_path / "tls"
        server = SimpleNamespace(
            transport_cfg=lambda: TransportConfig(
                server=addr, ca=str(tls / "ca.pem"), backoff_s=0.05, identity=str(tls / "clients" / "local.pem")
            )
        )
        ref = _run(server, sample_data, tmp_path / "ref", steps=24)

        real, seen, fired = Transport.call, {}, []

        def crash():
            nonlocal pid
            servers.kill(pid)
            pid, _ = servers.start(argv)

        def call(self, method, *args, **kw):
            seen[method] = seen.get(method, 0) + 1
            when = next((w for m, n, w in KILLS if m == method and n == seen[method]), None)
            if when == "before":
                crash()
            elif when == "after":
                real(self, method, *args, **kw)
                crash()
            if when:
                fired.append((method, seen[method], when))
            return real(self, method, *args, **kw)

        monkeypatch.setattr(Transport, "call", call)
        with caplog.at_level("WARNING"):
            got = _run(server, sample_data, tmp_path / "cut", steps=24)
    finally:
        servers.close()
    assert sorted(fired) == sorted(KILLS), "every planned crash must land in the run"
    assert caplog.text.count("going back to step") >= 6 and "opening a new one" in caplog.text
    assert [s["step"] for s in got["steps"]] == list(range(24))
    assert [s["loss"] for s in got["steps"]] == [s["loss"] for s in ref["steps"]]
    assert got["validation"]["after"]["loss"] == ref["validation"]["after"]["loss"]
    wa, wb = _adapter(tmp_path / "ref"), _adapter(tmp_path / "cut")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_cloud_that_loses_every_attempt_stops_the_run_with_one_clear_error(
    tiny_models, sample_data, server_factory, tmp_path, monkeypatch
):
    """Without progress the recovery is bounded: a session lost at the same step every time ends the run after
    MAX_LOST_WITHOUT_PROGRESS + 1 losses, naming the step and the way on, instead of redoing steps forever."""
    from tandem.client.checkpoint import MAX_LOST_WITHOUT_PROGRESS
    from tandem.client.remote import RemoteMiddle
    from tandem.client.session import SessionLost

    server = server_factory(tiny_models["llama"])
    real, closed = RemoteMiddle.backward_rpc, []

    def backward_rpc(self, step, *args):
        if step == 4:  # a cloud that crashes on this step, every time
            closed.append(step)
            self.close()
        return real(self, step, *args)

    monkeypatch.setattr(RemoteMiddle, "backward_rpc", backward_rpc)
    with pytest.raises(SessionLost, match=r"lost 6 sessions in a row .* giving up at step 3\. Rerun with --resume"):
        _run(server, sample_data, tmp_path / "cut")
    assert len(closed) == MAX_LOST_WITHOUT_PROGRESS + 1 == 6
    # The checkpoint at step 3 is intact: --resume continues from it.
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 3
