"""The run directory: `client tune` never overwrites another run's work without --overwrite."""

from __future__ import annotations

import os
import subprocess

from tandem.testing.servers import BIN


def client(*args, check_rc=None):
    """Runs the real `client` command line; returns (rc, stdout, stderr)."""
    r = subprocess.run([os.path.join(BIN, "client"), *args], capture_output=True, text=True, timeout=600)
    if check_rc is not None:
        assert r.returncode == check_rc, r.stderr
    return r.returncode, r.stdout, r.stderr


def local_tune(model, data, out, *extra, steps=2):
    return [
        "tune",
        "--mode",
        "local",
        "--model",
        model,
        "--data",
        data,
        "--out",
        out,
        "--steps",
        str(steps),
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--lora-rank",
        "2",
        "--no-progress",
        "--threads",
        "1",
        *extra,
    ]


def _snapshot(out):
    """Every file of the run, with its bytes."""
    files = {}
    for root, _, names in os.walk(out):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                files[os.path.relpath(p, out)] = f.read()
    return files


def one_line_error(err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_finished_run_is_never_overwritten(tiny_models, sample_data, tmp_path):
    out = str(tmp_path / "run")
    client(*local_tune(tiny_models["gpt2"], sample_data, out), check_rc=0)
    before = _snapshot(out)
    assert {"report.json", "checkpoint.pt", "adapter/adapter_model.safetensors"} <= before.keys()

    rc, _, err = client(*local_tune(tiny_models["gpt2"], sample_data, out, "--lr", "5e-3"))
    assert rc == 2
    one_line_error(err, out, "--overwrite", "finished run")
    assert _snapshot(out) == before  # adapter, checkpoint and report untouched

    client(*local_tune(tiny_models["gpt2"], sample_data, out, "--lr", "5e-3", "--overwrite"), check_rc=0)
    after = _snapshot(out)
    assert after["adapter/adapter_model.safetensors"] != before["adapter/adapter_model.safetensors"]


def test_unfinished_and_foreign_dirs_are_refused(tiny_models, sample_data, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "checkpoint.pt").write_bytes(b"an interrupted run's progress")
    rc, _, err = client(*local_tune(tiny_models["gpt2"], sample_data, str(unfinished)))
    assert rc == 2
    one_line_error(err, str(unfinished), "--resume", "--overwrite")
    assert (unfinished / "checkpoint.pt").read_bytes() == b"an interrupted run's progress"

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    rc, _, err = client(*local_tune(tiny_models["gpt2"], sample_data, str(foreign)))
    assert rc == 2
    one_line_error(err, str(foreign), "thesis.tex", "--overwrite")
    # --overwrite replaces only what tandem writes: the other files stay.
    client(*local_tune(tiny_models["gpt2"], sample_data, str(foreign), "--overwrite"), check_rc=0)
    assert (foreign / "thesis.tex").read_text() == "years of work"
    assert (foreign / "report.json").exists()


def test_overwrite_leaves_kept_files_modes_alone(tiny_models, sample_data, tmp_path):
    """--out in a project folder with --overwrite: tandem's files become private, the owner's keep their modes."""
    project = tmp_path / "project"
    (project / "bin").mkdir(parents=True)
    script = project / "bin" / "train.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    (project / "bin").chmod(0o755)
    shared = project / "notes.txt"
    shared.write_text("for the team")
    shared.chmod(0o644)
    client(*local_tune(tiny_models["gpt2"], sample_data, str(project), "--overwrite"), check_rc=0)
    assert oct(script.stat().st_mode & 0o777) == oct(0o755)  # still executable
    assert oct((project / "bin").stat().st_mode & 0o777) == oct(0o755)
    assert oct(shared.stat().st_mode & 0o777) == oct(0o644)
    assert (project / "report.json").stat().st_mode & 0o077 == 0  # the run's own files are private
    assert (project / "adapter" / "adapter_model.safetensors").stat().st_mode & 0o077 == 0
