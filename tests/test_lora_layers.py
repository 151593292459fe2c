"""--lora-layers (peft's layers_to_transform) on both sides, and the top-only step: one round trip, exact."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from tandem.client.assemble import build_local, connect_split
from tandem.client.data import load_split
from tandem.client.errors import ClientError, ServerError
from tandem.client.offsite import adapter_lora_config, push_adapter
from tandem.client.report import expected_bytes
from tandem.client.transport import Transport
from tandem.protos import split_pb2 as pb
from tandem.stages.lora import LoraConfig, PeftMeta, save_peft
from tandem.stages.lora_layers import format_layers, parse_layers
from tandem.stages.traffic import step_bytes
from tandem.testing.servers import BIN, free_port, metric

# The tiny models have 6 blocks; servers and local runs cut them 2:2: bottom 0-1, middle 2-3, top 4-5.
TOP = (4, 5)


@pytest.mark.parametrize(
    ("spec", "blocks"),
    [("28,29", (28, 29)), ("26-29", (26, 27, 28, 29)), ("0, 26-27", (0, 26, 27)), ("5,1", (1, 5)), ("3-3", (3,))],
)
def test_parse_layers(spec, blocks):
    assert parse_layers(spec) == blocks
    assert parse_layers(format_layers(blocks)) == blocks


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("", "block indices"),
        ("a", "block indices"),
        ("-1", "block indices"),
        ("5-3", "backwards"),
        ("1,1-2", "once"),
        ("0-999999999", "no model has that many blocks"),
    ],
)
def test_parse_layers_refuses(spec, says):
    with pytest.raises(ValueError, match=says):
        parse_layers(spec)


def test_cli_bad_spec_is_one_line(tmp_path):
    run = subprocess.run(
        [os.path.join(BIN, "client"), "tune", "--data", str(tmp_path), "--lora-layers", "5-3"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "--lora-layers" in run.stderr and "backwards" in run.stderr, run.stderr
    helped = subprocess.run([os.path.join(BIN, "client"), "tune", "--help"], capture_output=True, text=True)
    assert "--lora-layers" in helped.stdout and "layers_to_transform" in helped.stdout


def _train(models, data, steps: int, lr: float = 5e-2):
    """Trains each model the same steps; returns the float32 losses of each and the adapters' last gradients."""
    opts = [torch.optim.AdamW(m.adapter.parameters(), lr=lr) for m in models]
    losses = [[] for _ in models]
    grads = [None for _ in models]
    for step in range(steps):
        batch = data.batch_at(step)
        for i, (m, opt) in enumerate(zip(models, opts)):
            opt.zero_grad()
            loss, _ = m.loss(batch, step, seed=3, train=True)
            loss.backward()
            losses[i].append(float(loss.detach()))
            grads[i] = [p.grad.clone() for p in m.adapter.parameters()]
            opt.step()
    return losses, grads


