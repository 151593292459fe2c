"""The tuned adapter is a real peft LoRA: PeftModel.from_pretrained(full model) reproduces the client's logits."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tandem.client.assemble import build_local, connect_split
from tandem.client.transport import Transport
from tandem.stages.arch import arch_for
from tandem.stages.lora import LoraConfig, PeftMeta, save_peft
from tandem.testing.models import ARCHS


def _train_a_bit(sm, steps=3):
    """Random-ish updates so that every LoRA B is non-zero."""
    opt = torch.optim.SGD(sm.adapter.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        ids = torch.randint(3, 200, (2, 12), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        opt.zero_grad()
        loss, _ = sm.loss(batch, step, seed=0, train=True)
        loss.backward()
        opt.step()
    assert all(b.abs().sum() > 0 for b in sm.adapter.b)


def _peft_logits(model_dir, adapter_dir, ids, am):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return peft_model(input_ids=ids, attention_mask=am).logits


def _check(sm, model_dir, adapter_dir):
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[1, 7:] = 0  # right padding
    with torch.no_grad():
        mine = sm.logits(ids, am, step=0, seed=0, train=False)
    theirs = _peft_logits(model_dir, adapter_dir, ids, am)
    valid = am.bool()
    assert torch.allclose(mine[valid], theirs[valid], atol=1e-5, rtol=1e-5)
    # And the adapter matters: without it the logits differ.
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=am).logits
    assert not torch.allclose(mine[valid], plain[valid], atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_reload_reproduces_logits(arch, tiny_models, tmp_path):
    sm = build_local(tiny_models[arch], "2:2", LoraConfig(rank=4, alpha=8), seed=0)
    _train_a_bit(sm)
    out = str(tmp_path / "adapter")
    save_peft(sm.adapter, out, PeftMeta(sm.model_id, fan_in_fan_out=arch_for(sm.config).fan_in_fan_out))
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert (
        cfg["peft_type"] == "LORA"
        and cfg["r"] == 4
        and cfg["target_modules"] == sorted(arch_for(sm.config).lora_targets)
    )
    _check(sm, tiny_models[arch], out)


def test_peft_reload_after_split_training(tiny_models, server_factory, tmp_path):
    """The adapter trained through a real server (remote LoRA included) loads in peft on the full model."""
    server = server_factory(tiny_models["qwen2"])
    t = Transport(server.transport_cfg())
    sm = connect_split(t, LoraConfig(rank=4, alpha=8), seed=0)
    _train_a_bit(sm)
    out = str(tmp_path / "adapter")
    save_peft(sm.adapter, out, PeftMeta(sm.model_id))
    _check(sm, tiny_models["qwen2"], out)
    sm.close()
    t.close()


def test_default_targets_match_peft():
    """Our per-architecture default LoRA targets are peft's."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    for cfg in (LlamaConfig(), Qwen2Config(), GPT2Config()):
        assert set(arch_for(cfg).lora_targets) == set(peft_defaults[cfg.model_type])
