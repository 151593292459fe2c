"""`cloud plan`: sized from the config alone, it must agree with a real server and client on the same shapes."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from tandem.client.assemble import connect_split
from tandem.client.trainer import TuneConfig, tune
from tandem.client.transport import Transport
from tandem.cloud.cli import main as cloud_main
from tandem.cloud.plan import PlanConfig, plan
from tandem.stages.arch import parts_of
from tandem.stages.errors import LayoutError
from tandem.stages.loading import client_state, load_model, pack_state, tokenizer_files
from tandem.stages.lora import LoraConfig
from tandem.stages.modules import StageLayout
from tandem.testing.cli_errors import one_line_error
from tandem.testing.models import ARCHS
from tandem.testing.servers import BIN, free_port, metric

BATCH, SEQ, RANK = 2, 24, 4


def _near(planned: float, measured: float, within: float = 0.10) -> bool:
    return measured > 0 and abs(planned - measured) <= within * measured


def _plan(model_dir: str, **kw) -> dict:
    return plan(PlanConfig(model=model_dir, batch_size=BATCH, seq_len=SEQ, lora_rank=RANK, **kw))


@pytest.mark.parametrize("arch,codec", [(arch, "float32") for arch in ARCHS] + [("llama", "int8")])
def test_plan_matches_a_real_split_run(arch, codec, tiny_models, sample_data, server_factory, tmp_path):
    """Bytes per step each way from a `client tune` report, and the forward state the server holds for one step."""
    planned = _plan(tiny_models[arch], codec=codec)
    mport = free_port()
    server = server_factory(tiny_models[arch], "--metrics-port", str(mport))
    cfg = TuneConfig(
        data=sample_data,
        out=str(tmp_path / "run"),
        steps=3,
        batch_size=BATCH,
        seq_len=SEQ,
        lr=1e-2,
        seed=3,
        lora=LoraConfig(rank=RANK, alpha=8),
        checkpoint_every=100,
        audit="no",
        progress=False,
    )
    report = tune(cfg, server.transport_cfg(codec=codec))
    for step in report["steps"][1:]:
        assert _near(planned["step_bytes"]["up"], step["bytes_sent"]), (planned["step_bytes"], step)
        assert _near(planned["step_bytes"]["down"], step["bytes_received"]), (planned["step_bytes"], step)
    assert report["per_token"]["expected_bytes_per_step"] == planned["step_bytes"]["total"]

    # One training forward whose backward never comes: the server holds its forward state and reports it.
    held = _held_after_one_forward(server, mport, planned["hidden_size"])
    assert _near(planned["cloud"]["forward_state_bytes"]["keep"], held), (planned["cloud"], held)


def _held_after_one_forward(server, mport: int, hidden_size: int) -> float:
    """The forward state the server reports holding for one training forward whose backward never comes."""
    transport = Transport(server.transport_cfg())
    try:
        model = connect_split(transport, LoraConfig(rank=RANK, alpha=8), seed=0)
        hidden = torch.randn(BATCH, SEQ, hidden_size)
        model.middle.forward_rpc(hidden, torch.ones(BATCH, SEQ, dtype=torch.long), 0, 0, train=True)
        return metric(mport, "tandem_forward_state_bytes")
    finally:
        transport.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_plan_matches_the_recompute_server(arch, tiny_models, server_factory):
    planned = _plan(tiny_models[arch])
    mport = free_port()
    server = server_factory(tiny_models[arch], "--forward-state", "recompute", "--metrics-port", str(mport))
    held = _held_after_one_forward(server, mport, planned["hidden_size"])
    assert _near(planned["cloud"]["forward_state_bytes"]["recompute"], held), (planned["cloud"], held)


@pytest.mark.parametrize("arch", ARCHS)
def test_plan_weights_and_download_match_the_loaded_model(arch, tiny_models):
    planned = _plan(tiny_models[arch])
    loaded = load_model(tiny_models[arch])
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    assert _near(planned["cloud"]["weights_bytes"], weights, 0.001)
    layout = StageLayout.parse("2:2", loaded.config)
    blob = pack_state(client_state(parts_of(loaded.model), layout))
    tokenizer = sum(len(b) for b in tokenizer_files(tiny_models[arch]).values())
    assert _near(planned["client"]["download_bytes"], len(blob) + tokenizer, 0.01)
    half = _plan(tiny_models[arch], dtype="bfloat16")
    assert half["cloud"]["weights_bytes"] * 2 == planned["cloud"]["weights_bytes"]


def _one_line(argv, capsys) -> str:
    return one_line_error(lambda args: cloud_main(["plan", *args]), argv, capsys)


def test_bad_input_is_one_line(tiny_models, tmp_path, capsys):
    model = ["--model", tiny_models["llama"]]
    cases = {
        "not a directory": ["--model", str(tmp_path / "missing")],
        "leave no block": [*model, "--client-blocks", "3:3"],
        "K:M": [*model, "--client-blocks", "2-2"],
        "--batch-size": [*model, "--batch-size", "0"],
        "--seq-len": [*model, "--seq-len", "-5"],
        "positions": [*model, "--seq-len", "100000"],
        "--sessions": [*model, "--sessions", "0"],
        "--memory-cap-mb": [*model, "--memory-cap-mb", "0"],
        "--codec": [*model, "--codec", "int3"],
        "--lora-targets": [*model, "--lora-targets", "nope_proj"],
    }
    for needle, argv in cases.items():
        line = _one_line(argv, capsys)
        assert line.startswith("cloud plan: ") and needle in line, (needle, line)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "config" in _one_line(["--model", str(empty)], capsys)


def test_json_and_table_from_the_installed_command(tiny_models):
    cmd = [os.path.join(BIN, "cloud"), "plan", "--model", tiny_models["qwen2"], "--batch-size", "2", "--seq-len", "24"]
    out = subprocess.run([*cmd, "--sessions", "3", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    planned = json.loads(out.stdout)
    assert planned["sessions"] == 3 and planned["middle_blocks"] == 2
    state, fit = planned["cloud"]["forward_state_bytes"], planned["cloud"]["sessions_fit"]
    assert state["recompute"] < state["keep"] and fit["recompute"] >= fit["keep"] >= 1
    per_session = state["keep"] + planned["cloud"]["session_resident_bytes"]
    assert fit["keep"] == planned["cloud"]["memory_cap_bytes"] // per_session
    table = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    for row in (
        "client download",
        "bytes per step",
        "cloud weights",
        "forward state per session (keep)",
        "sessions fit",
    ):
        assert row in table.stdout, (row, table.stdout)


def test_plan_of_a_top_only_adapter_matches_a_real_run(tiny_models, sample_data, server_factory, tmp_path):
    """`cloud plan --lora-layers` with LoRA above the top cut only: one round trip, no gradients, no forward state,
    and the bytes a real top-only `client tune` carries."""
    top = tuple(StageLayout.parse("2:2", load_model(tiny_models["llama"]).config).top_blocks)
    planned = _plan(tiny_models["llama"], lora_layers=top)
    assert planned["lora"]["round_trips_per_step"] == 1 and planned["lora"]["remote_params"] == 0
    assert set(planned["cloud"]["forward_state_bytes"].values()) == {0}
    assert planned["step_bytes"]["total"] < _plan(tiny_models["llama"])["step_bytes"]["total"] / 2
    server = server_factory(tiny_models["llama"])
    cfg = TuneConfig(
        data=sample_data,
        out=str(tmp_path / "run"),
        steps=2,
        batch_size=BATCH,
        seq_len=SEQ,
        lora=LoraConfig(rank=RANK, alpha=8, layers=top),
        checkpoint_every=100,
        audit="no",
        progress=False,
    )
    report = tune(cfg, server.transport_cfg())
    assert report["per_token"]["expected_bytes_per_step"] == planned["step_bytes"]["total"]
    for step in report["steps"]:
        assert _near(planned["step_bytes"]["up"], step["bytes_sent"]), (planned["step_bytes"], step)
        assert _near(planned["step_bytes"]["down"], step["bytes_received"]), (planned["step_bytes"], step)
    with pytest.raises(LayoutError, match="not blocks of the model"):
        _plan(tiny_models["llama"], lora_layers=(99,))