def test_top_only_one_round_trip_and_exact(tiny_models, sample_data, server_factory):
    mport = free_port()
    server = server_factory(tiny_models["llama"], "--metrics-port", str(mport))
    lora = LoraConfig(rank=4, alpha=8, dropout=0.1, layers=TOP)
    transport = Transport(server.transport_cfg())
    split = connect_split(transport, lora, seed=3)
    local = build_local(tiny_models["llama"], "2:2", lora, seed=3)
    assert {s.block for s in split.adapter.specs} == set(TOP) == {s.block for s in local.adapter.specs}
    assert split.session.info.lora_layers == list(TOP) and not split.session.info.middle_slots
    assert not split.trains_below_top() and not local.trains_below_top()
    data = load_split(sample_data, split.tokenizer, seq_len=24, batch_size=3, seed=3, val_fraction=0.1)

    losses, grads = _train((split, local), data, steps=3)
    assert losses[0] == losses[1], "top-only split must equal local mode exactly"
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    kinds = transport.meter.totals()["per_kind"]
    assert kinds["Forward"]["calls"] == 3 and "Backward" not in kinds  # one round trip per step
    assert metric(mport, "tandem_steps_total") == 0  # the cloud made no backward ...
    assert metric(mport, "tandem_forward_state_bytes") == 0  # ... and keeps no state for one
    tokens, hidden = 3 * 24, int(split.config.hidden_size)
    assert (
        expected_bytes(split, tokens)
        == step_bytes(tokens, hidden, 0, backward=False).total
        == 2 * tokens * hidden * 4 + tokens
    )

    # Anything trainable below the top cut brings the backward back: the client's bottom blocks, say.
    split.unfreeze_client_blocks()
    assert split.trains_below_top()
    loss, _ = split.loss(data.batch_at(3), 3, seed=3, train=True)
    loss.backward()
    assert transport.meter.totals()["per_kind"]["Backward"]["calls"] == 1
    split.close()
    transport.close()


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_mixed_layers_split_equals_local(arch, tiny_models, sample_data, server_factory):
    """Some bottom, some middle, some top blocks: the remote slots are the listed middle blocks only."""
    server = server_factory(tiny_models[arch])
    lora = LoraConfig(rank=4, alpha=8, dropout=0.1, layers=(1, 3, 4))
    transport = Transport(server.transport_cfg())
    split = connect_split(transport, lora, seed=3)
    local = build_local(tiny_models[arch], "2:2", lora, seed=3)
    assert [s.name for s in split.adapter.specs] == [s.name for s in local.adapter.specs]
    assert {s.block for s in split.adapter.specs} == {1, 3, 4}
    assert {int(slot.name.split(".")[2]) for slot in split.session.info.middle_slots} == {3}
    data = load_split(sample_data, split.tokenizer, seq_len=24, batch_size=3, seed=3, val_fraction=0.1)
    losses, grads = _train((split, local), data, steps=3)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for gs, gl in zip(*grads):
        assert float((gs - gl).norm()) <= 1e-5 * max(float(gl.norm()), 1e-12)
    assert transport.meter.totals()["per_kind"]["Backward"]["calls"] == 3
    split.close()
    transport.close()


def _open(transport, layers):
    return transport.call(
        "OpenSession", pb.OpenSessionRequest(lora=pb.LoraSpec(rank=2), remote_lora=True, lora_layers=layers)
    )


@pytest.mark.parametrize(
    ("layers", "says"),
    [([-1], "not blocks"), ([6], "not blocks"), ([2, 2], "more than once"), (list(range(100_000)), "lists 100000")],
)
def test_cloud_refuses_bad_lora_layers(layers, says, tiny_models, server_factory):
    server = server_factory(tiny_models["llama"])
    transport = Transport(server.transport_cfg(seal=False, retries=0))
    with pytest.raises(ServerError, match=says):
        _open(transport, layers)
    ok = _open(transport, [1, 3])  # a good list is echoed, and the remote slots are its middle blocks
    assert list(ok.lora_layers) == [1, 3] and {int(s.name.split(".")[2]) for s in ok.middle_slots} == {3}
    transport.close()


def test_client_refuses_a_server_that_ignores_lora_layers(tiny_models, server_factory, monkeypatch):
    server = server_factory(tiny_models["llama"])
    transport = Transport(server.transport_cfg(seal=False))
    real = transport.call

    def old_server(method, req, **kw):  # answers as a server from before lora_layers would: no echo
        resp = real(method, req, **kw)
        if method == "OpenSession":
            resp.ClearField("lora_layers")
        return resp

    monkeypatch.setattr(transport, "call", old_server)
    with pytest.raises(ClientError, match="does not support --lora-layers"):
        connect_split(transport, LoraConfig(rank=2, layers=TOP), seed=0)
    transport.close()


def test_layers_that_carry_no_slot_are_refused(tiny_models):
    with pytest.raises(ClientError, match="carry no LoRA slot"):  # a middle block, but no middle LoRA (as offsite)
        build_local(tiny_models["llama"], "2:2", LoraConfig(rank=2, layers=(2, 4)), seed=0, middle_lora=False)
    with pytest.raises(ClientError, match="not blocks of the model"):
        build_local(tiny_models["llama"], "2:2", LoraConfig(rank=2, layers=(4, 6)), seed=0)


