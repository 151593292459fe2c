"""The structure options of `cloud emulator build`, and the checks that need no model (so they fail fast)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SelectionError, TextError


@dataclass(frozen=True)
class BuildOptions:
    """How the emulator's middle is chosen and shaped.

    Attributes:
        drop_ratio: Share of middle blocks to drop, or
        keep: number of middle blocks to keep, or
        keep_blocks: exactly these middle blocks (full-model indices).
        select: how drop_ratio/keep's count of blocks is chosen: "uniform" (the paper's evenly spaced choice),
            "greedy" (drop the blocks whose removal raises the public-text loss least; tandem.emulator.greedy) or
            "gradient" (tandem.emulator.gradient_select: structures of `structure` (block counts, MLP widths, and
            for "share" which block represents a cluster) scored by the cosine of the adapters' start-of-tuning
            gradients with the full model's; drop_ratio/keep/clusters and mlp_width, when given, fix those
            dimensions).
        select_seqs: public sequences (of the distillation's seq_len tokens) the greedy and gradient selections,
            and the MLP pruning, measure on.
        mlp_width: keep only this many MLP neurons in each kept block, the ones that add the most to the
            residual stream on the public text (tandem.emulator.prune), then distill; None keeps them all.
        structure: "drop" (the kept blocks run once each) or "share" (CRaSh: the middle is clustered by the CKA
            of its blocks' outputs into `clusters` clusters, or as many as drop_ratio/keep would keep, and each
            cluster's representative block fills all its slots; tandem.emulator.share).
        clusters: Clusters of a shared emulator (instead of drop_ratio/keep).
        cka_seqs: Public sequences the shared emulator's CKA (and slot-scale fit) is measured on.
        representatives: The full-model block each cluster keeps (None: each cluster's middle block).
        budget: With select "gradient": the largest share of the model's parameters the package may hold
            (None: 0.6).
        max_cluster: With structure "share": the most middle blocks one CKA cluster may hold (None: no cap); with
            select "gradient", every candidate's.
        slot_scales: "none", or "fit" (a shared emulator only): every slot's residual update gets a scalar fitted
            in order on cka_seqs public sequences, without training, to the full model's state after the block
            the slot stands for (tandem.emulator.share.fit_slot_scales); distillation keeps the scales fixed.
            "learn": fitted so, then trained with the blocks during distillation (needs distillation steps).
        keep_sink: With the uniform drop: when the model has an attention sink and the drop loses the block that
            makes it, keep that block instead of the nearest kept one (tandem.emulator.sink.keep_sink_block).
    """

    drop_ratio: float | None = None
    keep: int | None = None
    keep_blocks: list[int] | None = None
    select: str = "uniform"
    select_seqs: int = 32
    mlp_width: int | None = None
    structure: str = "drop"
    clusters: int | None = None
    cka_seqs: int = 256
    representatives: list[int] | None = None
    budget: float | None = None
    max_cluster: int | None = None
    slot_scales: str = "none"
    keep_sink: bool = False

    def check(self, steps: int, init: str, has_text: bool) -> None:
        """Refuses, in one line, flags that cannot go together, before any slow work.

        Args:
            steps: Distillation steps (0: none).
            init: The distillation's initialisation ("copy" or "rescale").
            has_text: Whether public text was given.
        """
        self._check_names()
        self._check_sharing(steps, init)
        self._check_selection(has_text)
        if self.mlp_width is not None and not has_text:
            raise SelectionError("--mlp-width ranks MLP neurons on public text: give --distill-data DIR")
        if steps > 0 and not has_text:
            raise TextError("--distill-data DIR is needed to distill (or pass --steps 0 for a plain layer drop)")

    def _check_names(self) -> None:
        if self.structure not in ("drop", "share"):
            raise SelectionError(f"--structure must be drop or share, got {self.structure!r}")
        if self.select not in ("uniform", "greedy", "gradient"):
            raise SelectionError(f"--select must be uniform, greedy or gradient, got {self.select!r}")
        if self.slot_scales not in ("none", "fit", "learn"):
            raise SelectionError(f"--slot-scales must be none, fit or learn, got {self.slot_scales!r}")

    def _check_sharing(self, steps: int, init: str) -> None:
        share = self.structure == "share"
        if self.slot_scales != "none" and not share:
            raise SelectionError(
                f"--slot-scales {self.slot_scales} scales the slots of a shared emulator: give --structure share"
            )
        if self.slot_scales == "learn" and steps <= 0:
            raise SelectionError("--slot-scales learn trains the scales during distillation: give --steps > 0 (or fit)")
        if self.max_cluster is not None and self.max_cluster < 1:
            raise SelectionError(f"--max-cluster must be >= 1, got {self.max_cluster}")
        if init == "rescale" and share:
            raise SelectionError("--init rescale fits one factor per block and slot; use --init copy with sharing")
        if self.max_cluster is not None and (not share or self.select == "greedy"):
            raise SelectionError(
                "--max-cluster caps the CKA clusters of --structure share (with --select uniform or gradient)"
            )
        grouped = self.clusters is not None or self.representatives is not None
        if grouped and not share and self.select != "gradient":
            raise SelectionError("--clusters groups blocks of a shared emulator: give it with --structure share")

    def _check_selection(self, has_text: bool) -> None:
        if self.budget is not None and self.select != "gradient":
            raise SelectionError(
                "--budget bounds the structures --select gradient scores: give it with --select gradient"
            )
        if self.select == "greedy" and self.structure == "drop":
            if self.keep_blocks is not None:
                raise SelectionError(
                    "--select greedy chooses the blocks itself: give --drop-ratio or --keep, not --keep-blocks"
                )
            if not has_text:
                raise SelectionError("--select greedy measures the loss on public text: give --distill-data DIR")
            if self.select_seqs < 1:
                raise SelectionError(f"--select-seqs must be >= 1, got {self.select_seqs}")
        if self.select == "gradient" and not has_text:
            raise SelectionError("--select gradient measures gradients on public text: give --distill-data DIR")
        if self.keep_sink and (self.select != "uniform" or self.keep_blocks is not None or self.structure != "drop"):
            raise SelectionError(
                "--keep-sink-block adjusts the uniform drop: not with --select, --keep-blocks or sharing"
            )
        if self.keep_sink and not has_text:
            raise SelectionError("--keep-sink-block finds the sink on public text: give --distill-data DIR")
