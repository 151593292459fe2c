"""Reading and packing the data owner's text; clear errors for bad data directories."""
from __future__ import annotations

import json

import pytest
import torch

from tandem.client.data import IGNORE, DataError, load_split, pack, read_examples


@pytest.fixture(scope="module")
def tok(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["llama"])


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        read_examples(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="no .txt or .jsonl"):
        read_examples(str(tmp_path))
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"a.jsonl:2: not valid JSON"):
        read_examples(str(tmp_path))
    (tmp_path / "a.jsonl").write_text('{"question": "?"}\n')
    with pytest.raises(DataError, match="expected"):
        read_examples(str(tmp_path))
    (tmp_path / "a.jsonl").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="cannot read"):
        read_examples(str(tmp_path))


def test_prompt_tokens_carry_no_loss(tok, tmp_path):
    (tmp_path / "qa.jsonl").write_text(json.dumps({"prompt": "the quick", "completion": " brown fox"}) + "\n")
    packed = pack(read_examples(str(tmp_path)), tok, seq_len=16)
    p = tok("the quick", add_special_tokens=False)["input_ids"]
    c = tok(" brown fox", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    row_labels = packed.labels[0].tolist()
    assert row_labels[: len(p)] == [IGNORE] * len(p)
    assert row_labels[len(p) : len(p) + len(c)] == c
    assert packed.attention_mask[0].sum() == len(p) + len(c)  # the rest is padding
    assert all(x == IGNORE for x in row_labels[len(p) + len(c) :])


def test_batches_depend_only_on_seed_and_data(tok, sample_data):
    a = load_split(sample_data, tok, 24, 3, seed=1, val_fraction=0.1)
    b = load_split(sample_data, tok, 24, 3, seed=1, val_fraction=0.1)
    c = load_split(sample_data, tok, 24, 3, seed=2, val_fraction=0.1)
    for step in (0, 5, a.batches_per_epoch + 1):
        assert torch.equal(a.batch_at(step)["input_ids"], b.batch_at(step)["input_ids"])
    assert not torch.equal(a.batch_at(0)["input_ids"], c.batch_at(0)["input_ids"])
    # Train and validation partition the packed sequences.
    whole = pack(read_examples(sample_data), tok, 24)
    assert len(a.train) + len(a.val) == len(whole) and len(a.val) >= 1
    rows = sorted(map(tuple, whole.input_ids.tolist()))
    assert sorted(map(tuple, a.train.input_ids.tolist() + a.val.input_ids.tolist())) == rows
