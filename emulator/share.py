"""Layer sharing (CRaSh): cluster similar adjacent middle blocks, keep one block per cluster, run it in every slot.

Offsite-Tuning drops middle blocks, so the emulator is shallower than the middle it stands for. CRaSh
(Zhang et al., EMNLP 2023) observes that adjacent blocks of a decoder fall into clusters whose outputs are
nearly alike (linear CKA), keeps one block per cluster and refills the cluster's other slots with that same
block: the emulator keeps the model's depth with as few unique weights as a layer drop.

Here the middle blocks' outputs are measured in the full model on the operator's public text (the first
token is left out: its attention-sink state is huge and nearly constant and would dominate the similarity),
adjacent clusters are merged greedily by their mean pairwise CKA (average linkage) until C are left, and each
cluster is represented by its middle block unless the caller names another (helper code that scores
candidates, e.g. by gradient alignment, passes its own). Blocks of different attention types (a config's
`layer_types`) never share a cluster, so every slot runs a block built for its own kind of attention.

Without distillation sharing does not pay on SmolLM2 (2:2, 10 unique blocks of 26, --steps 0, held-out
perplexity, full model 22.9): the uniform drop gives 11,947, the CKA-shared emulator 4.3 million (clusters of
up to seven slots; a block's update applied seven times overshoots), equal-size clusters 8.3 million; with
each cluster's first block instead of its middle one, 334 thousand.
"""

from __future__ import annotations

import logging

import torch

from tandem.stages.arch import Parts
from tandem.stages.modules import BottomStage, StageLayout, run_blocks

from .errors import SelectionError

log = logging.getLogger(__name__)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same n samples, x (n, D1) and y (n, D2); 1.0 for identical ones."""
    x = x.to(torch.float64) - x.to(torch.float64).mean(0)
    y = y.to(torch.float64) - y.to(torch.float64).mean(0)
    cross = (y.T @ x).pow(2).sum()
    norm = (x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()
    return float(cross / norm.clamp_min(1e-300))


def _cka_matrix(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Pairwise linear CKA of representations (n, H) of the same n samples, (N, N).

    In sample space: with centred Gram matrices K_i = X_i X_i^T, CKA(i, j) = <K_i, K_j> / (|K_i| |K_j|)
    (cheaper than the feature-space form when H is not far below n).
    """
    n = outputs[0].shape[0]
    flat = torch.empty(len(outputs), n * n, dtype=torch.float32)
    for j, x in enumerate(outputs):
        x = x - x.mean(0)
        flat[j] = (x @ x.T).flatten().to(torch.float32)  # centred: HSIC of linear kernels is <K_i, K_j>
    dots = (flat @ flat.T).to(torch.float64)  # (N, N)
    norms = dots.diagonal().sqrt().clamp_min(1e-300)
    return dots / norms[:, None] / norms[None, :]


@torch.no_grad()
def middle_cka(
    parts: Parts, layout: StageLayout, ids: torch.Tensor, tokens: int = 2048, batch_size: int = 8, seed: int = 0
) -> torch.Tensor:
    """Linear CKA between every pair of middle blocks' outputs in the full model, (N, N) for N middle blocks.

    Args:
        parts: The full model.
        layout: Where the client's stages are cut.
        ids: (S, T) public token ids.
        tokens: How many token positions (drawn at random, seeded, never a sequence's first) the CKA compares.
        batch_size: Sequences per forward pass.
        seed: Seeds the draw of token positions.
    """
    if ids.shape[1] < 2:
        raise SelectionError("the CKA needs sequences of at least 2 tokens; raise --seq-len")
    pool = ids.shape[0] * (ids.shape[1] - 1)
    pick = torch.randperm(pool, generator=torch.Generator().manual_seed(seed))[: min(tokens, pool)].sort().values
    rows, cols = pick // (ids.shape[1] - 1), pick % (ids.shape[1] - 1) + 1
    bottom = BottomStage(parts, layout.bottom_blocks)
    outputs: list[list[torch.Tensor]] = [[] for _ in layout.middle_blocks]
    for start in range(0, len(ids), batch_size):
        x = ids[start : start + batch_size]
        mask = torch.ones_like(x)
        here = (rows >= start) & (rows < start + len(x))
        h = bottom(x, mask)  # (B, T, H)
        for j, i in enumerate(layout.middle_blocks):
            h = run_blocks(parts, [parts.blocks[i]], h, mask)
            outputs[j].append(h[rows[here] - start, cols[here]].to(torch.float64))  # (b, H)
    return _cka_matrix([torch.cat(chunks) for chunks in outputs]).to(torch.float32)


