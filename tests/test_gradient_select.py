"""Gradient-aligned selection (issue #21): the start-of-tuning gradient cosine and `--select gradient` builds."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tandem.client.assemble import build_local
from tandem.cloud.cli import main as cloud_main
from tandem.emulator.build import build_emulator
from tandem.emulator.distill import DistillConfig
from tandem.emulator.errors import SelectionError
from tandem.emulator.gradient_select import GradientProbe
from tandem.emulator.model import EmulatorStage
from tandem.emulator.package import load_package
from tandem.stages.arch import parts_of
from tandem.stages.loading import load_model
from tandem.stages.lora import LoraConfig
from tandem.stages.modules import MiddleStage, StageLayout
from tandem.testing.models import make_model

CFG = DistillConfig(steps=2, batch_size=2, seq_len=16, warmup=1, val_every=2, progress=False)


@pytest.fixture(scope="module")
def llama8(tmp_path_factory):
    """A tiny Llama with 8 blocks (2:2 leaves 4 middle blocks) and MLPs of 128 neurons."""
    return make_model("llama", str(tmp_path_factory.mktemp("gs") / "llama"), layers=8, hidden=64)


@pytest.fixture(scope="module")
def probe(llama8):
    loaded = load_model(llama8)
    parts = parts_of(loaded.model)
    layout = StageLayout.parse("2:2", loaded.config)
    ids = torch.randint(0, 250, (4, 16), generator=torch.Generator().manual_seed(0))
    return parts, layout, GradientProbe(parts, layout, ids)


def test_the_full_middle_scores_one_and_a_dropped_or_shared_one_less(probe):
    parts, layout, p = probe
    full = p.score(MiddleStage(parts, layout.middle_blocks))
    same = p.score(EmulatorStage(parts, nn.ModuleList(parts.blocks[i] for i in layout.middle_blocks)))
    for scores in (full, same):
        for side in ("bottom", "top"):
            assert scores[side]["cosine"] == pytest.approx(1.0, abs=1e-5)
            assert scores[side]["norm_ratio"] == pytest.approx(1.0, abs=1e-5)
    dropped = p.score(MiddleStage(parts, [2, 5]))
    shared = p.score(EmulatorStage(parts, nn.ModuleList([parts.blocks[2], parts.blocks[5]]), slots=[0, 0, 1, 1]))
    nothing = p.score(lambda h, mask: h)
    for scores in (dropped, shared, nothing):
        assert all(-1.0 <= scores[side]["cosine"] < 0.97 for side in ("bottom", "top")), scores


def test_the_probe_tunes_the_adapter_client_tune_makes(llama8, probe):
    """Same slots, same order, same A for the seed: the gradients are the ones a real run starts with."""
    _, _, p = probe
    lora = LoraConfig()
    local = build_local(llama8, "2:2", lora, seed=0, middle_lora=False)
    assert [s.name for s in p.adapter.specs] == [s.name for s in local.adapter.specs]
    for a, b in zip(p.adapter.a, local.adapter.a):
        assert torch.equal(a, b)
    grads = p.gradients(MiddleStage(p.parts, p.layout.middle_blocks))
    assert grads["bottom"].abs().sum() > 0 and grads["top"].abs().sum() > 0
    # A model the client already adapts (its blocks carry LoRA slots) gives the same probe.
    again = GradientProbe(local.bottom.parts, local.layout, p.ids)
    assert torch.allclose(again.reference["bottom"], p.reference["bottom"], atol=1e-6)
    assert torch.allclose(again.reference["top"], p.reference["top"], atol=1e-6)


@pytest.mark.parametrize("structure", ["drop", "share"])
def test_select_gradient_records_every_candidate_and_keeps_the_best_under_the_budget(
    structure, llama8, sample_data, tmp_path
):
    out = str(tmp_path / "pkg")
    m = build_emulator(
        llama8, "2:2", out, sample_data, CFG, select="gradient", structure=structure, budget=0.9, select_seqs=4
    )
    sel = m["selection"]
    assert sel["method"] == "gradient" and sel["budget"] == 0.9
    cands = sel["candidates"]
    assert len(cands) >= 2
    assert all(c["name"].startswith("uniform" if structure == "drop" else "share") for c in cands)
    for c in cands:
        assert set(c["gradient_cosine"]) == {"bottom", "top"}
        assert all(-1 <= v <= 1 for v in c["gradient_cosine"].values())
        assert c["score"] == pytest.approx(sum(c["gradient_cosine"].values()) / 2)
    best = max((c for c in cands if c["fits_budget"]), key=lambda c: c["score"])
    assert sel["chosen"] == best["name"]
    assert m["kept_middle_blocks"] == best["kept"] and m["pruning"]["mlp_width"] == best["mlp_width"]
    assert m.get("slots") == best["slots"]
    assert m["params"]["package_share_of_model"] <= 0.9
    assert m["params"]["package_share_of_model"] == pytest.approx(best["package_share_of_model"], rel=1e-3)
    pkg = load_package(out)
    assert pkg.manifest["selection"]["candidates"] == cands
    if structure == "share":
        assert pkg.slots is not None and len(pkg.slots) == 4


def test_select_gradient_over_capped_clusters_scores_only_structures_under_the_cap(llama8, sample_data, tmp_path):
    def build(name, **kw):
        kw = dict(select="gradient", structure="share", budget=0.9, select_seqs=4, **kw)
        return build_emulator(llama8, "2:2", str(tmp_path / name), sample_data, CFG, **kw)["selection"]

    def biggest(slots):  # the most slots one stored block fills: its cluster's size
        return max(slots.count(b) for b in set(slots))

    from tandem.emulator.candidates import share_candidates

    # Blocks 0-2 of the middle alike, block 3 apart: two clusters are [0, 1, 2] and [3], or [0, 1] and [2, 3] capped.
    cka = torch.full((4, 4), 0.1)
    cka[:3, :3] = 1.0
    parts, layout = parts_of(load_model(llama8).model), StageLayout(8, 2, 2)
    free = share_candidates(parts, layout, 10**9, [2], None, cka)
    capped = share_candidates(parts, layout, 10**9, [2], None, cka, max_cluster=2)
    assert {biggest(c.slots) for c in free} == {3} and {biggest(c.slots) for c in capped} == {2}
    assert {tuple(c.slot_blocks) for c in capped} == {(2, 3, 4, 5)} and len(capped) == 2  # first/last == middle
    record = build("capped", max_cluster=2)
    assert record["max_cluster"] == 2 and record["candidates"]
    assert all(biggest(c["slots"]) <= 2 for c in record["candidates"])
    with pytest.raises(
        SelectionError, match=r"with clusters of at most 1 block\(s\) fits .* raise --budget or --max-cluster"
    ):
        build("none", max_cluster=1)  # no shared structure of 4 middle blocks has clusters of one
    with pytest.raises(
        SelectionError, match=r"into 1 clusters of at most 2 \(at least 2 are needed\); raise the count"
    ):
        build("short", max_cluster=2, clusters=1)
    for cap in (0, -2):
        with pytest.raises(SelectionError, match="--max-cluster must be >= 1"):
            build("zero", max_cluster=cap)


def test_select_gradient_errors_say_what_to_do(llama8, sample_data, tmp_path):
    def build(name, data=sample_data, **kw):
        return build_emulator(llama8, "2:2", str(tmp_path / name), data, CFG, select_seqs=4, **kw)

    with pytest.raises(SelectionError, match="--keep-blocks"):
        build("a", select="gradient", keep_blocks=[2, 5])
    with pytest.raises(SelectionError, match="--distill-data"):
        build("b", data=None, select="gradient")
    with pytest.raises(SelectionError, match="raise --budget"):
        build("c", select="gradient", budget=0.3)
    with pytest.raises(SelectionError, match="--select gradient"):
        build("d", drop_ratio=0.5, budget=0.9)
    with pytest.raises(SelectionError, match="--budget must be"):
        build("e", select="gradient", budget=1.5)


def test_cloud_emulator_build_select_gradient_from_the_command_line(llama8, sample_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cloud_main(["emulator", "build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in (
        "{uniform,greedy,gradient}",
        "--budget F",
        "records every candidate's scores",
        "which block represents",
    ):
        assert words in text, words
    argv = ["emulator", "build", "--model", llama8, "--distill-data", sample_data, "--out", str(tmp_path / "pkg")]
    argv += ["--steps", "0", "--seq-len", "16", "--select-seqs", "4", "--no-progress"]
    assert cloud_main(argv + ["--select", "gradient", "--budget", "0.9"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["selection"] == "gradient" and summary["package_share_of_model"] <= 0.9
    assert cloud_main(argv + ["--drop-ratio", "0.5", "--budget", "0.9"]) == 2
    assert "--select gradient" in capsys.readouterr().err
    assert cloud_main(argv) == 2  # without --select gradient, the count of blocks must be given
    assert "--drop-ratio" in capsys.readouterr().err
