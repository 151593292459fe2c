"""The strongest oracle: split mode (real TLS server process) equals local mode, loss and gradients."""

from __future__ import annotations

import pytest
import torch

from tandem.client.assemble import build_local, connect_split
from tandem.client.data import load_split
from tandem.client.transport import Transport
from tandem.stages.lora import LoraConfig
from tandem.testing.models import ARCHS


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_split_equals_local(arch, dropout, tiny_models, sample_data, server_factory):
    server = server_factory(tiny_models[arch])
    lora = LoraConfig(rank=4, alpha=8, dropout=dropout)
    t = Transport(server.transport_cfg())
    split = connect_split(t, lora, seed=3)
    local = build_local(tiny_models[arch], "2:2", lora, seed=3)
    assert [s.name for s in split.adapter.specs] == [s.name for s in local.adapter.specs]
    for a, b in zip(split.adapter.parameters(), local.adapter.parameters()):
        assert torch.equal(a, b), "LoRA init must not depend on the mode"

    data = load_split(sample_data, split.tokenizer, seq_len=24, batch_size=3, seed=3, val_fraction=0.1)
    # Right padding inside a batch: the last row is cut short.
    opts = [torch.optim.AdamW(m.adapter.parameters(), lr=5e-2) for m in (split, local)]
    for step in range(3):
        batch = data.batch_at(step)
        if step == 1:
            batch["attention_mask"][-1, 15:] = 0
            batch["labels"][-1, 15:] = -100
        losses, grads = [], []
        for m, opt in zip((split, local), opts):
            opt.zero_grad()
            loss, _ = m.loss(batch, step, seed=3, train=True)
            loss.backward()
            losses.append(float(loss.detach()))
            grads.append([p.grad.clone() for p in m.adapter.parameters()])
            opt.step()
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
        for (name, gs), gl in zip(zip([s.name for s in split.adapter.specs for _ in (0, 1)], grads[0]), grads[1]):
            if gl.norm() > 0:
                assert _rel(gs, gl) <= 1e-5, f"{name}: split and local gradients differ"
            else:
                assert gs.norm() == 0
        # The remote (middle) LoRA really receives gradient after step 0 (B starts at zero).
        if step > 0:
            mid = split.adapter.params_for(split.names[1])
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mid)
    split.close()
    t.close()


def test_cli_split_and_local_reports_match(tiny_models, sample_data, server_factory, tmp_path):
    """The console scripts themselves: same per-step losses in report.json, and the adapter files."""
    import json
    import os
    import subprocess

    from tandem.testing.servers import BIN

    server = server_factory(tiny_models["llama"])
    common = [
        "--data",
        sample_data,
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--no-progress",
        "--seed",
        "1",
    ]
    split_out, local_out = str(tmp_path / "split"), str(tmp_path / "local")
    subprocess.run(
        [os.path.join(BIN, "client"), "tune", *server.cli_args(), "--out", split_out, *common],
        check=True,
        capture_output=True,
        text=True,
    )
    subprocess.run(
        [
            os.path.join(BIN, "client"),
            "tune",
            "--mode",
            "local",
            "--model",
            tiny_models["llama"],
            "--out",
            local_out,
            *common,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    a = json.load(open(os.path.join(split_out, "report.json")))
    b = json.load(open(os.path.join(local_out, "report.json")))
    assert [s["loss"] for s in a["steps"]] == pytest.approx([s["loss"] for s in b["steps"]], rel=1e-5)
    assert all(s["bytes_sent"] > 0 and s["bytes_received"] > 0 for s in a["steps"])
    assert all(s["bytes_sent"] == 0 for s in b["steps"])
    assert a["totals"]["one_time_bytes_received"] > 0
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert os.path.exists(os.path.join(split_out, "adapter", name))
    assert os.path.getsize(os.path.join(split_out, "report.png")) > 1000


def test_full_client_block_tuning_split_equals_local(tiny_models, sample_data, server_factory, tmp_path):
    """Offsite-Tuning-style adapter layers: the client's blocks train in full, still exact, and are saved."""
    import os

    from safetensors.torch import load_file

    from tandem.client.trainer import CLIENT_BLOCKS_FILE, TuneConfig, tune

    server = server_factory(tiny_models["gpt2"])
    common = dict(
        data=sample_data,
        steps=3,
        batch_size=2,
        seq_len=32,
        lr=1e-2,
        lora=LoraConfig(rank=2),
        tune_client_blocks=True,
        progress=False,
    )
    a = tune(TuneConfig(out=str(tmp_path / "s"), **common), server.transport_cfg())
    b = tune(TuneConfig(out=str(tmp_path / "l"), mode="local", model=tiny_models["gpt2"], **common))
    assert [s["loss"] for s in a["steps"]] == pytest.approx([s["loss"] for s in b["steps"]], rel=1e-5)
    wa = load_file(os.path.join(tmp_path / "s", "adapter", CLIENT_BLOCKS_FILE))
    assert sorted({k.split(".")[2] for k in wa}) == ["0", "1", "4", "5"]  # blocks 0,1 and 4,5 of 6; never the middle
    from transformers import AutoModelForCausalLM

    orig = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"]).state_dict()
    assert any(not torch.equal(wa[k], orig[k]) for k in wa), "the client blocks were trained"
