"""The adaptive attacker: it knows the defense's algorithm and settings, the shipped weights and public text (never
the data owner's private weights or seeds) and fits its attacks to what it received, forward states and gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ClientError
from ..model import stage_seed
from . import attacks
from .attacks import RidgeInverter
from .cloud_view import Received, read_middle_output
from .defenses import CutNoise

ADAPTIVE_ATTACKS = {
    "inverter_identity": (
        "b fitted on public text through the attacker's simulation of the defense (its own noise seed; a shadow "
        "private bottom trained with the defense's own algorithm when the run had one), received states as they are"
    ),
    "inverter_diagonal": "the same inverter after matching each received dimension's mean and spread to the simulation's",
    "inverter_coral": (
        "the same inverter after whitening the received states (shrunk covariance) and re-colouring them with the "
        "simulation's covariance (CORAL)"
    ),
    "inverter_noise_replay": (
        "the inverter (fitted on clipped public states) after subtracting the cut noise regenerated from the seed "
        "every Forward carries (the cut's seed = the dropout seed sent + a constant); only with cut noise"
    ),
    "bidirectional_search": (
        "c over every aligned inverter's top candidates AND the top-cut gradient's (a label is the next token), in "
        "the best alignment (its guesses re-explain the received states best); cost: squared forward distance / "
        "(2 x the median residual per coordinate) - log-probabilities from the gradient and the inverter"
    ),
    "bidirectional_search_balanced": (
        "the same search with the forward distance in units of 2 x the median residual (for a structured mismatch, "
        "e.g. a private bottom the attacker only shadows)"
    ),
}
SHRINK = 0.1  # covariance shrinkage towards its mean variance: a few hundred received states for H dimensions
ATTACKER_SEED = 7919  # the attacker's own seed for its shadow of a trained defense (never the client's)


@dataclass
class Simulation:
    """The attacker's model of the defended bottom stage: stages (shipped, or its shadow private bottom) and noise."""

    known: attacks.KnownStages
    defense: CutNoise | None
    shadow: dict | None  # how the shadow private bottom was trained; None: the shipped bottom


def simulate(
    context: dict, config, layout, state: dict, public: torch.Tensor, defense, shadow_steps: int
) -> Simulation:
    """The attacker's copy of the defended bottom: a shadow private bottom when the context names one."""
    settings = context.get("private_bottom")
    known = attacks.KnownStages.build(config, layout, state)
    if not settings:
        return Simulation(known, defense, None)
    from .private_bottom import train_private_bottom

    steps = min(shadow_steps, int(context.get("steps", shadow_steps)))  # after the settings' own warm-up
    try:
        blocks = train_private_bottom(known.parts, layout, public, settings, seed=ATTACKER_SEED, steps=steps)
    except (KeyError, TypeError, ValueError) as e:
        raise ClientError(
            f"privacy_context.json: private_bottom settings {settings} do not train a shadow ({e})"
        ) from None
    for i, block_state in enumerate(blocks):
        known.bottom_blocks[i].load_state_dict(block_state)
    return Simulation(known, defense, {"steps": steps, "seed": "the attacker's own", "settings": settings})


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (H,) and covariance (H, H) of states (n, H), in float64."""
    x = x.double()
    return x.mean(0), torch.cov(x.T)


def shrunk(cov: torch.Tensor) -> torch.Tensor:
    """Covariance shrunk towards its mean variance (well conditioned with fewer states than dimensions)."""
    eye = torch.eye(len(cov), dtype=cov.dtype)
    return (1 - SHRINK) * cov + SHRINK * cov.diagonal().mean() * eye


def matrix_power(cov: torch.Tensor, p: float) -> torch.Tensor:
    """cov ** p for a symmetric positive definite matrix."""
    vals, vecs = torch.linalg.eigh(cov)
    return (vecs * vals.clamp_min(1e-12 * float(vals.max())) ** p) @ vecs.T


def alignment_maps(received: torch.Tensor, target_mean: torch.Tensor, target_cov: torch.Tensor) -> dict:
    """Maps from the received states' distribution to the simulation's, {name: f((n, H)) -> (n, H)}, identity first."""
    mu_r, cov_r = moments(received)
    mu_p, cov_p = target_mean.double(), target_cov.double()
    spread = (cov_p.diagonal().clamp_min(1e-12) / cov_r.diagonal().clamp_min(1e-12)).sqrt()
    recolour = matrix_power(shrunk(cov_r), -0.5) @ matrix_power(shrunk(cov_p), 0.5)
    return {
        "identity": lambda x: x,
        "diagonal": lambda x: ((x.double() - mu_r) * spread + mu_p).float(),
        "coral": lambda x: ((x.double() - mu_r) @ recolour + mu_p).float(),
    }


def row_map(align):
    """A row's (T, H) states with positions >= 1 aligned; position 0 (the attention sink, an outlier) kept."""
    return lambda h, step, b: torch.cat([h[:1], align(h[1:])]) if len(h) > 1 else h


