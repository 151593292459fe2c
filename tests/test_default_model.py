"""A few checks on the real default model, SmolLM2-135M-Instruct (30 blocks, hidden 576)."""

from __future__ import annotations

import pytest
import torch

from tandem.client.assemble import build_local, connect_split
from tandem.client.transport import Transport
from tandem.stages.lora import LoraConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_model():
    return build_local(None, "2:2", LoraConfig(rank=8, alpha=16), seed=0)


def test_default_model_is_smollm2(local_model):
    cfg = local_model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert local_model.model_id == "SmolLM2-135M-Instruct"
    # Its own tokenizer, loaded from the GGUF conversion, round-trips text.
    tok = local_model.tokenizer
    assert tok.decode(tok("The capital of France is Paris.")["input_ids"]) == "The capital of France is Paris."


def test_split_step_equals_local_on_smollm2(local_model, sample_data, server_factory):
    server = server_factory(None, timeout=300)
    t = Transport(server.transport_cfg())
    split = connect_split(t, LoraConfig(rank=8, alpha=16), seed=0)
    assert split.layout.num_layers == 30 and len(split.names[1]) == 2 * 26  # q,v in each of 26 middle blocks
    tok = split.tokenizer
    texts = [
        "Order 1001: a red lamp shipped from Paris, the capital of France.",
        "Q: What is the capital of Peru?\nA: Lima.",
    ]
    enc = tok(texts, padding=True, return_tensors="pt")
    batch = {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100),
    }
    # A real model knows this text: the loss is far below uniform (ln 49152 = 10.8).
    for m in (split, local_model):
        for p in m.adapter.b:
            torch.nn.init.normal_(p, std=0.01, generator=torch.Generator().manual_seed(0))
    losses, grads = [], []
    for m in (split, local_model):
        m.adapter.zero_grad()
        loss, _ = m.loss(batch, 0, 0, train=True)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append(torch.cat([p.grad.reshape(-1) for p in m.adapter.parameters()]))
    assert losses[0] < 6.0
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert float((grads[0] - grads[1]).norm() / grads[1].norm()) < 1e-5
    split.close()
    t.close()


def test_smollm2_has_an_attention_sink_that_the_package_measures(sample_data):
    """The first token's output of SmolLM2's middle is a huge, nearly constant vector: the emulator must ship it."""
    from transformers import AutoTokenizer

    from tandem.emulator.sink import measure_sink
    from tandem.emulator.text import pack_blocks, read_texts
    from tandem.stages.loading import default_model_dir, load_model
    from tandem.stages.modules import StageLayout

    loaded = load_model(None)
    blocks = pack_blocks(read_texts(sample_data), AutoTokenizer.from_pretrained(default_model_dir()), 32)
    vec, stats = measure_sink(loaded, StageLayout.parse("2:2", loaded.config), blocks, max_blocks=16)
    assert stats["used"] and stats["ratio"] > 20 and stats["spread"] < 0.1, stats
    assert stats["made_by_block"] == 11  # which a uniform 10 of 26 (2, 5, 8, 10, 13, ...) drops
    assert vec.shape == (576,) and float(vec.pow(2).mean().sqrt()) > 300
