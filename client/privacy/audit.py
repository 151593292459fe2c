"""The privacy audit: the attacks run on exactly what the cloud received in a run, summed up as the privacy section."""

from __future__ import annotations

import os

import torch

from tandem.stages.loading import cache_root, client_state, config_from_json, load_model, unpack_state
from tandem.stages.lora import load_peft_tensors
from tandem.stages.modules import StageLayout

from .. import report
from ..errors import ClientError
from . import attacks
from .adaptive import AdaptiveAttacker, audit_adaptive
from .cloud_view import VIEW_DIR, Received, inventory, read_cloud_view, read_middle_output
from .context import defense_of, read_context
from .defenses import CutNoise, dp_statement
from .private_bottom import PRIVATE_BOTTOM_FILE as PRIVATE_FILE
from .sample import pairs_of, sample_rows, sample_summary, score

ATTACKS = {
    "logit_lens": "a1: final norm + LM head on the cut state (no training, no search)",
    "nearest_embedding": "a2: nearest input embedding (cosine) after removing the public-text mean",
    "learned_inverter": "b: ridge regression from cut states to input embeddings, fitted on public text through the known bottom stage, nearest token",
    "search": "c: causal search over the inverter's top candidates for the tokens whose bottom-stage output is nearest the received state",
}

ADAPTIVE_KNOWS = (
    "the defense's algorithm and settings (privacy_context.json), the shipped weights, public text, and every "
    "recorded request (forward states, top-cut gradients, the middle's outputs it computed); not the data "
    "owner's private weights, adapter or seeds"
)

ASSUMPTIONS = (
    "The attacker is the cloud operator: it knows the full model, hence the client-stage weights it shipped, "
    "and the defense settings; it does not know the data owner's LoRA ('known' rows; 'tuned' rows show an "
    "attacker who also had the final LoRA). It sees every request recorded in cloud_view/. Public text: "
    "Python standard-library docstrings. The search only tries the inverter's top candidates."
)


def audit_run(
    run_dir: str,
    cfg: dict | None = None,
    data=None,
    tokens: int = 256,
    search_tokens: int = 128,
    candidates: int = 8,
    public_tokens: int = 4096,
    progress: bool = False,
    tuned: bool = True,
    adaptive: bool = True,
) -> dict:
    """Attacks what the cloud received in a run (RUN_DIR/cloud_view) and returns the privacy section.

    Args: run_dir: the --out directory of a `client tune` run; cfg: its TuneConfig as a dict (default: from
    RUN_DIR/report.json); data: its DataSplit (default: re-read from its --data, which must be unchanged);
    tokens: received tokens attacked; search_tokens: of those, tokens the searches try; candidates: per position,
    for the searches; public_tokens: public text the inverters are fitted on; progress: a progress bar; tuned:
    also attack with the data owner's tuned weights (how stale the cloud's copy is); adaptive: also run the
    adaptive attacker (privacy/adaptive.py), which fits itself to what was received.
    """
    context = read_context(run_dir)
    if context.get("generation"):  # a private-generation session's recording (privacy/generation_view.py)
        from .generation_view import audit_generation

        return audit_generation(run_dir, tokens, search_tokens, candidates, public_tokens, progress)
    cfg = cfg if cfg is not None else report.load(run_dir)["config"]
    view = read_cloud_view(run_dir)
    forwards = recorded_forwards(view, run_dir)
    config, layout = config_from_json(context["model_config_json"]), StageLayout(**context["layout"])
    state, tokenizer = known_state(context, layout)
    data = data if data is not None else reload_data(cfg, tokenizer)
    defense = defense_of(context)
    rows = sample_rows(forwards, data, tokens)
    known = attacks.KnownStages.build(config, layout, state)
    public = attacks.public_ids(tokenizer, public_tokens, 64)
    variants = {"known": known}
    if tuned and (tuned_stages := tuned_attacker(run_dir, state, layout, config)) is not None:
        variants["tuned"] = tuned_stages
    results = attack_variants(variants, pairs_of(rows), tokenizer, defense, public, search_tokens, candidates, progress)
    fitted = None
    if adaptive:  # the attacker sees the states and where they came from; the truth stays here, for scoring
        attacker = AdaptiveAttacker(context, view, run_dir, config, layout, state, public, defense)
        fitted = audit_adaptive(attacker, rows, tokenizer, search_tokens, candidates)
        results["adaptive"] = fitted.pop("results")
    section = {
        "measured": True,
        "cut_after_block": layout.bottom,
        "client_blocks": f"{layout.bottom}:{layout.top}",
        "sample": sample_summary(forwards, rows, search_tokens, candidates, public),
        "attacks": results,
        "strongest": strongest({**results["known"], **results.get("adaptive", {})}),
        "adaptive": adaptive_summary(results, fitted),
        "labels": label_attack(view, run_dir, known, data, fitted),
        "received": inventory(view),
        "defenses": defenses_section(layout, defense, dp_of_run(defense, cfg, data), results),
        "assumptions": ASSUMPTIONS,
    }
    section["note"] = report.one_line(section)
    return section


