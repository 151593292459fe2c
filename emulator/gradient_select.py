"""Gradient-aligned selection: emulator structures scored by how well they keep the adapters' start-of-tuning gradients.

The data owner tunes the adapter through the emulator; what it learns at the start is the gradient the emulator
passes back. GradOT (ACL 2025) chooses a compression by how close that gradient stays to the full model's, not by
the emulator's loss, and on SmolLM2 a closer emulator (lower KD loss) did not give a better plug-in
(bench/README.md). Here every candidate structure (how many blocks, which blocks, which block stands in for a
cluster of shared slots, MLP width) is scored by the cosine between the bottom and the top adapter's start-of-tuning
gradients through the candidate and through the full middle, on public calibration text, and the best candidate
under the package budget is kept. A candidate is scored as built, without distillation: cheap, and it ranks the
starting points that distillation then refines.

Which gradient: a fresh LoRA exactly as `client tune` makes it (peft's init: A Kaiming-uniform from the run's seed,
B = 0), and its gradient with respect to B. With B = 0 the gradient with respect to A is identically zero, so B's is
the whole of the first step's update, and the adapter's first steps move along it; it is also s * G A^T, a random
projection of the adapted layers' full weight gradient G, so its cosine estimates the full gradients' cosine. Setting
B non-zero instead would change the model the tuning starts from and mix in a direction no real run takes.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tandem.stages.arch import Parts
from tandem.stages.lora import LoRAAdapter, LoraConfig, LoRASlot, SlotSpec, bind, inject_slots
from tandem.stages.modules import MiddleStage, StageLayout, positions, run_blocks

from .errors import SelectionError

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 0.6  # the package's share of the model's unique parameters (Offsite-Tuning's usual cap)
SIDES = ("bottom", "top")


@dataclass
class Candidate:
    """One emulator structure.

    Attributes:
        name: What it is, e.g. "uniform k=10" or "share c=8 rep=middle w=512".
        kept: Full-model indices of its unique blocks, increasing.
        slots: Slot map (slot i runs unique block slots[i]); None: one slot per kept block.
        slot_blocks: The full-model middle block each slot stands for (None with slots None).
        mlp_width: MLP neurons per unique block (None: the model's own width).
        emulator_params: Parameters of its unique blocks.
    """

    name: str
    kept: list[int]
    slots: list[int] | None = None
    slot_blocks: list[int] | None = None
    mlp_width: int | None = None
    emulator_params: int = 0


class GradientProbe:
    """The model's K bottom and M top blocks (copies) with a fresh LoRA as `client tune` makes it, on calibration ids.

    Args:
        parts: The full model.
        layout: Where the client's stages are cut.
        ids: Calibration token ids (S, T), public text.
        lora: The adapter's settings (rank, alpha, target modules); default: client tune's.
        seed: The adapter's seed (its A matrices).
        batch_size: Sequences per forward.
    """

    def __init__(
        self,
        parts: Parts,
        layout: StageLayout,
        ids: torch.Tensor,
        lora: LoraConfig | None = None,
        seed: int = 0,
        batch_size: int = 4,
    ):
        lora = lora or LoraConfig()
        self.parts, self.layout, self.ids, self.batch_size = parts, layout, ids, batch_size
        blocks = nn.ModuleList(copy.deepcopy(parts.blocks[i]) for i in layout.client_blocks)
        blocks.requires_grad_(False)
        targets = lora.target_modules or parts.arch.lora_targets
        slotted = [m for m in blocks.modules() if isinstance(m, LoRASlot)]  # a model the client already adapts
        if slotted:
            specs = [SlotSpec(m.slot_name, m.in_features, m.out_features) for m in slotted]
            specs = [spec for spec in specs if spec.name.rsplit(".", 1)[-1] in targets]
        else:
            specs = inject_slots(blocks, parts.arch, layout.client_blocks, targets)
        specs = sorted(specs, key=lambda spec: spec.block)  # client tune's order (order_slots)
        self.adapter = LoRAAdapter(specs, lora, generator=torch.Generator().manual_seed(seed))
        self.bottom, self.top = list(blocks[: layout.bottom]), list(blocks[layout.bottom :])
        self.sides = {
            "bottom": [i for i, spec in enumerate(specs) if spec.block in layout.bottom_blocks],
            "top": [i for i, spec in enumerate(specs) if spec.block in layout.top_blocks],
        }
        self.reference = self.gradients(MiddleStage(parts, layout.middle_blocks))

    def gradients(self, middle) -> dict[str, torch.Tensor]:
        """The bottom and top adapters' LoRA-B gradients (flat) through `middle`, summed over the calibration ids.

        Args:
            middle: Any callable (h (B, T, H), attention_mask (B, T)) -> h (B, T, H) standing for the middle.
        """
        params = list(self.adapter.b)
        total = [torch.zeros_like(p) for p in params]
        parts, n_targets = self.parts, self.ids[:, 1:].numel()
        with bind(self.adapter.binding()):
            for start in range(0, len(self.ids), self.batch_size):
                x = self.ids[start : start + self.batch_size]  # (B, T)
                mask = torch.ones_like(x)
                h = parts.embed(x)  # (B, T, H)
                if parts.pos_embed is not None:
                    h = h + parts.pos_embed(positions(mask))
                h = run_blocks(parts, self.top, middle(run_blocks(parts, self.bottom, h, mask), mask), mask)
                logits = parts.head(parts.norm(h)).float()  # (B, T, V)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum") / n_targets
                for acc, grad in zip(total, torch.autograd.grad(loss, params)):
                    acc += grad
        return {side: torch.cat([total[i].flatten() for i in idx]) for side, idx in self.sides.items()}

    def score(self, middle) -> dict[str, dict[str, float]]:
        """Per side: the cosine between the gradients through `middle` and through the full middle, and their norm
        ratio (middle's over the full middle's)."""
        got = self.gradients(middle)
        out = {}
        for side in SIDES:
            ref = self.reference[side]
            out[side] = {
                "cosine": float(F.cosine_similarity(got[side], ref, dim=0)),
                "norm_ratio": float(got[side].norm() / ref.norm().clamp_min(1e-30)),
            }
        return out


def combined(scores: dict[str, dict[str, float]]) -> float:
    """The selection's criterion: the mean of the bottom and the top cosine (each half of the adapter must transfer;
    on SmolLM2 the bottom's is the low one, so it decides most choices)."""
    return sum(scores[side]["cosine"] for side in SIDES) / len(SIDES)


def rank_candidates(probe: GradientProbe, candidates: list[Candidate], build_middle, progress: bool = False) -> list:
    """Scores every candidate; returns [(candidate, scores, combined score)] in the given order.

    Args:
        build_middle: candidate -> middle callable (h, attention_mask) -> h.
    """
    from tqdm.auto import tqdm

    out = []
    for cand in tqdm(candidates, desc="score structures", unit="candidate", disable=not progress):
        scores = probe.score(build_middle(cand))
        out.append((cand, scores, combined(scores)))
        log.info(
            "%s: gradient cosine bottom %.3f, top %.3f",
            cand.name,
            scores["bottom"]["cosine"],
            scores["top"]["cosine"],
        )
    return out


def choose(ranked: list, budget_params: int, budget: float, model_params: int, client_params: int) -> dict:
    """The selection record: the best-scoring candidate whose emulator fits `budget_params`, and every candidate's
    scores (for the manifest's selection section).

    Raises:
        SelectionError: no candidate fits the budget.
    """
    rows, best = [], None
    for cand, scores, score in ranked:
        fits = cand.emulator_params <= budget_params
        rows.append(
            {
                **asdict(cand),
                "package_share_of_model": (client_params + cand.emulator_params) / model_params,
                "fits_budget": fits,
                "gradient_cosine": {side: scores[side]["cosine"] for side in SIDES},
                "gradient_norm_ratio": {side: scores[side]["norm_ratio"] for side in SIDES},
                "score": score,
            }
        )
        if fits and (best is None or score > best["score"]):
            best = rows[-1]
    if best is None:
        raise SelectionError(
            f"no candidate structure fits a package of {budget:.0%} of the model's parameters; raise --budget"
        )
    return {
        "method": "gradient",
        "criterion": "mean of the bottom and top adapters' start-of-tuning gradient cosines with the full middle",
        "budget": budget,
        "chosen": best["name"],
        "kept": best["kept"],
        "slots": best["slots"],
        "slot_blocks": best["slot_blocks"],
        "mlp_width": best["mlp_width"],
        "candidates": rows,
    }


def gradient_choice(
    loaded,
    layout: StageLayout,
    ids: torch.Tensor,
    budget: float = DEFAULT_BUDGET,
    count: int | None = None,
    mlp_width: int | None = None,
    sink: torch.Tensor | None = None,
    families: tuple[str, ...] = ("uniform", "share"),
    progress: bool = False,
    max_cluster: int | None = None,
) -> dict:
    """`cloud emulator build --select gradient`: scores candidate structures on public ids (S, T) and returns the
    selection record of the best one under the budget (see choose).

    Args:
        loaded: The full model (tandem.stages.loading.LoadedModel).
        budget: Largest share of the model's unique parameters the package (client stages and the emulator's
            unique blocks) may hold.
        count: Only structures of this many unique blocks (the operator's --keep / --drop-ratio); None: a spread
            of counts from the most full-width blocks that fit to the whole middle.
        mlp_width: Only this MLP width (the operator's --mlp-width); None: the widest that fits each count.
        sink: The attention-sink vector the package will ship (tandem.emulator.sink), applied to every candidate.
        families: "uniform" (drops of evenly spaced blocks, tandem.emulator.candidates) and/or "share" (CKA
            clusters with a first, middle or last representative).
        max_cluster: No share candidate has a cluster over this many blocks (None: no cap).
    """
    from tandem.stages.arch import parts_of
    from tandem.stages.loading import client_state, n_params

    from .candidates import structures
    from .model import EmulatorStage, copy_blocks
    from .prune import neuron_scores, prune_blocks

    if not 0 < budget <= 1:
        raise SelectionError(f"--budget must be in (0, 1], got {budget}")
    parts = parts_of(loaded.model)
    middle = layout.middle_blocks
    model_params = sum(p.numel() for p in loaded.model.parameters())
    client_params = n_params(client_state(parts, layout))
    room = int(budget * model_params) - client_params
    cands = structures(parts, layout, ids, room, count, mlp_width, families, max_cluster)
    if not cands:
        if count is not None and max_cluster is not None and count * max_cluster < len(middle):
            raise SelectionError(
                f"cannot group {len(middle)} middle blocks into {count} clusters of at most {max_cluster} "
                f"(at least {-(-len(middle) // max_cluster)} are needed); raise the count (--clusters) or --max-cluster"
            )
        capped = "" if max_cluster is None else f" with clusters of at most {max_cluster} block(s)"
        raise SelectionError(
            f"no {'/'.join(families)} structure{capped} fits a package of {budget:.0%} of the model's parameters; "
            "raise --budget or --max-cluster, lower --mlp-width or leave --keep/--drop-ratio/--clusters out"
        )
    neurons = neuron_scores(parts, layout, middle, ids) if any(c.mlp_width for c in cands) else None

    def build_middle(cand: Candidate) -> EmulatorStage:
        if cand.mlp_width is None:
            blocks = nn.ModuleList(parts.blocks[i] for i in cand.kept)  # the model's own blocks: no copy
        else:
            blocks = copy_blocks(parts, cand.kept)
            prune_blocks(blocks, cand.kept, neurons, cand.mlp_width)
        return EmulatorStage(parts, blocks, sink, slots=cand.slots)

    probe = GradientProbe(parts, layout, ids)
    record = choose(rank_candidates(probe, cands, build_middle, progress), room, budget, model_params, client_params)
    record.update(sequences=int(ids.shape[0]), tokens=int(ids.numel()))
    if max_cluster is not None:
        record["max_cluster"] = max_cluster
    return record


def gradient_structure(
    loaded,
    layout: StageLayout,
    texts,
    sample,
    structure: str,
    counts: tuple,
    mlp_width,
    budget,
    cfg,
    max_cluster: int | None = None,
) -> dict:
    """`build_emulator`'s --select gradient: checks the options, measures the package's attention sink and runs
    gradient_choice on the structure's family.

    Args:
        texts: The public text (None: refused, the selection measures on it).
        sample: () -> calibration ids (S, T) from the distillation's training split.
        structure: "drop" (uniform drops and widths) or "share" (clusters, representatives and widths).
        counts: (drop_ratio, keep, keep_blocks, clusters, representatives) as the operator gave them.
        mlp_width: The operator's --mlp-width (None: chosen too).
        budget: Package share of the model's parameters (None: DEFAULT_BUDGET).
        cfg: The distillation settings (its sequence length for the sink, its progress flag).
        max_cluster: With structure "share": no candidate has a cluster over this many blocks (None: no cap).
    """
    from tandem.stages.loading import load_tokenizer

    from .select import keep_count
    from .sink import measure_sink
    from .text import pack_blocks

    drop_ratio, keep, keep_blocks, clusters, representatives = counts
    if keep_blocks is not None or representatives is not None:
        raise SelectionError("--select gradient chooses the blocks itself: leave --keep-blocks out")
    if clusters is not None and structure != "share":
        raise SelectionError("--clusters groups blocks of a shared emulator: give it with --structure share")
    if texts is None:
        raise SelectionError("--select gradient measures gradients on public text: give --distill-data DIR")
    given = [c for c in (drop_ratio, keep, clusters) if c is not None]
    if len(given) > 1:
        raise SelectionError("give at most one of --clusters, --keep or --drop-ratio with --select gradient")
    n = len(layout.middle_blocks)
    count = clusters if clusters is not None else keep_count(n, drop_ratio, keep) if given else None
    sink, stats = measure_sink(loaded, layout, pack_blocks(texts, load_tokenizer(loaded.path), cfg.seq_len))
    families = ("share",) if structure == "share" else ("uniform",)
    return gradient_choice(
        loaded,
        layout,
        sample(),
        DEFAULT_BUDGET if budget is None else budget,
        count,
        mlp_width,
        sink if stats["used"] else None,
        families,
        cfg.progress,
        max_cluster,
    )
