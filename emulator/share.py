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
each cluster's first block instead of its middle one, 334 thousand. Two optional levers, measured the same way
(--cka-seqs 64; the uniform drop 11,947, the plain CKA share 13.3 million there, a 12-slot cluster): capping a
cluster at four blocks (--max-cluster 4) gives 1.1 million; per-slot update scales fitted by least squares
(--slot-scales fit) 29,065, most repeated slots getting a scale near 0 (the fit all but drops them); both, 34,813.
Neither beats the uniform drop before distillation.
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


def cluster_blocks(
    cka: torch.Tensor, clusters: int, types: list[str] | None = None, max_cluster: int | None = None
) -> list[list[int]]:
    """Positions 0..N-1 grouped into `clusters` runs of adjacent blocks, merged greedily by mean pairwise CKA.

    Args:
        cka: (N, N) similarity of the blocks' outputs.
        clusters: How many clusters to leave, 1..N.
        types: Per-block attention type; blocks of different types are never merged.
        max_cluster: The most blocks one cluster may hold (None: no cap); a merge that would pass it, or that would
            leave `clusters` out of reach under it, is never made.
    """
    n = cka.shape[0]
    if not 1 <= clusters <= n:
        raise SelectionError(f"cannot make {clusters} clusters of {n} middle blocks; choose --clusters 1..{n}")
    if max_cluster is not None and max_cluster < 1:
        raise SelectionError(f"--max-cluster must be >= 1, got {max_cluster}")
    cap = n if max_cluster is None else max_cluster
    runs = [[i] for i in range(n)]

    def mergeable(a: list[int], b: list[int]) -> bool:
        return len(a) + len(b) <= cap and (types is None or types[a[0]] == types[b[0]])

    def fewest(runs: list[list[int]]) -> int:  # clusters still reachable: pack runs left to right
        count, current = 0, None
        for run in runs:
            if current is not None and mergeable(current, run):
                current = current + run
            else:
                count, current = count + 1, run
        return count

    least = fewest(runs)
    if least > clusters and max_cluster is None:
        raise SelectionError(
            f"the middle has {least} runs of blocks with different attention types; choose at least {least} clusters"
        )
    if least > clusters:
        raise SelectionError(
            f"cannot group {n} middle blocks into {clusters} clusters of at most {max_cluster} blocks (at least "
            f"{least} are needed); raise --clusters or --max-cluster"
        )
    while len(runs) > clusters:
        scores = [float(cka[runs[k]][:, runs[k + 1]].mean()) for k in range(len(runs) - 1)]
        for k in sorted(range(len(scores)), key=lambda k: -scores[k]):
            merged = runs[:k] + [runs[k] + runs[k + 1]] + runs[k + 2 :]
            if mergeable(runs[k], runs[k + 1]) and fewest(merged) <= clusters:
                runs = merged
                break
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
    max_cluster: int | None = None,
) -> dict:
    """Measures the CKA on ids (S, T), clusters the middle (no cluster over max_cluster blocks) and picks the kept
    blocks.

    Returns:
        The manifest's selection record: {"method": "share", "kept", "slots", "slot_blocks", "clusters" (full-model
        indices per cluster), "representatives", "cka_adjacent" (block i's output against block i+1's),
        "cka" (every pair, rounded), "sequences", "tokens"} and, when capped, "max_cluster".
    """
    middle = layout.middle_blocks
    cka = middle_cka(parts, layout, ids, tokens=tokens, seed=seed)
    types = getattr(parts.config, "layer_types", None)
    runs = cluster_blocks(cka, clusters, None if types is None else [types[i] for i in middle], max_cluster)
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
    if max_cluster is not None:
        record["max_cluster"] = max_cluster
    log.info("shared emulator: clusters %s, kept %s", record["clusters"], kept)
    return record


@torch.no_grad()
def fit_slot_scales(
    parts: Parts,
    layout: StageLayout,
    blocks: list[torch.nn.Module],
    slots: list[int],
    slot_blocks: list[int],
    ids: torch.Tensor,
    batch_size: int = 8,
) -> list[float]:
    """Per-slot update scales of a shared emulator, fitted in order on public ids (S, T), without training.

    Slot s computes h + a_s * (block(h) - h). With h the emulator's state entering slot s (earlier slots already
    scaled), u = block(h) - h and t the full model's state after its middle block slot_blocks[s], a_s is the least-
    squares fit <u, t - h> / <u, u>, summed over every token but each sequence's first (as the CKA), clipped to
    [-MAX_SLOT_SCALE, MAX_SLOT_SCALE] (1.0 where the update is zero).

    Args:
        parts: The full model (the teacher).
        layout: Where the client's stages are cut.
        blocks: The emulator's unique blocks; slot s runs blocks[slots[s]].
        slots, slot_blocks: The slot map and the full-model middle block each slot stands for (increasing).
        ids: (S, T) public token ids.
        batch_size: Sequences per forward pass.
    """
    from .model import MAX_SLOT_SCALE

    if ids.shape[1] < 2:
        raise SelectionError("fitting slot scales needs sequences of at least 2 tokens; raise --seq-len")
    bottom = BottomStage(parts, layout.bottom_blocks)
    batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    masks = [torch.ones_like(x) for x in batches]
    states = [bottom(x, mask) for x, mask in zip(batches, masks)]  # the emulator's running states, (B, T, H) each
    teacher = list(states)  # the full model's states after the middle blocks up to the current slot's
    done = layout.middle_blocks[0]  # the first full-model middle block the teacher has not yet run
    scales = []
    for block_index, stands_for in zip(slots, slot_blocks):
        segment = [parts.blocks[i] for i in range(done, stands_for + 1)]
        done = stands_for + 1
        teacher = [run_blocks(parts, segment, t, mask) for t, mask in zip(teacher, masks)]
        updates = [run_blocks(parts, [blocks[block_index]], h, mask) - h for h, mask in zip(states, masks)]
        num = sum(
            float((u[:, 1:].double() * (t - h)[:, 1:].double()).sum()) for u, t, h in zip(updates, teacher, states)
        )
        den = sum(float(u[:, 1:].double().pow(2).sum()) for u in updates)
        scale = num / den if den > 0 else 1.0
        scale = max(-MAX_SLOT_SCALE, min(MAX_SLOT_SCALE, scale))
        scales.append(scale)
        states = [h + scale * u for h, u in zip(states, updates)]
    log.info("slot scales %s", [round(a, 3) for a in scales])
    return scales