def recorded_forwards(view: list[Received], run_dir: str) -> list[Received]:
    """The recorded training Forward requests; an error when there are none."""
    forwards = [r for r in view if r.kind == "Forward"]
    if not forwards:
        raise ClientError(
            f"{run_dir}/{VIEW_DIR} holds no recorded Forward request: nothing to audit "
            "(was the run made with --audit no?)"
        )
    return forwards


def known_state(context: dict, layout: StageLayout):
    """The shipped client-stage weights and the tokenizer, as the data owner has them."""
    from tandem.stages.loading import load_tokenizer

    if context["mode"] == "split":
        from .. import downloads
        from ..allowed_files import STAGES_FILE

        sha = context["stages_sha256"] or ""
        where = os.path.join(cache_root(), "client", sha)
        # The cache came from the network: read it only through the hash record its download wrote.
        files = downloads.read_verified(where, {STAGES_FILE: sha}) if sha else None
        if files is None:
            raise ClientError(
                f"the client stages this run downloaded are not in the cache, or fail their hash check "
                f"({where}); rerun `client tune`"
            )
        return unpack_state(files[STAGES_FILE]), downloads.load_tokenizer(files)
    from tandem.stages.arch import parts_of
    from tandem.stages.loading import default_model_dir

    loaded = load_model(context["model"])
    return client_state(parts_of(loaded.model), layout), load_tokenizer(context["model"] or default_model_dir())


def reload_data(cfg: dict, tokenizer):
    """The run's DataSplit, re-read from its --data with its settings."""
    from ..data import load_split

    return load_split(
        cfg["data"],
        tokenizer,
        cfg["seq_len"],
        cfg["batch_size"],
        cfg["seed"],
        cfg["val_fraction"],
        cfg.get("val_max_sequences", 2**62),
    )  # absent: a run from before the cap


def tuned_attacker(run_dir: str, state: dict, layout: StageLayout, config) -> attacks.KnownStages | None:
    """An attacker who also holds the run's tuned adapter (and tuned client blocks, or its private bottom);
    None without an adapter."""
    adapter_dir = os.path.join(run_dir, "adapter")
    if not os.path.exists(os.path.join(adapter_dir, "adapter_model.safetensors")):
        return None
    tuned_weights = tuned_state(state, run_dir, layout, config)
    return attacks.KnownStages.build(config, layout, tuned_weights, load_peft_tensors(adapter_dir))


def tuned_state(state: dict, run_dir: str, layout: StageLayout, config) -> dict:
    """The shipped weights with the run's fully tuned client blocks (--tune-client-blocks, or the private bottom's
    RUN_DIR/private_bottom.safetensors) put in place: full-model block names, LoRA factors left to the adapter."""
    from safetensors.torch import load_file

    from tandem.stages.arch import arch_for

    prefix = arch_for(config).block_prefix
    out = dict(state)
    for path in (os.path.join(run_dir, "adapter", "client_blocks.safetensors"), os.path.join(run_dir, PRIVATE_FILE)):
        if not os.path.exists(path):
            continue
        for k, v in load_file(path).items():
            gid, rest = k[len(prefix) + 1 :].split(".", 1)
            if ".lora_" not in rest:
                out[f"{prefix}.{layout.client_blocks.index(int(gid))}.{rest}"] = v
    return out


