"""Careless input: every bad flag is a one-line error naming it, before any network call or download."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from tandem.client.cli import main
from tandem.testing.cli_errors import one_line_error
from tandem.testing.servers import BIN


@pytest.fixture
def sentinel():
    """A TCP listener standing in for the server: the test asserts that nobody connected to it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    s.setblocking(False)
    yield f"127.0.0.1:{s.getsockname()[1]}"
    try:
        conn, _ = s.accept()
        conn.close()
        connected = True
    except BlockingIOError:
        connected = False
    s.close()
    assert not connected, "the client called the server although its input was bad"


@pytest.fixture
def a_file(tmp_path):
    """A regular file: a path under it can never be created (tests run as root, so chmod cannot make one)."""
    p = tmp_path / "a_file"
    p.write_text("x")
    return str(p)


def _run(argv, capsys) -> str:
    return one_line_error(main, argv, capsys)


def _tune_cases(data, out, a_file):
    return {
        "--server": ["--server", "localhost"],
        "--server ": ["--server", "host:99999"],
        "--lr": ["--lr", "-1"],
        "--lr  ": ["--lr", "nan"],
        "--lora-rank": ["--lora-rank", "0"],
        "--lora-alpha": ["--lora-alpha", "0"],
        "--lora-dropout": ["--lora-dropout", "1"],
        "--val-fraction": ["--val-fraction", "1.5"],
        "--checkpoint-every": ["--checkpoint-every", "0"],
        "--batch-size": ["--batch-size", "0"],
        "--seq-len": ["--seq-len", "1"],
        "--steps": ["--steps", "-3"],
        "--epochs": ["--epochs", "0"],
        "--timeout": ["--timeout", "0"],
        "--retries": ["--retries", "-1"],
        "--threads": ["--threads", "-2"],
        "--seed": ["--seed", "x"],
        "--client-blocks": ["--client-blocks", "2"],
        "--noise-multiplier": ["--noise-multiplier", "-0.5"],
        "--audit-tokens": ["--audit-tokens", "0"],
        "--data": ["--data", os.path.join(out, "missing")],
        "--out": ["--out", os.path.join(a_file, "sub")],
        "--emulator": ["--mode", "offsite"],
        "--cloud-optimizer": ["--cloud-optimizer", "--no-middle-lora"],
        "--overwrite": ["--resume", "--overwrite"],
    }


def test_tune_flags_are_checked_before_the_network(sample_data, sentinel, a_file, tmp_path, capsys):
    out = str(tmp_path / "run")
    for flag, bad in _tune_cases(sample_data, out, a_file).items():
        argv = ["tune", "--server", sentinel, "--insecure", "--retries", "0", "--data", sample_data, "--out", out, *bad]
        line = _run(argv, capsys)
        assert line.startswith("client tune: ") and flag.strip() in line, (flag, line)


def test_data_dir_is_checked_before_the_session_opens(tmp_path, sentinel, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.pdf").write_bytes(b"%PDF")
    line = _run(
        ["tune", "--server", sentinel, "--insecure", "--data", str(empty), "--out", str(tmp_path / "o")], capsys
    )
    assert "--data" in line and "no .txt/.text/.md/.jsonl files" in line
    assert not (tmp_path / "o").exists()  # nothing created for a run that cannot start


def test_other_subcommands_check_their_flags(sample_data, sentinel, a_file, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    net = ["--server", sentinel, "--insecure", "--retries", "0"]
    ev = ["eval", "--adapter", str(adapter), "--data", sample_data, "--out", str(tmp_path / "ev"), *net]
    cases = {
        "--server": ["push", "--adapter", str(adapter), "--server", "localhost"],
        "--adapter": ["push", "--adapter", str(tmp_path / "nothing"), *net],
        "--val-fraction": [*ev, "--val-fraction", "1.5"],
        "--seq-len": [*ev, "--seq-len", "1"],
        "--batch-size": [*ev, "--batch-size", "0"],
        "--data": ["eval", "--adapter", str(adapter), "--data", str(tmp_path / "nodata"), *net],
        "--out": [*ev[: -len(net) - 2], "--out", os.path.join(a_file, "sub"), *net],
        "--timeout": ["generate", "--prompt", "hi", *net, "--timeout", "-1"],
        "--temperature": ["generate", "--prompt", "hi", *net, "--temperature", "-1"],
        "--max-new-tokens": ["generate", "--prompt", "hi", *net, "--max-new-tokens", "-1"],
        "--out ": ["fetch-emulator", "--out", os.path.join(a_file, "pkg"), *net],
        "--ca": ["fetch-emulator", "--out", str(tmp_path / "pkg"), *net, "--ca", a_file],  # checks nothing
        "--tokens": ["audit", str(tmp_path), "--tokens", "0"],
        "--n": ["sample-data", "--n", "0"],
        "--log-level": ["--log-level", "loud", "sample-data"],
        "--out  ": ["sample-data", "--out", os.path.join(a_file, "sub")],
    }
    for flag, argv in cases.items():
        line = _run(argv, capsys)
        assert line.startswith("client") and flag.strip() in line, (flag, line)


def _one_line_exit(cmd, timeout=120):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_real_cli_one_line_errors(sample_data, sentinel, a_file):
    """The installed `client` (a subprocess, as people run it): the issue's cases."""
    base = [os.path.join(BIN, "client"), "tune", "--data", sample_data, "--insecure", "--retries", "0"]
    line = _one_line_exit(base + ["--server", "localhost"])
    assert "--server" in line and "HOST:PORT" in line
    line = _one_line_exit(base + ["--server", sentinel, "--checkpoint-every", "0"])
    assert "--checkpoint-every" in line and ">= 1" in line
    line = _one_line_exit(base + ["--server", sentinel, "--out", os.path.join(a_file, "sub")])
    assert "--out" in line and "cannot write" in line


def test_cloud_serve_on_a_port_in_use_is_one_line(tiny_models):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _one_line_exit(
            [
                os.path.join(BIN, "cloud"),
                "serve",
                "--model",
                tiny_models["gpt2"],
                "--insecure",
                "--listen",
                f"127.0.0.1:{port}",
            ]
        )
    assert "--listen" in line and "in use" in line


def test_seq_len_over_the_models_positions_is_one_line(tiny_models, sample_data, tmp_path):
    """--seq-len passes its own check (>= 2) but the model has 256 positions: one line, not an IndexError."""
    cmd = [
        os.path.join(BIN, "client"),
        "tune",
        "--mode",
        "local",
        "--model",
        tiny_models["gpt2"],
        "--data",
        sample_data,
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--seq-len",
        "300",
        "--no-progress",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "--seq-len 300" in last and "256 positions" in last, last


@pytest.mark.parametrize("flag, value", [("--quota-sessions", "-2"), ("--max-downloads", "-1")])
def test_cloud_serve_refuses_negative_limits(tiny_models, flag, value):
    """A negative session quota would refuse every session, and a negative download limit was silently raised to 1."""
    r = subprocess.run(
        [
            os.path.join(BIN, "cloud"),
            "serve",
            "--model",
            tiny_models["gpt2"],
            "--insecure",
            "--listen",
            "127.0.0.1:0",
            flag,
            value,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert last.startswith("cloud serve: ") and flag in last and value in last, last
