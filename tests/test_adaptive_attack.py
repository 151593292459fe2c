"""The adaptive attacker: at least as strong as the non-adaptive one, runs from the cloud's view and the context only,
refuses a bad context in one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tandem.client.data import load_split
from tandem.client.errors import ClientError
from tandem.client.privacy import adaptive
from tandem.client.privacy.audit import audit_run
from tandem.client.trainer import TuneConfig, tune
from tandem.stages.lora import LoraConfig

SMALL = {"tokens": 64, "search_tokens": 32, "public_tokens": 1024}


def _run(tmp_path, tiny_models, sample_data, name: str, **kw) -> tuple[str, dict]:
    """A local-mode run on the tiny llama that records what split mode would send (no audit yet)."""
    cfg = TuneConfig(
        data=sample_data,
        out=str(tmp_path / name),
        mode="local",
        model=tiny_models["llama"],
        client_blocks="1:1",
        steps=3,
        batch_size=2,
        seq_len=32,
        lr=1e-2,
        lora=LoraConfig(rank=2),
        audit="record",
        progress=False,
        **kw,
    )
    tune(cfg)
    return cfg.out, cfg.to_dict()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models, sample_data):
    tmp = tmp_path_factory.mktemp("adaptive")
    with pytest.MonkeyPatch.context() as patch:  # one fixed key: the noise, and so the figures, repeat run to run
        patch.setattr("tandem.client.privacy.record.new_secret", lambda: bytes(range(32)))
        return _runs(tmp, tiny_models, sample_data)


def _runs(tmp, tiny_models, sample_data) -> dict:
    return {
        "clean": _run(tmp, tiny_models, sample_data, "clean"),
        "noisy": _run(tmp, tiny_models, sample_data, "noisy", noise_multiplier=1.0),
        "private": _run(
            tmp, tiny_models, sample_data, "private", private_bottom=1.0, private_warmup=2, label_noise=1.0
        ),
    }


def test_adaptive_attacker_does_at_least_as_well_undefended(runs):
    """Same rows: the adaptive figure is the best of a superset; the identity-aligned inverter IS attack b."""
    p = audit_run(runs["clean"][0], runs["clean"][1], **SMALL, tuned=False)
    known, fitted = p["attacks"]["known"], p["attacks"]["adaptive"]
    assert set(fitted) == set(adaptive.ADAPTIVE_ATTACKS) - {"inverter_noise_replay"}  # no cut noise to replay
    assert fitted["inverter_identity"]["token_recovery"] == known["learned_inverter"]["token_recovery"]
    assert fitted["inverter_identity"]["tokens"] == known["learned_inverter"]["tokens"] == p["sample"]["tokens"]
    assert fitted["bidirectional_search"]["tokens"] == known["search"]["tokens"]  # the same searched rows
    best_known = max(r["token_recovery"] for r in known.values())
    assert p["adaptive"]["strongest"]["token_recovery"] >= best_known
    assert p["strongest"] == p["adaptive"]["strongest"]
    assert fitted["bidirectional_search"]["token_recovery"] >= 0.9, fitted
    assert p["adaptive"]["chose"]["alignment"] == "identity"  # undefended: received states need no alignment
    assert p["labels"]["adaptive"]["labels"] > 0 and p["labels"]["adaptive"]["label_recovery"] >= 0.9


def test_cut_noise_cannot_be_replayed_from_the_seed_every_forward_carries(runs):
    """Every Forward carries a dropout seed the cut's seed follows from; CutNoise keys its draw with the run's secret,
    so the attacker's replay (the draw from that seed alone) removes nothing. The top-cut gradient still lifts the
    search past the forward attacks: noise at the bottom cut does not hide the labels, which are the next tokens."""
    p = audit_run(runs["noisy"][0], runs["noisy"][1], **SMALL, tuned=False)
    known, fitted = p["attacks"]["known"], p["attacks"]["adaptive"]
    assert known["search"]["token_recovery"] < 0.5
    assert fitted["inverter_noise_replay"]["token_recovery"] < 0.5, fitted
    assert p["adaptive"]["chose"]["alignment"] != "noise_replay"  # its guesses explain the received states worse
    assert fitted["bidirectional_search"]["token_recovery"] > known["search"]["token_recovery"] + 0.1, (known, fitted)
    assert p["adaptive"]["simulated"]["cut_noise"]["noise_multiplier"] == 1.0


def test_the_cut_noise_secret_keys_the_draw_and_never_reaches_the_context(runs):
    """The same step seed gives different noise under different secrets, the seed-only draw under none."""
    from tandem.client.privacy.defenses import CutNoise, new_secret

    keyed, other, bare = (CutNoise(1.0, 1.0, secret=s) for s in (new_secret(), new_secret(), None))
    assert not torch.equal(keyed.noise((1, 4, 8), 7), other.noise((1, 4, 8), 7))
    assert torch.equal(keyed.noise((1, 4, 8), 7), keyed.noise((1, 4, 8), 7))
    assert torch.equal(bare.noise((1, 4, 8), 7), CutNoise(1.0, 1.0).noise((1, 4, 8), 7))
    context = (Path(runs["noisy"][0]) / "privacy_context.json").read_text()
    assert "secret" not in context and set(json.loads(context)["defense"]) == {
        "noise_multiplier",
        "clip_norm",
        "first_clip_norm",
    }


@pytest.mark.parametrize("name", ["clean", "private"])
def test_adaptive_attacker_needs_only_the_cloud_view_and_the_context(runs, tiny_models, sample_data, tmp_path, name):
    """A directory with nothing but cloud_view/ and privacy_context.json (no adapter, no private bottom, no report)
    gives the adaptive attacker the same guesses: it never reads the data owner's weights or seeds."""
    run, cfg = runs[name]
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copytree(os.path.join(run, "cloud_view"), bare / "cloud_view")
    shutil.copy(os.path.join(run, "privacy_context.json"), bare / "privacy_context.json")
    assert os.path.exists(os.path.join(run, "adapter", "adapter_model.safetensors"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    data = load_split(sample_data, tok, 32, 2, 0, cfg["val_fraction"])
    full = audit_run(run, cfg, data, **SMALL)
    only = audit_run(str(bare), cfg, data, **SMALL)
    assert "tuned" in full["attacks"] and "tuned" not in only["attacks"]
    assert only["attacks"]["adaptive"] == full["attacks"]["adaptive"]
    assert only["adaptive"] == full["adaptive"]
    shadow = only["adaptive"]["simulated"]["shadow"]
    if name == "private":  # its shadow of the defense: the same algorithm and settings, its own seed, public text
        assert os.path.exists(os.path.join(run, "private_bottom.safetensors"))
        assert only["adaptive"]["simulated"]["bottom"] == "a shadow private bottom"
        assert shadow["settings"] == json.loads((bare / "privacy_context.json").read_text())["private_bottom"]
    else:
        assert shadow is None
    context = json.loads((bare / "privacy_context.json").read_text())
    settings = [context] + [v for v in context.values() if isinstance(v, dict)]
    assert not [k for d in settings for k in d if "seed" in k], context  # no seed of the client's is in it


def _broken(tmp_path, run: str, name: str, edit) -> str:
    out = tmp_path / name
    shutil.copytree(run, out)
    path = out / "privacy_context.json"
    context = json.loads(path.read_text())
    path.write_text(edit(context) if callable(edit) else edit)
    return str(out)


@pytest.mark.parametrize(
    ("name", "edit", "match"),
    [
        ("not-json", "{not json", "not readable JSON"),
        ("list", "[1, 2]", "not an object"),
        ("missing", lambda c: json.dumps({k: v for k, v in c.items() if k != "layout"}), "lacks layout"),
        ("layout", lambda c: json.dumps({**c, "layout": {**c["layout"], "bottom": 0}}), "not a cut"),
        ("layout-type", lambda c: json.dumps({**c, "layout": {**c["layout"], "top": "1"}}), "integer"),
        (
            "defense",
            lambda c: json.dumps({**c, "defense": {"noise_multiplier": -1, "clip_norm": 1, "first_clip_norm": 1}}),
            "not a cut defense",
        ),
        ("defense-keys", lambda c: json.dumps({**c, "defense": {"noise_multiplier": 1}}), "not a cut defense"),
        ("private", lambda c: json.dumps({**c, "private_bottom": "yes"}), "private_bottom must be null or an object"),
        ("private-algo", lambda c: json.dumps({**c, "private_bottom": {"algorithm": "?"}}), "do not train a shadow"),
    ],
)
def test_bad_context_is_one_line(runs, tmp_path, name, edit, match):
    run = _broken(tmp_path, runs["clean"][0], name, edit)
    with pytest.raises(ClientError, match=match) as info:
        audit_run(run, runs["clean"][1], **SMALL)
    assert "\n" not in str(info.value)


def test_alignments_map_received_moments_onto_the_simulations():
    """Diagonal and CORAL alignment give the received states the simulation's mean and (shrunk) spread."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(4000, 6, generator=g) @ torch.randn(6, 6, generator=g) + 3.0
    received = torch.randn(4000, 6, generator=g) * 5.0 - 1.0
    maps = adaptive.alignment_maps(received, target.mean(0), torch.cov(target.T.double()))
    assert torch.equal(maps["identity"](received), received)
    for name in ("diagonal", "coral"):
        assert torch.allclose(maps[name](received).mean(0), target.mean(0), atol=1e-3), name
    assert torch.allclose(maps["diagonal"](received).std(0), target.std(0), rtol=1e-3)
    coral = torch.cov(maps["coral"](received).T.double())
    want = adaptive.shrunk(torch.cov(target.T.double()))  # received states are isotropic: shrinking leaves them be
    assert float((coral - want).norm() / want.norm()) < 0.1


def test_cut_seed_and_candidates():
    """The cut's seed follows from the dropout seed a Forward carries; candidates merge without repeats."""
    from tandem.client.model import stage_seed
    from tandem.client.privacy.record import middle_seed

    for seed, step in ((0, 0), (7, 3), (2**62, 10**6), (123456789, -4)):
        assert adaptive.cut_seed(stage_seed(seed, step, 1)) == stage_seed(seed, step, 3)
        assert middle_seed(stage_seed(seed, step, 3)) == stage_seed(seed, step, 1)
    best, other = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[2, 9, 8], [7, 4, 6]])
    gradient = torch.tensor([[5, 1], [6, 0]])
    merged = adaptive.merged_candidates([best, other], gradient, 4)
    assert merged.tolist() == [[1, 2, 9, 3], [6, 0, 4, 7]]  # position 0 has no gradient evidence
