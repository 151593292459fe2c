"""`cloud emulator build` in one call: select blocks, distill on public text, write the package."""

from __future__ import annotations

import logging
import os

from tandem.stages.loading import load_model
from tandem.stages.modules import StageLayout

from .distill import CHECKPOINT, DistillConfig, distill
from .errors import SelectionError
from .greedy import SELECTION_FILE, selection
from .package import build_package
from .select import kept_blocks
from .text import read_texts

log = logging.getLogger(__name__)


def build_emulator(
    model: str | None,
    client_blocks: str,
    out: str,
    distill_data: str | None,
    cfg: DistillConfig,
    drop_ratio: float | None = None,
    keep: int | None = None,
    keep_blocks: list[int] | None = None,
    select: str = "uniform",
    select_seqs: int = 32,
    mlp_width: int | None = None,
    structure: str = "drop",
    clusters: int | None = None,
    cka_seqs: int = 256,
    representatives: list[int] | None = None,
    budget: float | None = None,
    max_cluster: int | None = None,
    slot_scales: str = "none",
    keep_sink: bool = False,
) -> dict:
    """Builds an emulator package; returns its manifest.

    Args:
        model: Hugging Face causal-LM directory (None: the embedded default model).
        client_blocks: 'K:M', the adapter blocks the data owner gets (the paper uses 2:2).
        out: Package directory.
        distill_data: Directory of public .txt/.jsonl text (needed when cfg.steps > 0).
        cfg: Distillation settings.
        drop_ratio: Share of middle blocks to drop, or
        keep: number of middle blocks to keep, or
        keep_blocks: exactly these middle blocks (full-model indices).
        select: how drop_ratio/keep's count of blocks is chosen: "uniform" (the paper's evenly spaced choice)
            or "greedy" (drop the blocks whose removal raises the public-text loss least; tandem.emulator.greedy).
        select_seqs: public sequences (of cfg.seq_len tokens) the greedy selection, and the MLP pruning,
            measure on.
        mlp_width: keep only this many MLP neurons in each kept block, the ones that add the most to the
            residual stream on the public text (tandem.emulator.prune), then distill; None keeps them all.
        structure: "drop" (the kept blocks run once each) or "share" (CRaSh: the middle is clustered by the CKA
            of its blocks' outputs into `clusters` clusters, or as many as drop_ratio/keep would keep, and each
            cluster's representative block fills all its slots; tandem.emulator.share).
        clusters: Clusters of a shared emulator (instead of drop_ratio/keep).
        cka_seqs: Public sequences the shared emulator's CKA is measured on.
        representatives: The full-model block each cluster keeps (None: each cluster's middle block).
        budget: With select "gradient" (tandem.emulator.gradient_select): the largest share of the model's
            parameters the package may hold (None: 0.6). That selection scores structures of `structure` (block
            counts, MLP widths, and for "share" which block represents a cluster) by the cosine of the adapters'
            start-of-tuning gradients with the full model's; drop_ratio/keep/clusters and mlp_width, when given,
            fix those dimensions.
        max_cluster: With structure "share": the most middle blocks one CKA cluster may hold (None: no cap); with
            select "gradient", every candidate's.
        slot_scales: "none", or "fit" (a shared emulator only): every slot's residual update gets a scalar fitted
            in order on cka_seqs public sequences, without training, to the full model's state after the block
            the slot stands for (tandem.emulator.share.fit_slot_scales); distillation keeps the scales fixed.
            "learn": fitted so, then trained with the blocks during distillation (needs cfg.steps > 0).
        keep_sink: With the uniform drop: when the model has an attention sink and the drop loses the block that
            makes it, keep that block instead of the nearest kept one (tandem.emulator.sink.keep_sink_block).
    """
    loaded = load_model(model)
    layout = StageLayout.parse(client_blocks, loaded.config)
    texts = read_texts(distill_data) if distill_data is not None else None
    sink = _measure_sink(loaded, layout, texts, cfg)  # (vector, stats) on the public text, or None without text
    slots = slot_blocks = None
    if structure not in ("drop", "share"):
        raise SelectionError(f"--structure must be drop or share, got {structure!r}")
    if slot_scales not in ("none", "fit", "learn"):
        raise SelectionError(f"--slot-scales must be none, fit or learn, got {slot_scales!r}")
    if slot_scales == "learn" and cfg.steps <= 0:
        raise SelectionError("--slot-scales learn trains the scales during distillation: give --steps > 0 (or fit)")
    if max_cluster is not None and max_cluster < 1:
        raise SelectionError(f"--max-cluster must be >= 1, got {max_cluster}")
    if cfg.init == "rescale" and structure == "share":
        raise SelectionError("--init rescale fits one factor per block and slot; use --init copy with sharing")
    if max_cluster is not None and (structure != "share" or select == "greedy"):
        raise SelectionError(
            "--max-cluster caps the CKA clusters of --structure share (with --select uniform or gradient)"
        )
    if select == "gradient":
        from .gradient_select import gradient_structure

        chosen = gradient_structure(
            loaded,
            layout,
            texts,
            lambda: _sample(loaded, texts, cfg, select_seqs),
            structure,
            (drop_ratio, keep, keep_blocks, clusters, representatives),
            mlp_width,
            budget,
            cfg,
            max_cluster,
        )
        kept, slots, slot_blocks, mlp_width = (chosen[k] for k in ("kept", "slots", "slot_blocks", "mlp_width"))
    elif structure == "share":
        chosen = shared_selection(
            loaded,
            layout,
            texts,
            cfg,
            (drop_ratio, keep, keep_blocks, clusters),
            select,
            cka_seqs,
            representatives,
            max_cluster,
        )
        kept, slots, slot_blocks = chosen["kept"], chosen["slots"], chosen["slot_blocks"]
    elif clusters is not None or representatives is not None:
        raise SelectionError("--clusters groups blocks of a shared emulator: give it with --structure share")
    else:
        kept = kept_blocks(layout.middle_blocks, drop_ratio, keep, keep_blocks)
        chosen = {"method": "blocks" if keep_blocks is not None else "uniform"}
        if keep_sink:
            kept, chosen = _with_sink_block(kept, chosen, sink, select, keep_blocks)
    if select not in ("uniform", "greedy", "gradient"):
        raise SelectionError(f"--select must be uniform, greedy or gradient, got {select!r}")
    if budget is not None and select != "gradient":
        raise SelectionError("--budget bounds the structures --select gradient scores: give it with --select gradient")
    if select == "greedy":
        if keep_blocks is not None:
            raise SelectionError(
                "--select greedy chooses the blocks itself: give --drop-ratio or --keep, not --keep-blocks"
            )
        if texts is None:
            raise SelectionError("--select greedy measures the loss on public text: give --distill-data DIR")
        if select_seqs < 1:
            raise SelectionError(f"--select-seqs must be >= 1, got {select_seqs}")
        chosen = _greedy(loaded, layout, texts, len(kept), cfg, out, select_seqs)
        kept = chosen["kept"]
    log.info("emulator keeps middle blocks %s of %s", kept, layout.middle_blocks)
    from tandem.stages.arch import parts_of

    from .model import copy_blocks

    student, pruning = copy_blocks(parts_of(loaded.model), kept), None  # the unique blocks, shared or not
    if mlp_width is not None:
        if texts is None:
            raise SelectionError("--mlp-width ranks MLP neurons on public text: give --distill-data DIR")
        from .prune import neuron_scores, prune_blocks

        scores = neuron_scores(parts_of(loaded.model), layout, kept, _sample(loaded, texts, cfg, select_seqs))
        pruning = prune_blocks(student, kept, scores, mlp_width)
        log.info("emulator blocks keep %d of %d MLP neurons each", mlp_width, pruning["from_width"])
    scales = None
    if slot_scales != "none":
        if slots is None:
            raise SelectionError(
                f"--slot-scales {slot_scales} scales the slots of a shared emulator: give --structure share"
            )
        from .share import fit_slot_scales

        ids = _sample(loaded, texts, cfg, cka_seqs)  # (S, T): the CKA's public sequences
        scales = fit_slot_scales(parts_of(loaded.model), layout, list(student), slots, slot_blocks, ids)
        chosen = {**chosen, "slot_scales": {"method": slot_scales, "sequences": int(ids.shape[0])}}
    if cfg.steps > 0:
        if texts is None:
            from .errors import TextError

            raise TextError("--distill-data DIR is needed to distill (or pass --steps 0 for a plain layer drop)")
        learn = slot_scales == "learn"
        student, hist = distill(loaded, layout, kept, texts, cfg, out, student, slots, slot_blocks, scales, learn)
        scales = hist.get("slot_scales", scales)
    else:
        hist = {"config": {"steps": 0}}
    summary = {k: v for k, v in hist.items() if k != "steps"}
    if hist.get("steps"):
        summary["train_kd_first"], summary["train_kd_last"] = hist["steps"][0]["kd"], hist["steps"][-1]["kd"]
    if sink is not None:
        log.info(
            "first-token output: RMS %.1f vs %.1f for other tokens, spread %.3f: %s",
            sink[1]["rms_first"],
            sink[1]["rms_other"],
            sink[1]["spread"],
            "shipped as the emulator's sink" if sink[1]["used"] else "no sink",
        )
        made = sink[1]["made_by_block"]
        if sink[1]["used"] and made is not None and made not in kept and slots is None:
            near = min(kept[1:-1] or kept, key=lambda j: abs(j - made))
            log.warning(
                "block %d makes the attention sink and this emulator drops it; keeping it instead of block %d "
                "lets the emulator rebuild the sink: --keep-blocks %s",
                made,
                near,
                ",".join(str(j) for j in sorted({*kept, made} - {near})),
            )
    manifest = build_package(
        loaded, layout, kept, student, out, summary, sink, chosen, pruning, slots, slot_blocks, scales
    )
    for name in (CHECKPOINT, SELECTION_FILE):  # the package is complete; these only served resumption
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    return manifest