def cut_seed(dropout_seed: int) -> int:
    """The cut transform's seed from the middle's dropout seed every Forward carries (model.stage_seed: 3 vs 1)."""
    return (dropout_seed + stage_seed(0, 0, 3) - stage_seed(0, 0, 1)) % (2**63 - 1)


class NoiseReplay:
    """Cut noise regenerated and subtracted: CutNoise draws it from the cut's seed, which is the dropout seed sent
    with every Forward plus a constant; what is left is the clipped states. (A flaw of CutNoise, not of the attack.)"""

    def __init__(self, defense: CutNoise, forwards: list[Received]):
        self.defense, self.by_step = defense, {r.step: r for r in forwards}

    def __call__(self, h: torch.Tensor, step: int, b: int) -> torch.Tensor:
        sent = self.by_step[step]
        return h - self.defense.noise(tuple(sent.hidden.shape), cut_seed(sent.dropout_seed))[b, : len(h)]


def clipped(sim: Simulation, out: torch.Tensor) -> torch.Tensor:
    """Bottom outputs (B, T, H) clipped as the defense clips them (the noise is what the attacker cannot undo)."""
    return sim.defense.clip(out) if sim.defense is not None else out


def residual(sim: Simulation, guess: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared distance per position (T,) between the simulated output of a guessed sequence and the target states."""
    out = clipped(sim, sim.known.bottom(guess.unsqueeze(0), torch.ones(1, len(guess), dtype=torch.long)))[0]
    return ((out - target) ** 2).sum(-1)


class GradientEvidence:
    """Log-probabilities of each row's tokens from the top-cut gradients (the labels are the next tokens).

    The recorded Backward of a step carries g = dL/dh' at the top cut and the cloud computed h' itself;
    gradient_logits pushes -g through the shipped top blocks and head. Standardised over the vocabulary
    per position, a softmax turns them into log-probabilities of the label at that position, which is
    the input token one position later.
    """

    def __init__(self, known: attacks.KnownStages, view: list[Received], run_dir: str):
        self.known, self.run_dir = known, run_dir
        self.masks = {r.step: r.mask for r in view if r.kind == "Forward"}
        self.grads = {r.step: r.hidden for r in view if r.kind == "Backward"}
        self.cache: dict[int, torch.Tensor | None] = {}

    def of_step(self, step: int) -> torch.Tensor | None:
        """(B, T, V) log-probabilities of the label at each position, or None without a gradient for the step."""
        if step not in self.cache:
            h_mid = read_middle_output(self.run_dir, step)
            if h_mid is None or step not in self.grads or step not in self.masks:
                self.cache[step] = None
            else:
                z = attacks.gradient_logits(self.known, h_mid, self.grads[step], self.masks[step])
                self.cache[step] = standardised_logp(z)
        return self.cache[step]

    def of_row(self, step: int, b: int, length: int) -> torch.Tensor | None:
        """(length, V) log-probabilities of each token of a row (position 0: none, zeros), or None."""
        logp = self.of_step(step)
        if logp is None:
            return None
        return torch.cat([torch.zeros(1, logp.shape[-1]), logp[b, : length - 1]])


def standardised_logp(z: torch.Tensor) -> torch.Tensor:
    """Scores (n, V) standardised over the vocabulary per row, as log-probabilities."""
    return torch.log_softmax((z - z.mean(-1, keepdim=True)) / z.std(-1, keepdim=True).clamp_min(1e-12), -1)


def merged_candidates(inverter_tops: list[torch.Tensor], gradient_top: torch.Tensor | None, c: int) -> torch.Tensor:
    """(T, c) candidates per position: the gradient's top picks, then the inverters' (T, C) tops interleaved rank by
    rank (the best-aligned first), no repeats."""
    t_len = len(inverter_tops[0])
    out = torch.empty(t_len, c, dtype=torch.long)
    ranked = torch.stack(inverter_tops, 2).flatten(1)  # (T, C * A): rank 0 of every alignment, then rank 1, ...
    for t in range(t_len):
        firsts = gradient_top[t].tolist() if gradient_top is not None and t > 0 else []
        out[t] = torch.tensor(list(dict.fromkeys(firsts + ranked[t].tolist()))[:c])
    return out


class AdaptiveAttacker:
    """Fits its inverter and search to what the cloud received; reads only the cloud's view and the run's context.

    Args:
        context: The run's privacy context (the defense's algorithm and settings).
        view: The recorded requests (what the cloud received).
        run_dir: Where the middle's outputs of the recorded steps are (the cloud computed them).
        config, layout, state: The model, the cut and the shipped client-stage weights.
        public: (N, T) public-text token ids.
        defense: The run's cut noise, from the context.
        shadow_steps: Most optimizer steps of a shadow private bottom after its warm-up (the run's steps, the
            middle's task stood in for by the warm-up's: stay close to the shipped bottom's output).
    """

    def __init__(self, context, view, run_dir, config, layout, state, public, defense, shadow_steps: int = 40):
        forwards = [r for r in view if r.kind == "Forward"]
        context = {**context, "steps": max(r.step for r in forwards) + 1}  # the cloud counts the steps it serves
        self.sim = simulate(context, config, layout, state, public, defense, shadow_steps)
        self.inverter = RidgeInverter(self.sim.known, public, defense)
        received = torch.cat([r.hidden[b, 1 : int(r.mask[b].sum())] for r in forwards for b in range(len(r.mask))])
        maps = alignment_maps(received, self.inverter.mean, self.inverter.cov)
        self.maps = {name: (row_map(f), self.inverter) for name, f in maps.items()}  # name -> (map, its inverter)
        if defense is not None and defense.noise_multiplier > 0:
            clip_only = CutNoise(0.0, defense.clip_norm, defense.first_clip_norm)
            self.maps["noise_replay"] = (
                NoiseReplay(defense, forwards),
                RidgeInverter(self.sim.known, public, clip_only),
            )
        self.evidence = GradientEvidence(attacks.KnownStages.build(config, layout, state), view, run_dir)

    def attack(self, rows: list[tuple[torch.Tensor, int, int]], search_tokens: int, candidates: int) -> tuple:
        """Guesses for rows [(received states (T, H), step, row in batch)]: ({attack: [guess (T,)]}, how it chose)."""
        guesses, tops, spread = {}, {}, {}
        for name, (align, inverter) in self.maps.items():
            targets = [align(h, step, b) for h, step, b in rows]
            top = inverter.scores(torch.cat(targets)).topk(candidates, -1).indices
            tops[name] = (targets, list(top.split([len(h) for h in targets])))
            guesses[f"inverter_{name}"] = [t[:, 0] for t in tops[name][1]]
            per_position = [residual(self.sim, t[:, 0], h)[1:] for t, h in zip(tops[name][1], targets)]
            spread[name] = float(torch.cat(per_position).median()) if sum(map(len, per_position)) else 0.0
        best = min(spread, key=spread.get)  # the alignment whose guesses best re-explain the received states
        order = [best] + [name for name in tops if name != best]
        ranked = [tops[best][0], [list(cands) for cands in zip(*(tops[name][1] for name in order))]]
        scales = {  # iid Gaussian residual per coordinate; or one typical residual per nat (structured mismatch)
            "bidirectional_search": max(2 * spread[best] / rows[0][0].shape[-1], 1e-12),
            "bidirectional_search_balanced": max(2 * spread[best], 1e-12),
        }
        for name, scale in scales.items():
            guesses[name] = self.search(rows, ranked, self.maps[best][1], search_tokens, candidates, scale)
        return guesses, {"alignment": best, "residual_median": spread, "forward_scales": scales}

    def search(self, rows, ranked, inverter, search_tokens: int, candidates: int, scale: float) -> list[torch.Tensor]:
        """The bidirectional search on the first `search_tokens` tokens of the rows.

        Args: rows: [(states, step, row in batch)]; ranked: (the best alignment's targets, each row's list of every
        alignment's top candidates, the best first); inverter: the best alignment's; scale: what a squared forward
        distance is divided by. A candidate's cost: distance / scale - its log-probability from the gradient (the
        label one position earlier) - its log-probability from the inverter (both standardised over the vocabulary).
        """
        out, budget = [], search_tokens
        for (h, step, b), target, tops in zip(rows, *ranked):
            if budget <= 0:
                break
            logp = self.evidence.of_row(step, b, len(h))
            gradient_top = logp.topk(max(1, candidates // 2), -1).indices if logp is not None else None
            cands = merged_candidates(tops, gradient_top, candidates)
            prior = logp.gather(1, cands) if logp is not None else None
            from_inverter = standardised_logp(inverter.scores(target)).gather(1, cands)
            prior = from_inverter if prior is None else prior + from_inverter
            out.append(attacks.search_attack(self.sim.known, target, cands, self.sim.defense, prior=prior, scale=scale))
            budget -= len(h)
        return out

    def describe(self) -> dict:
        """What the attacker simulated."""
        return {
            "bottom": "a shadow private bottom" if self.sim.shadow else "the shipped bottom stage",
            "shadow": self.sim.shadow,
            "cut_noise": self.sim.defense.describe() if self.sim.defense else None,
        }


def audit_adaptive(attacker: AdaptiveAttacker, rows, tokenizer, search_tokens: int, candidates: int) -> dict:
    """Runs the adaptive attacker on sampled rows (states and origin only) and scores it against their truth."""
    from .sample import label_score, score

    guesses, chose = attacker.attack([(r.hidden, r.step, r.index) for r in rows], search_tokens, candidates)
    results = {
        name: {**score(tokenizer, list(zip(g, [r.ids for r in rows]))), "how": ADAPTIVE_ATTACKS[name]}
        for name, g in guesses.items()
    }
    labels = max(
        (label_score(guesses[name], rows) for name in guesses if name.startswith("bidirectional")),
        key=lambda score: -1 if score["label_recovery"] is None else score["label_recovery"],
    )
    return {"results": results, "labels": labels, "chose": chose, "attacker": attacker.describe()}
