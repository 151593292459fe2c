"""What the cloud received in a private-generation session: its recording (`--out DIR`) and its audit (`client audit DIR`)."""

from __future__ import annotations

import json
import os

import torch

from tandem.stages.loading import config_from_json, config_json
from tandem.stages.lora import load_peft_tensors
from tandem.stages.modules import StageLayout

from .. import report
from . import attacks
from .audit import ASSUMPTIONS, attack_variants, known_state, read_context, recorded_forwards, strongest
from .cloud_view import inventory, read_cloud_view
from .record import CONTEXT_FILE, AuditRecorder

FEEDS_FILE = "generation_feeds.json"  # the token ids of each recorded Forward: the truth the audit scores against


class GenerationRecorder(AuditRecorder):
    """Keeps every Forward of a generation session as the cloud opened it (prefill and one per new token)."""

    def wants(self, kind: str, step: int) -> bool:
        return kind == "Forward"

    def finish(self, run, adapter_dir: str, result: dict) -> None:
        """Writes the audit's context, the fed token ids and report.json (the generation result as its config)."""
        layout = run.layout
        context = {
            "mode": "split",
            "generation": True,
            "model_config_json": config_json(run.config),
            "layout": {"num_layers": layout.num_layers, "bottom": layout.bottom, "top": layout.top},
            "stages_sha256": run.stages_sha256,
            "model": "",
            "adapter": os.path.abspath(adapter_dir),
            "defense": None,
            "audit": True,
        }
        out = os.path.dirname(self.dir)
        with open(os.path.join(out, CONTEXT_FILE), "w") as f:
            json.dump(context, f, indent=2)
        with open(os.path.join(out, FEEDS_FILE), "w") as f:
            json.dump([feed.tolist() for feed in run.feeds], f)
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump({"config": {"mode": "generation", "adapter": context["adapter"]}, "generation": result}, f)


def generation_rows(forwards, feeds: list, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each batch row's whole sequence as the cloud received it, (states (L, H), true ids (L,)), padding dropped;
    rows in order until `tokens` are taken."""
    forwards = sorted(forwards, key=lambda r: r.step)
    if len(forwards) != len(feeds):
        raise ValueError(f"{len(forwards)} recorded Forwards but {len(feeds)} fed batches: the recording is incomplete")
    states, truths = [], []
    for received, feed in zip(forwards, feeds):
        ids = torch.tensor(feed)  # (B, T)
        new = received.mask[:, received.mask.shape[1] - ids.shape[1] :].bool()  # (B, T) real new positions
        states.append([received.hidden[b][new[b]] for b in range(ids.shape[0])])
        truths.append([ids[b][new[b]] for b in range(ids.shape[0])])
    rows, n = [], 0
    for b in range(len(states[0])):
        if n >= tokens:
            break
        h = torch.cat([step[b] for step in states])
        t = torch.cat([step[b] for step in truths])
        take = min(len(t), tokens - n)
        rows.append((h[:take], t[:take]))
        n += take
    return rows


def audit_generation(run_dir: str, tokens=256, search_tokens=128, candidates=8, public_tokens=4096, progress=False):
    """The privacy section of a generation session's recording: the tuning audit's attacks on every received state."""
    context = read_context(run_dir)
    view = read_cloud_view(run_dir)
    forwards = recorded_forwards(view, run_dir)
    config, layout = config_from_json(context["model_config_json"]), StageLayout(**context["layout"])
    state, tokenizer = known_state(context, layout)
    with open(os.path.join(run_dir, FEEDS_FILE)) as f:
        rows = generation_rows(forwards, json.load(f), tokens)
    variants = {"known": attacks.KnownStages.build(config, layout, state)}
    adapter = context.get("adapter") or ""
    if os.path.exists(os.path.join(adapter, "adapter_model.safetensors")):
        variants["tuned"] = attacks.KnownStages.build(config, layout, state, load_peft_tensors(adapter))
    public = attacks.public_ids(tokenizer, public_tokens, 64)
    results = attack_variants(variants, rows, tokenizer, None, public, search_tokens, candidates, progress)
    n_tokens = sum(len(t) for _, t in rows)
    section = {
        "measured": True,
        "cut_after_block": layout.bottom,
        "client_blocks": f"{layout.bottom}:{layout.top}",
        "sample": {
            "kind": "Forward requests of a private-generation session (prefill and one per new token)",
            "steps": sorted({r.step for r in forwards}),
            "sequences": len(rows),
            "tokens": n_tokens,
            "search_tokens": min(search_tokens, n_tokens),
            "search_candidates": candidates,
            "public_tokens": int(public.numel()),
        },
        "attacks": results,
        "strongest": strongest(results["known"]),
        "labels": {"gradient_attack": {"label_recovery": None, "labels": 0, "steps": [], "how": "no Backward"}},
        "received": inventory(view),
        "defenses": {"cut_noise": {"noise_multiplier": 0.0}},
        "assumptions": ASSUMPTIONS,
    }
    section["note"] = report.one_line(section)
    return section
