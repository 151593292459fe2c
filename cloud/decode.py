"""Batched decoding: many requests, each with its own adapter (or none), generated as one batch over one frozen model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tandem.stages.arch import parts_of
from tandem.stages.lora import LoRASlot, MultiBinding, Segment, bind, inject_slots
from tandem.stages.sampling import draw, left_pad


@dataclass(frozen=True)
class ServedAdapter:
    """A registered adapter loaded for serving: LoRA (A (r, in), B (out, r)) by slot name, and alpha / r."""

    name: str
    sha256: str
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float


@dataclass
class DecodeJob:
    """One request's share of a batch.

    Attributes:
        adapter: The adapter of all its prompts, or None for the base model.
        prompts: Token ids of each prompt (non-empty).
        max_new_tokens: Tokens to generate per prompt at most.
        temperature: 0 for greedy; else sampling from softmax(logits / temperature).
        seed: Seed of the request's own sampling generator (its draws do not depend on the batch).
    """

    adapter: ServedAdapter | None
    prompts: list[list[int]]
    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0

    @property
    def key(self) -> str:
        return "" if self.adapter is None else self.adapter.sha256


def wrap_all_blocks(model: nn.Module) -> set[str]:
    """Puts a LoRASlot on every Linear / GPT-2 Conv1D of every block (keeping slots already there); returns all slot names.

    An unbound slot adds nothing, so the model computes exactly what it did before.
    """
    parts = parts_of(model)
    for i, block in enumerate(parts.blocks):
        leaves = {
            path.rsplit(".", 1)[-1]
            for path, m in block.named_modules()
            if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and not path.endswith("base_layer")
        }
        if leaves:
            inject_slots(nn.ModuleList([block]), parts.arch, [i], tuple(sorted(leaves)))
    return {m.slot_name for m in model.modules() if isinstance(m, LoRASlot)}


def batch_rows(jobs: list[DecodeJob]) -> tuple[list[Segment], list[tuple[int, int]], dict[int, int]]:
    """Lays the jobs' prompts out as batch rows, jobs of one adapter next to each other.

    Returns:
        The adapter Segments in row order, (job, prompt) of each row, and each job's first row.
    """
    order = sorted(range(len(jobs)), key=lambda i: jobs[i].key)  # stable: same adapter -> adjacent
    segments: list[Segment] = []
    rows: list[tuple[int, int]] = []
    first_row: dict[int, int] = {}
    prev = None
    for i in order:
        job = jobs[i]
        if segments and job.key == prev:
            segments[-1].size += len(job.prompts)
        else:
            tensors, scaling = ({}, 1.0) if job.adapter is None else (job.adapter.tensors, job.adapter.scaling)
            segments.append(Segment(len(job.prompts), tensors, scaling))
        prev = job.key
        first_row[i] = len(rows)
        rows += [(i, k) for k in range(len(job.prompts))]
    return segments, rows, first_row


def next_tokens(
    logits: torch.Tensor,
    jobs: list[DecodeJob],
    generators: dict[int, torch.Generator],
    first_row: dict[int, int],
    done: list[bool],
) -> torch.Tensor:
    """The next token of every row (B,): greedy, except rows of sampling jobs still running, which draw from
    softmax(logits / temperature) with their job's own generator."""
    nxt = logits.argmax(dim=-1)  # (B,)
    for i, generator in generators.items():
        lo = first_row[i]
        hi = lo + len(jobs[i].prompts)
        if not all(done[lo:hi]):
            nxt[lo:hi] = draw(logits[lo:hi], jobs[i].temperature, generator)  # (n_i,) as private generation draws
    return nxt


@torch.no_grad()
def decode(
    model: nn.Module, jobs: list[DecodeJob], pad_id: int, eos_ids: set[int], impl: str = "auto"
) -> list[list[tuple[list[int], str]]]:
    """Generates for all jobs in one batch; returns, per job and prompt, (new token ids, finish reason).

    The prompts are left-padded into one batch; jobs of one adapter sit next to each other and
    form one Segment of a MultiBinding, so every LoRA slot applies all adapters in one pass
    (rows of base-model jobs get no delta). Positions count real tokens only, so a row computes
    what it would alone, up to float rounding. Each job samples from its own generator in its
    own row order, so sampling does not depend on the batch either.
    """
    segments, rows, first_row = batch_rows(jobs)
    ids, mask = left_pad([jobs[i].prompts[k] for i, k in rows], pad_id)  # (B, T) each
    device = next(model.parameters()).device  # where the served model computes (--device)
    ids, mask = ids.to(device), mask.to(device)
    n_rows = len(rows)
    pos = (mask.cumsum(1) - 1).clamp(min=0)  # (B, T) position of each real token
    limit = [jobs[i].max_new_tokens for i, _ in rows]
    generators = {i: torch.Generator().manual_seed(job.seed) for i, job in enumerate(jobs) if job.temperature > 0}
    out_ids: list[list[int]] = [[] for _ in rows]
    reason = ["length"] * n_rows
    done = [False] * n_rows
    with bind(MultiBinding(segments, impl=impl)):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        for _ in range(max(limit)):
            logits = out.logits[:, -1, :].float()  # (B, V)
            nxt = next_tokens(logits, jobs, generators, first_row, done)  # (B,)
            for row, token in enumerate(nxt.tolist()):
                if done[row]:
                    continue
                if token in eos_ids:
                    done[row], reason[row] = True, "eos"
                else:
                    out_ids[row].append(token)
                    done[row] = len(out_ids[row]) >= limit[row]
            if all(done):
                break
            idle = torch.tensor(done, device=device)
            feed = torch.where(idle, torch.tensor(pad_id, device=device), nxt)  # (B,) finished rows idle on padding
            mask = torch.cat([mask, torch.ones((n_rows, 1), dtype=torch.long, device=device)], dim=1)  # (B, T + s)
            pos = pos[:, -1:] + 1  # (B, 1)
            out = model(input_ids=feed[:, None], attention_mask=mask, position_ids=pos, cache=out.cache, use_cache=True)
    results: list[list[tuple[list[int], str]]] = [[] for _ in jobs]
    for row, (i, _) in enumerate(rows):
        results[i].append((out_ids[row], reason[row]))
    return results
