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
        list(read_examples(str(tmp_path / "missing")))
    with pytest.raises(DataError, match="no .txt/.text/.md/.jsonl files"):
        list(read_examples(str(tmp_path)))
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"a.jsonl:2: not valid JSON"):
        list(read_examples(str(tmp_path)))
    (tmp_path / "a.jsonl").write_text('{"question": "?"}\n')
    with pytest.raises(DataError, match="expected"):
        list(read_examples(str(tmp_path)))
    (tmp_path / "a.jsonl").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="cannot read"):
        list(read_examples(str(tmp_path)))


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


MEASURE = r"""
import json, resource, sys
from transformers import PreTrainedTokenizerFast
from tandem.client.data import PIECE_CHARS, pack, pieces, read_examples

tok = PreTrainedTokenizerFast.from_pretrained(sys.argv[1])
tok("warm up", add_special_tokens=False)
longest = 0

class Spy:  # the tokenizer, recording the longest text one call saw
    eos_token_id, pad_token_id = tok.eos_token_id, tok.pad_token_id

    def __call__(self, text, **kw):
        global longest
        longest = max(longest, len(text))
        return tok(text, **kw)

base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
packed = pack(read_examples(sys.argv[2]), Spy(), 128)
peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
ids = packed.input_ids[packed.attention_mask.bool()].tolist()
text = open(sys.argv[3]).read()
expected = [t for p in pieces([text]) for t in tok(p, add_special_tokens=False)["input_ids"]] + [tok.eos_token_id]
cut = list(pieces([text]))
print(json.dumps({"peak_mb": peak_mb, "longest": longest, "cap": PIECE_CHARS, "tokens": len(ids),
                  "equal": ids == expected, "joined": "".join(cut) == text, "max_piece": max(map(len, cut))}))
"""


def test_one_huge_line_is_read_in_bounded_memory(tiny_models, tmp_path):
    """A multi-MB single-line .txt: no tokenizer call sees more than PIECE_CHARS characters, peak memory stays
    near the 8 bytes a token the result needs (before: the whole line in one call, 1.6 GB for 8 MB), and the
    tokens are exactly those of the pieces, which join back to the text."""
    import random
    import subprocess
    import sys

    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "split", "learning", "cloud", "adapters", "x7q", "zzkj", "\u00e9t\u00e9"]
    text = " ".join(rng.choice(words) for _ in range(700_000))[:4_000_000] + "nospace" * 2000  # a word > the cap too
    data = tmp_path / "data"
    data.mkdir()
    (data / "one_line.txt").write_text(text, encoding="utf-8")
    r = subprocess.run(
        [sys.executable, "-c", MEASURE, tiny_models["llama"], str(data), str(data / "one_line.txt")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["longest"] <= m["cap"] and m["max_piece"] <= m["cap"]
    assert m["equal"] and m["joined"]
    assert m["tokens"] > 2_000_000
    assert m["peak_mb"] < 300, m  # ids, labels and mask are 3 x 8 bytes a token (~65 MB each here) at most twice


def test_which_files_are_read(tok, tmp_path, caplog):
    for name, text in {
        "a.txt": "alpha",
        "b.TXT": "beta",
        "c.text": "gamma",
        "d.md": "# delta",
        "e.jsonl": '{"text": "eps"}\n',
        "f.pdf": "%PDF",
        "g.docx": "PK",
        ".hidden": "x",
        "h.txt": "  \n\t ",
    }.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "sub").mkdir()
    from tandem.client.data import data_files

    with caplog.at_level("WARNING"):
        names = data_files(str(tmp_path), warn=True)
    assert names == ["a.txt", "b.TXT", "c.text", "d.md", "e.jsonl", "h.txt"]
    assert "ignoring 3 file(s)" in caplog.text and "f.pdf, g.docx, sub" in caplog.text
    completions = ["".join(c) for _, c in read_examples(str(tmp_path))]
    assert completions == ["alpha", "beta", "gamma", "# delta", "eps"]  # the whitespace-only file adds nothing


def test_validation_set_is_capped_and_the_rest_trains(tok, tmp_path):
    """A large corpus holds out at most val_max sequences (evaluation stays minutes long); nothing is lost from training."""
    from tandem.client.data import MAX_VAL_SEQUENCES

    (tmp_path / "big.txt").write_text(" ".join(f"w{i % 97}" for i in range(60_000)))
    full = load_split(str(tmp_path), tok, 16, 4, seed=0, val_fraction=0.1, val_max=10**9)
    n = len(full.train) + len(full.val)
    assert len(full.val) == round(n * 0.1) > 40, len(full.val)  # the share alone
    capped = load_split(str(tmp_path), tok, 16, 4, seed=0, val_fraction=0.1, val_max=40)
    assert len(capped.val) == 40 and len(capped.train) + len(capped.val) == n
    assert sum(1 for _ in capped.val_batches()) == 10  # 40 sequences in batches of 4
    again = load_split(str(tmp_path), tok, 16, 4, seed=0, val_fraction=0.1, val_max=40)
    assert torch.equal(again.val.batch(torch.arange(40))["input_ids"], capped.val.batch(torch.arange(40))["input_ids"])
    default = load_split(str(tmp_path), tok, 16, 4, seed=0, val_fraction=0.5)
    assert len(default.val) == min(MAX_VAL_SEQUENCES, round(n * 0.5)) == MAX_VAL_SEQUENCES