def attack_variants(variants, rows, tokenizer, defense, public, search_tokens, candidates, progress) -> dict:
    """attack_rows with every variant of the attacker's weights, {variant: {attack: score}}."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(rows) * len(variants), desc="privacy audit", unit="seq", disable=not progress)
    results = {
        k: attack_rows(v, rows, tokenizer, defense, public, search_tokens, candidates, bar) for k, v in variants.items()
    }
    bar.close()
    return results


def attack_rows(known, rows, tokenizer, defense, public, search_tokens: int, candidates: int, bar=None) -> dict:
    """Runs the four forward attacks on sample rows [(received states (T, H), true ids (T,))]."""
    inverter = attacks.RidgeInverter(known, public, defense)
    flat = torch.cat([h for h, _ in rows])
    lens, near = attacks.logit_lens(known, flat), attacks.nearest_embedding(known, flat, inverter.mean)
    top = inverter.scores(flat).topk(candidates, -1).indices  # (n, C)
    guesses = {k: [] for k in ("logit_lens", "nearest_embedding", "learned_inverter", "search")}
    at, budget = 0, search_tokens
    for h, t in rows:
        span = slice(at, at + len(t))
        guesses["logit_lens"].append((lens[span], t))
        guesses["nearest_embedding"].append((near[span], t))
        guesses["learned_inverter"].append((top[span, 0], t))
        if budget > 0:
            guesses["search"].append((attacks.search_attack(known, h, top[span], defense), t))
            budget -= len(t)
        at += len(t)
        if bar is not None:
            bar.update(1)
    return {k: {**score(tokenizer, v), "how": ATTACKS[k]} for k, v in guesses.items()}


def strongest(results: dict) -> dict:
    """The attack that recovered the most tokens."""
    name, best = max(results.items(), key=lambda kv: kv[1]["token_recovery"])
    return {"attack": name, "token_recovery": best["token_recovery"], "rouge_l": best["rouge_l"]}


def adaptive_summary(results: dict, fitted: dict | None) -> dict:
    """The adaptive attacker's figure: the best of its attacks and of the non-adaptive ones (it knows all they know)."""
    if fitted is None:
        return {"measured": False}
    return {
        "measured": True,
        "strongest": strongest({**results["known"], **results["adaptive"]}),
        "strongest_adaptive_only": strongest(results["adaptive"]),
        "labels_from_tokens": fitted["labels"],
        "chose": fitted["chose"],
        "simulated": fitted["attacker"],
        "knows": ADAPTIVE_KNOWS,
    }


def label_attack(view: list[Received], run_dir: str, known, data, fitted: dict | None = None) -> dict:
    """The gradient attack on the top cut, on every recorded Backward with its middle output (and the adaptive
    attacker's labels: the next tokens its bidirectional search read)."""
    hits = n = 0
    steps = []
    for r in view:
        if r.kind != "Backward":
            continue
        h_mid = read_middle_output(run_dir, r.step)
        if h_mid is None:
            continue
        batch = data.batch_at(r.step)
        guess = attacks.gradient_attack(known, h_mid, r.hidden, batch["attention_mask"])[:, :-1]
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        hits += int((guess[keep] == labels[keep]).sum())
        n += int(keep.sum())
        steps.append(r.step)
    out = {
        "gradient_attack": {
            "label_recovery": hits / n if n else None,
            "labels": n,
            "steps": steps,
            "how": "push -dL/dh' through the shipped top blocks, norm and head (finite-difference JVP); argmax logit",
        },
        "on_the_wire": "no label or token id: the cloud receives float32 states and gradients and a uint8 padding mask (see 'received')",
        "note": (
            "Labels and the loss stay on the client, but the gradient at the top cut is J^T (softmax - onehot(label)) / n: "
            "with the top-stage weights it shipped, the cloud reads labels (= the next tokens) from it. Forward noise "
            "does not protect this path; the data owner's LoRA on the top blocks makes the cloud's Jacobian stale."
        ),
    }
    if fitted is not None:
        how = (
            "the labelled next tokens the bidirectional search recovered (forward states and gradients), searched rows"
        )
        out["adaptive"] = {**fitted["labels"], "how": how}
    return out


def dp_of_run(defense: CutNoise | None, cfg: dict, data) -> dict:
    """The (epsilon, delta) statement for the run: its passes over each sequence (training epochs; validation: 2)."""
    total = cfg["steps"] or -(-int(cfg["epochs"] * data.batches_per_epoch) // 1)
    passes = max(2, -(-total * cfg["batch_size"] // max(len(data.train), 1)))
    return dp_statement(defense, int(cfg["seq_len"]), passes)


def defenses_section(layout: StageLayout, defense: CutNoise | None, dp: dict, results: dict) -> dict:
    """The defenses in place and what each did."""
    return {
        "client_blocks": {"K": layout.bottom, "set_by": "the operator (cloud serve --client-blocks)"},
        "cut_noise": {**(defense.describe() if defense else {"noise_multiplier": 0.0}), **dp},
        "private_lora": staleness(results),
        "offsite_tuning": report.OFFSITE_NOTE,
    }


def staleness(results: dict) -> dict:
    """Token recovery with the shipped weights against the tuned ones."""
    if "tuned" not in results:
        return {"note": "no adapter in the run directory"}
    known, tuned = results["known"], results["tuned"]
    return {
        "recovery_with_known_weights": {a: known[a]["token_recovery"] for a in known},
        "recovery_with_tuned_weights": {a: tuned[a]["token_recovery"] for a in tuned},
        "note": "the cloud only knows the shipped weights; the data owner's LoRA on the bottom blocks makes them stale",
    }
