"""bench/offsite_table.py's protocol end to end on a tiny random Llama with tiny settings: every structure beside full
tuning, each mode at its own best learning rate over the splits, the cells cached for --resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tandem.stages.lora_layers import format_layers
from tandem.testing.models import make_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRUCTURES = ["uniform", "share", "share-gradient", "share+clusters"]  # +clusters: LoRA on the kept blocks too
SPLITS, LRS = [0, 1], [1e-3, 4e-3]


def _run(model: str, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, os.path.join(ROOT, "bench", "offsite_table.py"), "--model", model]
    argv += ["--work", str(tmp_path / "work"), "--json", str(tmp_path / "table.json"), "--threads", "1"]
    argv += ["--structures", ",".join(STRUCTURES), "--splits", "0,1", "--lrs", "1e-3,4e-3", "--budget", "0.9"]
    argv += ["--kd-steps", "0", "--batch-size", "2", "--seq-len", "16", "--eval-seqs", "4", "--qa-train", "16"]
    argv += ["--qa-test", "4", "--public-limit", "30", "--grad-seqs", "4", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False, env=env)


def test_the_protocol_runs_end_to_end_and_resumes(tmp_path):
    model = make_model("llama", str(tmp_path / "llama"), layers=8, hidden=64)
    done = _run(model, tmp_path, "--tune-steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((tmp_path / "table.json").read_text())
    cells = res["cells"]
    # Full tuning's sweep once per adapter layout, shared by every structure; every structure's own sweep.
    placed = cells["share+clusters/layers"]["layers"]
    assert placed == sorted([0, 1, 6, 7] + cells["share/build"]["kept"]) and cells["share/layers"]["layers"] == []
    full = {name: "full" if name != "share+clusters" else f"full@{format_layers(placed)}" for name in STRUCTURES}
    for prefix in set(full.values()):
        assert sorted(k for k in cells if k.startswith(f"{prefix}/s")) == sorted(
            f"{prefix}/s{s}/lr{lr:g}" for s in SPLITS for lr in LRS
        )
    assert "share+clusters/build" not in cells, "the placed structure reuses its emulator's build"
    for name in STRUCTURES:
        for s in SPLITS:
            for lr in LRS:
                cell = cells[f"{name}/s{s}/lr{lr:g}"]
                assert cell["ppl"] > 1 and 0 <= cell["acc"] <= 1 and cell["emulator_ppl"] > 1
        row = res["summary"][name]
        for mode, prefix in (("lr_plug_in", name), ("lr_full", full[name])):  # each mode at its own best lr
            mean = {lr: sum(cells[f"{prefix}/s{s}/lr{lr:g}"]["ppl"] for s in SPLITS) / 2 for lr in LRS}
            assert row[mode] == min(mean, key=mean.get)
        zs = [cells[f"zero_shot/s{s}"]["ppl"] for s in SPLITS]
        pi = [cells[f"{name}/s{s}/lr{row['lr_plug_in']:g}"]["ppl"] for s in SPLITS]
        ft = [cells[f"{full[name]}/s{s}/lr{row['lr_full']:g}"]["ppl"] for s in SPLITS]
        want = [(z - p) / (z - f) for z, p, f in zip(zs, pi, ft)]
        assert all(
            math.isclose(a, b) or math.isnan(a) and z <= f
            for a, b, z, f in zip(row["recovery_per_split"], want, zs, ft)
        )
        assert 0 < row["package_share"] <= 0.9 and 0 < row["client_flops_over_full"] <= 1.0 + 1e-9
        assert all(-1 <= row["gradient_cosine"][side] <= 1 for side in ("bottom", "top"))
        assert set(row["aims"]) == {"recovery >= 90%", "addition >= 0.7x", "emulator >= 15% worse", "package <= 60%"}
    assert cells["share/build"]["slots"] is not None and cells["uniform/build"]["slots"] is None
    assert cells["share-gradient/build"]["selection"]["method"] == "gradient"
    assert len(cells["share-gradient/build"]["selection"]["candidates"]) >= 2
    table = done.stdout[done.stdout.index("| structure |") :]
    assert all(f"| {name} |" in table for name in STRUCTURES)

    again = _run(model, tmp_path, "--tune-steps", "2", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "table.json").read_text())["cells_computed_this_run"] == 0
    other = _run(model, tmp_path, "--tune-steps", "3", "--resume")
    assert other.returncode != 0 and "other settings" in other.stderr and "tune_steps" in other.stderr
