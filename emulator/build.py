"""`cloud emulator build` in one call: select blocks, distill on public text, write the package."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from tandem.stages.loading import load_model
from tandem.stages.modules import StageLayout

from .build_options import BuildOptions
from .distill import CHECKPOINT, DistillConfig, distill
from .errors import SelectionError
from .greedy import SELECTION_FILE, selection
from .package import build_package
from .select import kept_blocks
from .text import read_texts

log = logging.getLogger(__name__)


@dataclass
class Structure:
    """The chosen middle: the unique blocks kept, the slot map of a shared one, its MLP width, and the record."""

    kept: list[int]
    slots: list[int] | None = None  # per middle slot, the index into `kept` that fills it (shared emulators)
    slot_blocks: list[int] | None = None  # per middle slot, the full-model block it stands for
    mlp_width: int | None = None
    record: dict = field(default_factory=dict)  # the manifest's "selection"


def build_emulator(
    model: str | None, client_blocks: str, out: str, distill_data: str | None, cfg: DistillConfig, **options
) -> dict:
    """Builds an emulator package; returns its manifest.

    Args:
        model: Hugging Face causal-LM directory (None: the embedded default model).
        client_blocks: 'K:M', the adapter blocks the data owner gets (the paper uses 2:2).
        out: Package directory.
        distill_data: Directory of public .txt/.jsonl text (needed when cfg.steps > 0).
        cfg: Distillation settings.
        **options: The structure (tandem.emulator.build_options.BuildOptions's fields).
    """
    opts = BuildOptions(**options)
    opts.check(cfg.steps, cfg.init, distill_data is not None)
    loaded = load_model(model)
    layout = StageLayout.parse(client_blocks, loaded.config)
    texts = read_texts(distill_data) if distill_data is not None else None
    sink = _measure_sink(loaded, layout, texts, cfg)  # (vector, stats) on the public text, or None without text
    chosen = choose_structure(loaded, layout, texts, cfg, opts, out, sink)
    log.info("emulator keeps middle blocks %s of %s", chosen.kept, layout.middle_blocks)
    student, pruning = _unique_blocks(loaded, layout, texts, cfg, opts, chosen)
    scales = None
    if opts.slot_scales != "none":
        scales = _fitted_scales(loaded, layout, texts, cfg, opts, chosen, student)
    summary = {"config": {"steps": 0}}
    if cfg.steps > 0:
        args = (chosen.kept, texts, cfg, out, student, chosen.slots, chosen.slot_blocks, scales)
        student, hist = distill(loaded, layout, *args, opts.slot_scales == "learn")
        scales = hist.get("slot_scales", scales)
        summary = {k: v for k, v in hist.items() if k != "steps"}
        if hist.get("steps"):
            summary["train_kd_first"], summary["train_kd_last"] = hist["steps"][0]["kd"], hist["steps"][-1]["kd"]
    if sink is not None:
        _report_sink(sink[1], chosen)
    manifest = build_package(
        loaded, layout, chosen.kept, student, out, summary, sink, chosen.record, pruning, chosen.slots,
        chosen.slot_blocks, scales,
    )  # fmt: skip
    for name in (CHECKPOINT, SELECTION_FILE):  # the package is complete; these only served resumption
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    return manifest


def choose_structure(loaded, layout: StageLayout, texts, cfg: DistillConfig, opts: BuildOptions, out: str, sink):
    """The middle the options ask for: gradient-scored, CKA-shared, greedily or uniformly dropped."""
    counts = (opts.drop_ratio, opts.keep, opts.keep_blocks, opts.clusters)
    if opts.select == "gradient":
        from .gradient_select import gradient_structure

        found = gradient_structure(
            loaded,
            layout,
            texts,
            lambda: _sample(loaded, texts, cfg, opts.select_seqs),
            opts.structure,
            (*counts, opts.representatives),
            opts.mlp_width,
            opts.budget,
            cfg,
            opts.max_cluster,
        )
        return Structure(found["kept"], found["slots"], found["slot_blocks"], found["mlp_width"], found)
    if opts.structure == "share":
        args = (opts.select, opts.cka_seqs, opts.representatives, opts.max_cluster)
        found = shared_selection(loaded, layout, texts, cfg, counts, *args)
        return Structure(found["kept"], found["slots"], found["slot_blocks"], opts.mlp_width, found)
    kept = kept_blocks(layout.middle_blocks, opts.drop_ratio, opts.keep, opts.keep_blocks)
    record = {"method": "blocks" if opts.keep_blocks is not None else "uniform"}
    if opts.select == "greedy":
        record = _greedy(loaded, layout, texts, len(kept), cfg, out, opts.select_seqs)
        kept = record["kept"]
    elif opts.keep_sink:
        kept, record = _with_sink_block(kept, record, sink)
    return Structure(kept, mlp_width=opts.mlp_width, record=record)


def _unique_blocks(loaded, layout, texts, cfg: DistillConfig, opts: BuildOptions, chosen: Structure):
    """Copies of the kept blocks (MLP-pruned to the chosen width); returns (ModuleList, pruning record or None)."""
    from tandem.stages.arch import parts_of

    from .model import copy_blocks

    student = copy_blocks(parts_of(loaded.model), chosen.kept)
    if chosen.mlp_width is None:
        return student, None
    from .prune import neuron_scores, prune_blocks

    ids = _sample(loaded, texts, cfg, opts.select_seqs)
    scores = neuron_scores(parts_of(loaded.model), layout, chosen.kept, ids)
    pruning = prune_blocks(student, chosen.kept, scores, chosen.mlp_width)
    log.info("emulator blocks keep %d of %d MLP neurons each", chosen.mlp_width, pruning["from_width"])
    return student, pruning


def _fitted_scales(loaded, layout, texts, cfg: DistillConfig, opts: BuildOptions, chosen: Structure, student):
    """Every slot's fitted update scale (tandem.emulator.share.fit_slot_scales); records how in `chosen`."""
    from tandem.stages.arch import parts_of

    from .share import fit_slot_scales

    ids = _sample(loaded, texts, cfg, opts.cka_seqs)  # (S, T): the CKA's public sequences
    scales = fit_slot_scales(parts_of(loaded.model), layout, list(student), chosen.slots, chosen.slot_blocks, ids)
    chosen.record = {**chosen.record, "slot_scales": {"method": opts.slot_scales, "sequences": int(ids.shape[0])}}
    return scales


def _report_sink(stats: dict, chosen: Structure) -> None:
    """Logs the attention sink measured; warns when a dropping emulator lost the block that makes it."""
    log.info(
        "first-token output: RMS %.1f vs %.1f for other tokens, spread %.3f: %s",
        stats["rms_first"],
        stats["rms_other"],
        stats["spread"],
        "shipped as the emulator's sink" if stats["used"] else "no sink",
    )
    made, kept = stats["made_by_block"], chosen.kept
    if stats["used"] and made is not None and made not in kept and chosen.slots is None:
        near = min(kept[1:-1] or kept, key=lambda j: abs(j - made))
        log.warning(
            "block %d makes the attention sink and this emulator drops it; keeping it instead of block %d "
            "lets the emulator rebuild the sink: --keep-blocks %s",
            made,
            near,
            ",".join(str(j) for j in sorted({*kept, made} - {near})),
        )


def _measure_sink(loaded, layout, texts, cfg) -> tuple | None:
    """The full middle's first-token output and its stats on the public text (tandem.emulator.sink), or None."""
    if texts is None:
        return None
    from tandem.stages.loading import load_tokenizer

    from .sink import measure_sink
    from .text import pack_blocks

    return measure_sink(loaded, layout, pack_blocks(texts, load_tokenizer(loaded.path), cfg.seq_len))


def _with_sink_block(kept: list[int], record: dict, sink) -> tuple[list[int], dict]:
    """--keep-sink-block on a uniform drop: the kept blocks with the sink's maker swapped in, the swap recorded."""
    from .sink import keep_sink_block

    kept, swap = keep_sink_block(kept, sink[1])
    if swap is not None:
        log.info(
            "keeping block %d, which makes the attention sink, instead of block %d", swap["kept"], swap["instead_of"]
        )
    return kept, {**record, "sink_block": swap}


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