def _measure_sink(loaded, layout, texts, cfg) -> tuple | None:
    """The full middle's first-token output and its stats on the public text (tandem.emulator.sink), or None."""
    if texts is None:
        return None
    from tandem.stages.loading import load_tokenizer

    from .sink import measure_sink
    from .text import pack_blocks

    return measure_sink(loaded, layout, pack_blocks(texts, load_tokenizer(loaded.path), cfg.seq_len))


def _with_sink_block(kept: list[int], chosen: dict, sink, select: str, keep_blocks) -> tuple[list[int], dict]:
    """--keep-sink-block on a uniform drop: the kept blocks with the sink's maker swapped in, the swap recorded."""
    if select != "uniform" or keep_blocks is not None:
        raise SelectionError("--keep-sink-block adjusts the uniform drop: not with --select or --keep-blocks")
    if sink is None:
        raise SelectionError("--keep-sink-block finds the sink on public text: give --distill-data DIR")
    from .sink import keep_sink_block

    kept, swap = keep_sink_block(kept, sink[1])
    if swap is not None:
        log.info(
            "keeping block %d, which makes the attention sink, instead of block %d", swap["kept"], swap["instead_of"]
        )
    return kept, {**chosen, "sink_block": swap}


def shared_selection(
    loaded,
    layout: StageLayout,
    texts: list[str] | None,
    cfg: DistillConfig,
    counts: tuple,
    select: str,
    seqs: int,
    representatives: list[int] | None = None,
    max_cluster: int | None = None,
) -> dict:
    """A shared emulator's structure (tandem.emulator.share.share_selection) on `seqs` public sequences.

    Args:
        counts: (drop_ratio, keep, keep_blocks, clusters) as given: the cluster count is `clusters`, or the number
            of blocks drop_ratio/keep would keep (the same number of unique blocks, so the same budget).
    """
    from tandem.stages.arch import parts_of

    from .select import keep_count
    from .share import share_selection

    drop_ratio, keep, keep_blocks, clusters = counts
    if keep_blocks is not None:
        raise SelectionError(
            "--structure share picks its blocks by clustering: give --clusters, --keep or --drop-ratio"
        )
    if select != "uniform":
        raise SelectionError(f"--structure share clusters the middle itself; --select {select} drops blocks")
    if (clusters is not None) + (drop_ratio is not None) + (keep is not None) != 1:
        raise SelectionError("--structure share: give exactly one of --clusters C, --keep N or --drop-ratio F")
    if texts is None:
        raise SelectionError(
            "--structure share measures the blocks' similarity on public text: give --distill-data DIR"
        )
    if seqs < 1:
        raise SelectionError(f"--cka-seqs must be >= 1, got {seqs}")
    n = len(layout.middle_blocks)
    count = clusters if clusters is not None else keep_count(n, drop_ratio, keep)
    ids = _sample(loaded, texts, cfg, seqs)  # (S, T)
    return share_selection(
        parts_of(loaded.model), layout, ids, count, representatives, seed=cfg.seed, max_cluster=max_cluster
    )


def _sample(loaded, texts: list[str], cfg: DistillConfig, seqs: int):
    """`seqs` sequences (S, T) of the distillation's training split (its validation stays unseen)."""
    import torch

    from tandem.stages.loading import load_tokenizer

    from .text import pack_blocks, split_blocks

    train, _ = split_blocks(pack_blocks(texts, load_tokenizer(loaded.path), cfg.seq_len), cfg.val_fraction, cfg.seed)
    return train[torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + 1))[:seqs]]


def _greedy(loaded, layout: StageLayout, texts: list[str], k: int, cfg: DistillConfig, out: str, seqs: int) -> dict:
    """The greedy selection on `seqs` sequences of the distillation's training split."""
    import hashlib

    from tandem.stages.arch import parts_of

    ids = _sample(loaded, texts, cfg, seqs)  # (S, T)
    key = {
        "model_id": loaded.model_id,
        "layout": [layout.num_layers, layout.bottom, layout.top],
        "keep": k,
        "ids_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
    }
    return selection(parts_of(loaded.model), layout, ids, k, out, key, progress=cfg.progress)
