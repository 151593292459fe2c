"""Property: over random small Llama, Qwen2 and GPT-2 configs, split mode (a real TLS server process) gives the
losses and gradients of local mode, each mode packing the data with its own tokenizer."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tandem.testing.models import make_tokenizer
from tandem.testing.servers import start_server


@st.composite
def configs(draw):
    arch = draw(st.sampled_from(["llama", "qwen2", "gpt2"]))
    heads = draw(st.sampled_from([2, 4]))
    cfg = {
        "arch": arch,
        "heads": heads,
        "head_dim": draw(st.sampled_from([8, 16])),
        "layers": draw(st.sampled_from([5, 6])),
        "extra_vocab": draw(st.integers(0, 40)),
        "tied": draw(st.booleans()),
        "seed": draw(st.integers(0, 3)),
    }
    if arch != "gpt2":
        cfg["kv_heads"] = draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0 and k <= heads]))
        cfg["rope_theta"] = draw(st.sampled_from([10_000.0, 500_000.0]))
    if arch == "llama":
        cfg["attention_bias"] = draw(st.booleans())
    return cfg


def _write_model(c: dict, out: str) -> str:
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    os.makedirs(out, exist_ok=True)
    tok = make_tokenizer(out)
    hidden = c["heads"] * c["head_dim"]
    common = dict(
        vocab_size=len(tok) + c["extra_vocab"],
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=c["tied"],
    )
    if c["arch"] == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=c["layers"], n_head=c["heads"], n_positions=128, **common)
    else:
        kw = dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=c["layers"],
            num_attention_heads=c["heads"],
            num_key_value_heads=c["kv_heads"],
            max_position_embeddings=128,
            rope_theta=c["rope_theta"],
            **common,
        )
        cfg = LlamaConfig(attention_bias=c["attention_bias"], **kw) if c["arch"] == "llama" else Qwen2Config(**kw)
    torch.manual_seed(c["seed"])
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


@settings(
    max_examples=int(os.environ.get("TANDEM_PROPERTY_EXAMPLES", "4")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(c=configs())
@example(
    c={
        "arch": "qwen2",
        "heads": 4,
        "head_dim": 8,
        "layers": 6,
        "extra_vocab": 4,
        "tied": False,
        "seed": 0,
        "kv_heads": 2,
        "rope_theta": 10_000.0,
    }
)  # the case: a Qwen2 model whose tokenizer files are generic
def test_split_loss_equals_local_loss(c, sample_data, tmp_path_factory):
    from tandem.client.assemble import build_local, connect_split
    from tandem.client.data import load_split
    from tandem.client.transport import Transport
    from tandem.stages.lora import LoraConfig

    root = tmp_path_factory.mktemp("prop")
    model = _write_model(c, str(root / "model"))
    server = start_server(model, root)
    t = Transport(server.transport_cfg())
    lora = LoraConfig(rank=2, alpha=4)
    split = connect_split(t, lora, seed=c["seed"])
    try:
        local = build_local(model, "2:2", lora, seed=c["seed"])
        ds = load_split(sample_data, split.tokenizer, 24, 2, c["seed"], 0.1)
        dl = load_split(sample_data, local.tokenizer, 24, 2, c["seed"], 0.1)
        assert torch.equal(ds.train.input_ids, dl.train.input_ids), "each mode's tokenizer must give the same ids"
        opts = [torch.optim.AdamW(m.adapter.parameters(), lr=5e-2) for m in (split, local)]
        for step in range(2):
            losses, grads = [], []
            for m, opt, d in zip((split, local), opts, (ds, dl)):
                opt.zero_grad()
                loss, _ = m.loss(d.batch_at(step), step, c["seed"], train=True)
                loss.backward()
                losses.append(float(loss.detach()))
                grads.append(torch.cat([p.grad.flatten() for p in m.adapter.parameters()]))
                opt.step()
            assert losses[0] == pytest.approx(losses[1], rel=1e-5), c
            assert float((grads[0] - grads[1]).norm()) <= 1e-5 * max(float(grads[1].norm()), 1e-12), c
    finally:
        split.close()
        t.close()
        server.stop()
