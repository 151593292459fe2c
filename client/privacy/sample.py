"""The rows the audit's attacks run on (received states of sampled tokens, with their origin) and how guesses score."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ClientError
from . import attacks
from .cloud_view import Received


@dataclass
class Row:
    """One sampled row: the states the cloud received for a sequence's first tokens, where they came from, the truth."""

    hidden: torch.Tensor  # (T, H) as received
    ids: torch.Tensor  # (T,) the true token ids (the audit's ground truth; never given to an attacker)
    labels: torch.Tensor  # (T,) the true labels at the same positions (-100: no loss there)
    step: int
    index: int  # the sequence's row in its batch


def sample_rows(forwards: list[Received], data, tokens: int) -> list[Row]:
    """Rows of the valid tokens, round robin over the recorded steps, `tokens` in all."""
    per_step = []
    for r in sorted(forwards, key=lambda r: r.step):
        batch = data.batch_at(r.step)
        if not torch.equal(batch["attention_mask"].long(), r.mask):
            raise ClientError(
                f"{r.path}: the recorded mask does not match step {r.step} of the run's data; "
                "the audit needs the run's --data, --seq-len, --batch-size and --seed unchanged"
            )
        lengths = [int(r.mask[b].sum()) for b in range(r.hidden.shape[0])]
        per_step.append(
            [
                Row(r.hidden[b, :n], batch["input_ids"][b, :n], batch["labels"][b, :n], r.step, b)
                for b, n in enumerate(lengths)
            ]
        )
    rows, n, i = [], 0, 0
    while n < tokens and any(per_step):
        group = per_step[i % len(per_step)]
        if group:
            row = group.pop(0)
            take = min(len(row.ids), tokens - n)
            rows.append(Row(row.hidden[:take], row.ids[:take], row.labels[:take], row.step, row.index))
            n += take
        i += 1
    return rows


def pairs_of(rows: list[Row]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(received states, true ids) of each row, as the non-adaptive attacks take them."""
    return [(r.hidden, r.ids) for r in rows]


def sample_summary(forwards: list[Received], rows, search_tokens: int, candidates: int, public: torch.Tensor) -> dict:
    """What the attacks were run on: the recorded steps, the sampled tokens and the public text."""
    tokens = sum(len(r.ids) for r in rows)
    return {
        "kind": "Forward (training) requests as recorded from the transport",
        "steps": sorted({r.step for r in forwards}),
        "sequences": len(rows),
        "tokens": tokens,
        "search_tokens": min(search_tokens, tokens),
        "search_candidates": candidates,
        "public_tokens": int(public.numel()),
    }


def score(tokenizer, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Token recovery and word-level ROUGE-L F1 of (guess, truth) rows."""
    hit = sum(int((g == t).sum()) for g, t in rows)
    n = sum(len(t) for _, t in rows)
    rouge = [attacks.rouge_l(tokenizer.decode(t).split(), tokenizer.decode(g).split()) for g, t in rows]
    return {
        "token_recovery": hit / max(n, 1),
        "rouge_l": sum(rouge) / max(len(rouge), 1),
        "tokens": n,
        "sequences": len(rows),
    }


def label_score(guesses: list[torch.Tensor], rows: list[Row]) -> dict:
    """Labels read from guessed tokens: position t's guess is the label of position t - 1 (where it has one)."""
    hit = n = 0
    for guess, row in zip(guesses, rows):
        keep = row.labels[1 : len(guess)] != -100
        hit += int((guess[1:][keep] == row.ids[1 : len(guess)][keep]).sum())
        n += int(keep.sum())
    return {"label_recovery": hit / n if n else None, "labels": n}