def test_top_only_adapter_exports_pushes_and_loads(tiny_models, server_factory, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = build_local(tiny_models["llama"], "2:2", LoraConfig(rank=4, alpha=8, layers=TOP), seed=0)
    with torch.no_grad():
        for b in model.adapter.b:
            b.normal_(0, 0.05)
    out = str(tmp_path / "adapter")
    save_peft(model.adapter, out, PeftMeta(model.model_id))
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["layers_to_transform"] == list(TOP)
    assert adapter_lora_config(out).layers == TOP  # what `client eval` tunes its session with

    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones_like(ids)
    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        ours = model.logits(ids, mask, 0, 0, train=False)
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
    assert float((ours - theirs).abs().max()) < 1e-4  # peft reads layers_to_transform as we wrote it

    server = server_factory(tiny_models["llama"], "--adapter-registry", str(tmp_path / "registry"))
    pushed = push_adapter(server.transport_cfg(), out, name="top-only")
    assert sorted(pushed["blocks"]) == list(TOP)


def test_tune_top_only_split_equals_local_with_audit(tiny_models, sample_data, server_factory, tmp_path):
    """The whole run (trainer, audit, report, checkpoint, adapter): exact, one round trip, resumes only alike."""
    from tandem.client.errors import CheckpointError
    from tandem.client.trainer import TuneConfig, tune

    server = server_factory(tiny_models["llama"])
    common = dict(data=sample_data, steps=3, batch_size=2, seq_len=32, lora=LoraConfig(rank=4, alpha=8, layers=TOP))
    split = tune(TuneConfig(out=str(tmp_path / "s"), progress=False, **common), server.transport_cfg())
    local = tune(
        TuneConfig(out=str(tmp_path / "l"), mode="local", model=tiny_models["llama"], progress=False, **common)
    )
    assert [s["loss"] for s in split["steps"]] == [s["loss"] for s in local["steps"]]
    kinds = split["totals"]["per_kind"]
    assert kinds["Forward"]["calls"] == 3 and "Backward" not in kinds
    assert split["config"]["lora"]["layers"] == list(TOP)
    with open(tmp_path / "s" / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["layers_to_transform"] == list(TOP)
    with pytest.raises(CheckpointError, match="--lora-layers 4-5"):
        other = LoraConfig(rank=4, alpha=8, layers=(5,))
        resumed = TuneConfig(
            out=str(tmp_path / "s"), resume=True, progress=False, **{**common, "lora": other, "steps": 4}
        )
        tune(resumed, server.transport_cfg())


def test_offsite_top_only_tunes_pushes_and_evaluates(sample_data, server_factory, tmp_path):
    """Offsite mode: a top-only adapter, pushed and evaluated through the split path."""
    from tandem.client.assemble import build_offsite
    from tandem.client.offsite import eval_plugin
    from tandem.client.trainer import TuneConfig, tune
    from tandem.emulator.build import build_emulator
    from tandem.emulator.distill import DistillConfig
    from tandem.testing.models import make_model

    model_dir = make_model("llama", str(tmp_path / "llama8"), layers=8)  # 2:2 leaves 4 middle blocks, 2 kept
    pkg = str(tmp_path / "pkg")
    distill = DistillConfig(steps=2, batch_size=4, seq_len=32, lr=3e-3, warmup=1, val_every=5, progress=False)
    build_emulator(model_dir, "2:2", pkg, sample_data, distill, drop_ratio=0.5)
    with pytest.raises(ClientError, match="blocks 3 are not in this emulator"):  # a dropped block cannot be adapted
        build_offsite(pkg, LoraConfig(rank=2, layers=(3, 7)), 0)

    run = str(tmp_path / "run")
    lora = LoraConfig(rank=4, alpha=8, layers=(6, 7))
    tune(
        TuneConfig(data=sample_data, out=run, mode="offsite", emulator=pkg, steps=3, lr=1e-2, lora=lora, progress=False)
    )
    adapter = os.path.join(run, "adapter")
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        assert json.load(f)["layers_to_transform"] == [6, 7]
    server = server_factory(model_dir, "--emulator", pkg, "--adapter-registry", str(tmp_path / "registry"))
    assert push_adapter(server.transport_cfg(), adapter, "top")["blocks"] == [6, 7]
    rep = eval_plugin(server.transport_cfg(), adapter, sample_data, str(tmp_path / "eval"), seq_len=32, name="top")
    assert rep["validation"]["plugged_in"]["loss"] != rep["validation"]["zero_shot"]["loss"]
