"""One tokenizer loader for every mode: local, split (files shipped by the cloud), offsite and the cloud's own
generation tokenize a text to the same ids, whatever class the tokenizer files name."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tandem.stages.loading import load_tokenizer, tokenizer_files

# NFC-sensitive (a decomposed accent), digits, brackets: where a model-specific class (Qwen2Tokenizer rebuilds the
# normalizer and pre-tokenizer) and the generic one the files name (TokenizersBackend) disagree.
TEXT = "cafe\u0301 (quick) 12345 brown\u00a0fox, the lazy dog's e\u0301t\u00e9.\n\n  split learning"


def _ids(tok, text=TEXT):
    return tok(text, add_special_tokens=False)["input_ids"]


def _split_side(model_dir):
    """The tokenizer as split mode gets it: the files the cloud ships (no config.json), loaded by the client."""
    from tandem.client.downloads import load_tokenizer as from_downloaded_files

    return from_downloaded_files(tokenizer_files(model_dir))


@pytest.fixture(scope="module")
def named_qwen2(tiny_models, tmp_path_factory):
    """The tiny Qwen2 model whose tokenizer files name the model-specific class instead of the generic one."""
    d = str(tmp_path_factory.mktemp("named") / "qwen2")
    shutil.copytree(tiny_models["qwen2"], d)
    path = os.path.join(d, "tokenizer_config.json")
    cfg = json.load(open(path))
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    json.dump(cfg, open(path, "w"))
    return d


def test_the_issue_case_differs_under_autotokenizer(tiny_models):
    """The bug: beside a qwen2 config.json, AutoTokenizer ignores the generic class the files name."""
    from transformers import AutoTokenizer

    d = tiny_models["qwen2"]
    assert json.load(open(os.path.join(d, "tokenizer_config.json")))["tokenizer_class"] == "TokenizersBackend"
    assert type(AutoTokenizer.from_pretrained(d)).__name__ == "Qwen2Tokenizer"
    assert _ids(AutoTokenizer.from_pretrained(d)) != _ids(_split_side(d))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2", "qwen2-named"])
def test_every_mode_loads_the_same_ids(kind, tiny_models, named_qwen2):
    from tandem.client.assemble import build_local
    from tandem.stages.lora import LoraConfig

    d = named_qwen2 if kind == "qwen2-named" else tiny_models[kind]
    local = build_local(d, "2:2", LoraConfig(rank=2), seed=0).tokenizer
    split = _split_side(d)
    assert type(local) is type(split) is type(load_tokenizer(d))
    assert _ids(local) == _ids(split) == _ids(load_tokenizer(d))
    assert len(_ids(local)) > 20
    assert (local.eos_token_id, local.pad_token_id) == (split.eos_token_id, split.pad_token_id)
    if kind == "qwen2-named":  # a model-specific class the files name is kept, in every mode
        assert type(local).__name__ == "Qwen2Tokenizer"


def test_split_and_local_losses_agree_from_step_0_on_generic_qwen2(tiny_models, server_factory, tmp_path):
    """End to end against a real server: each mode packs the text with its own tokenizer (the issue: 1,667 vs
    1,669 tokens, up to 0.6% loss apart); the packed ids and the step-0 losses are the same."""
    from tandem.client.assemble import build_local, connect_split
    from tandem.client.data import load_split
    from tandem.client.transport import Transport
    from tandem.stages.lora import LoraConfig

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text((TEXT + " ") * 40)
    server = server_factory(tiny_models["qwen2"])
    t = Transport(server.transport_cfg())
    lora = LoraConfig(rank=2, alpha=4)
    split = connect_split(t, lora, seed=1)
    local = build_local(tiny_models["qwen2"], "2:2", lora, seed=1)
    try:
        ds = load_split(str(data), split.tokenizer, 32, 2, 1, 0.2)
        dl = load_split(str(data), local.tokenizer, 32, 2, 1, 0.2)
        assert torch.equal(ds.train.input_ids, dl.train.input_ids) and torch.equal(ds.val.input_ids, dl.val.input_ids)
        with torch.no_grad():
            ls, _ = split.loss(ds.batch_at(0), 0, 1, train=False)
            ll, _ = local.loss(dl.batch_at(0), 0, 1, train=False)
        assert float(ls) == pytest.approx(float(ll), rel=1e-5)
    finally:
        split.close()
        t.close()
