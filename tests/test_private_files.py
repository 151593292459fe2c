"""What holds the data owner's data or keys is private: run directories, adapters, checkpoints, reports, recorded
cloud traffic and caches are 0700 directories of 0600 files."""

from __future__ import annotations

import os
import stat
import subprocess

from tandem.client.trainer import TuneConfig, tune
from tandem.stages.lora import LoraConfig
from tandem.testing.servers import BIN


def _modes(root):
    """{relative path: permission bits} of everything under root (root itself as '.')."""
    out = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = stat.S_IMODE(os.lstat(p).st_mode)
    return out


def _assert_private(root, must_have):
    modes = _modes(root)
    assert must_have <= modes.keys(), sorted(modes)
    for rel, mode in modes.items():
        want = 0o700 if os.path.isdir(os.path.join(root, rel)) else 0o600
        assert mode == want, f"{root}/{rel}: {oct(mode)}, want {oct(want)}"


def test_cli_run_dir_and_cache_are_private(tiny_models, sample_data, server_factory, tmp_path):
    server = server_factory(tiny_models["llama"])
    out, cache = tmp_path / "run", tmp_path / "cache"
    out.mkdir(mode=0o755)  # an existing, world-readable --out is closed too
    os.chmod(out, 0o755)
    env = {**os.environ, "TANDEM_CACHE": str(cache)}
    r = subprocess.run(
        [
            os.path.join(BIN, "client"),
            "tune",
            *server.cli_args(),
            "--data",
            sample_data,
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--lora-rank",
            "2",
            "--no-progress",
            "--audit",
            "record",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    _assert_private(
        str(out),
        {
            "checkpoint.pt",
            "report.json",
            "report.png",
            "adapter",
            "adapter/adapter_model.safetensors",
            "adapter/adapter_config.json",
            "cloud_view",
        },
    )
    assert any(n.startswith("cloud_view/") for n in _modes(str(out)))  # recorded requests exist, and are private
    _assert_private(str(cache), {"client"})
    assert any(n.endswith("client_stages.safetensors") for n in _modes(str(cache)))


def test_library_run_is_private_under_a_wide_umask(tiny_models, sample_data, tmp_path):
    old = os.umask(0o022)
    try:
        out = str(tmp_path / "run")
        tune(
            TuneConfig(
                data=sample_data,
                out=out,
                mode="local",
                model=tiny_models["gpt2"],
                steps=2,
                batch_size=2,
                seq_len=32,
                checkpoint_every=1,
                lora=LoraConfig(rank=2),
                progress=False,
                audit="no",
            )
        )
    finally:
        os.umask(old)
    _assert_private(out, {"checkpoint.pt", "report.json", "adapter", "adapter/adapter_model.safetensors"})