def cluster_blocks(cka: torch.Tensor, clusters: int, types: list[str] | None = None) -> list[list[int]]:
    """Positions 0..N-1 grouped into `clusters` runs of adjacent blocks, merged greedily by mean pairwise CKA.

    Args:
        cka: (N, N) similarity of the blocks' outputs.
        clusters: How many clusters to leave, 1..N.
        types: Per-block attention type; blocks of different types are never merged.
    """
    n = cka.shape[0]
    if not 1 <= clusters <= n:
        raise SelectionError(f"cannot make {clusters} clusters of {n} middle blocks; choose --clusters 1..{n}")
    runs = [[i] for i in range(n)]

    def link(a: list[int], b: list[int]) -> float:
        if types is not None and types[a[0]] != types[b[0]]:
            return float("-inf")
        return float(cka[a][:, b].mean())

    while len(runs) > clusters:
        scores = [link(runs[k], runs[k + 1]) for k in range(len(runs) - 1)]
        best = max(range(len(scores)), key=scores.__getitem__)
        if scores[best] == float("-inf"):
            raise SelectionError(
                f"the middle has {len(runs)} runs of blocks with different attention types; choose at least "
                f"{len(runs)} clusters"
            )
        runs[best : best + 2] = [runs[best] + runs[best + 1]]
    return runs


def slot_map(
    middle: list[int], clusters: list[list[int]], representatives: list[int] | None = None
) -> tuple[list[int], list[int], list[int]]:
    """The shared emulator's structure from clusters of middle positions.

    Args:
        middle: Full-model indices of the middle blocks.
        clusters: Runs of positions into `middle` (cluster_blocks' output), covering it in order.
        representatives: Full-model index of the block each cluster keeps (None: each cluster's middle block,
            the lower one of two).

    Returns:
        (kept, slots, slot_blocks): the kept blocks' full-model indices (increasing), for every middle slot the
        index into `kept` of the block that fills it, and the full-model block each slot stands for.
    """
    if [p for run in clusters for p in run] != list(range(len(middle))):
        raise SelectionError(f"clusters {clusters} must cover the {len(middle)} middle blocks in order")
    if representatives is None:
        representatives = [middle[run[(len(run) - 1) // 2]] for run in clusters]
    if len(representatives) != len(clusters) or not all(
        rep in [middle[p] for p in run] for rep, run in zip(representatives, clusters)
    ):
        raise SelectionError(
            f"representatives {representatives} must name one block inside each cluster "
            f"{[[middle[p] for p in run] for run in clusters]}"
        )
    slots = [c for c, run in enumerate(clusters) for _ in run]
    return list(representatives), slots, list(middle)


def share_selection(
    parts: Parts,
    layout: StageLayout,
    ids: torch.Tensor,
    clusters: int,
    representatives: list[int] | None = None,
    tokens: int = 2048,
    seed: int = 0,
) -> dict:
    """Measures the CKA on ids (S, T), clusters the middle and picks the kept blocks.

    Returns:
        The manifest's selection record: {"method": "share", "kept", "slots", "slot_blocks", "clusters" (full-model
        indices per cluster), "representatives", "cka_adjacent" (block i's output against block i+1's),
        "cka" (every pair, rounded), "sequences", "tokens"}.
    """
    middle = layout.middle_blocks
    cka = middle_cka(parts, layout, ids, tokens=tokens, seed=seed)
    types = getattr(parts.config, "layer_types", None)
    runs = cluster_blocks(cka, clusters, None if types is None else [types[i] for i in middle])
    kept, slots, slot_blocks = slot_map(middle, runs, representatives)
    record = {
        "method": "share",
        "kept": kept,
        "slots": slots,
        "slot_blocks": slot_blocks,
        "clusters": [[middle[p] for p in run] for run in runs],
        "representatives": kept,
        "cka_adjacent": [round(float(cka[j, j + 1]), 4) for j in range(len(middle) - 1)],
        "cka": [[round(float(v), 4) for v in row] for row in cka],
        "sequences": int(ids.shape[0]),
        "tokens": min(tokens, int(ids.shape[0]) * (int(ids.shape[1]) - 1)),
    }
    log.info("shared emulator: clusters %s, kept %s", record["clusters"], kept)
    return record
