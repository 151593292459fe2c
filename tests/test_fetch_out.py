"""`client fetch-emulator --out` never replaces a directory of the user's files; `client eval` reads its adapter's
config field by field: every refusal is one line, before the network, and loses nothing."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket

import pytest

from tandem.client.cli import main
from tandem.client.downloads import CACHE_MANIFEST
from tandem.client.errors import ClientError
from tandem.client.offsite import adapter_lora_config, fetch_emulator
from tandem.emulator.build import build_emulator
from tandem.emulator.distill import DistillConfig
from tandem.emulator.package import MANIFEST, load_package
from tandem.testing.cli_errors import one_line_error
from tandem.testing.servers import start_server

ADVICE = "choose another --out or remove it"


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    """A real `cloud serve` with an emulator package, built as test_hostile_server.py's `cloud` builds it."""
    tmp = tmp_path_factory.mktemp("fetch-out")
    pkg = str(tmp / "pkg")
    build_emulator(tiny_models["llama"], "2:2", pkg, None, DistillConfig(steps=0), keep=1)
    server = start_server(tiny_models["llama"], tmp, "--emulator", pkg)
    yield server, pkg
    server.stop()


@pytest.fixture
def sentinel():
    """A TCP listener standing in for the server: the test asserts that nobody connected to it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    yield ["--server", f"127.0.0.1:{listener.getsockname()[1]}", "--insecure", "--retries", "0"]
    try:
        listener.accept()[0].close()
        connected = True
    except BlockingIOError:
        connected = False
    listener.close()
    assert not connected, "the client called the server although it had refused its input"


def snapshot(root) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes), and every directory (path -> None)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), root)] = None
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                out[os.path.relpath(os.path.join(d, name), root)] = f.read()
    return out


def finished_run(path) -> str:
    """What `client tune` leaves in its --out (rundir.ARTIFACTS), and a file of the user's beside it."""
    os.makedirs(os.path.join(path, "adapter"))
    files = {
        "report.json": b'{"steps": []}',
        "report.png": b"\x89PNG",
        "privacy_context.json": b"{}",
        "adapter/adapter_config.json": b'{"r": 8}',
        "adapter/adapter_model.safetensors": b"weights",
        "notes.txt": b"mine",
    }
    for name, data in files.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    return str(path)


def package_plus(pkg, path, name, folder=False) -> str:
    """A copy of a built package with one more file (or folder holding a file) of the user's in it."""
    shutil.copytree(pkg, path)
    if folder:
        os.mkdir(os.path.join(path, name))
        name = os.path.join(name, "state.pt")
    with open(os.path.join(path, name), "wb") as f:
        f.write(b"mine")
    return str(path)


def test_fetch_emulator_refuses_a_directory_of_user_files(served, tmp_path, sentinel, capsys):
    _, pkg = served
    web = tmp_path / "web"  # a manifest.json that is not a package's
    web.mkdir()
    (web / MANIFEST).write_text('{"name": "app"}')
    (web / "config.json").write_text("{}")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    cases = {
        "finished run": (finished_run(tmp_path / "run"), "holds files that are not the emulator package's"),
        "package + notes": (package_plus(pkg, tmp_path / "pkg+", "notes.txt"), r"\(notes.txt\)"),
        "package + folder": (package_plus(pkg, tmp_path / "pkg+d", "ckpt", folder=True), r"\(ckpt\)"),
        "web manifest": (str(web), f"no {CACHE_MANIFEST}, no manifest"),
        "a file": (str(a_file), "exists and is not a directory"),
    }
    before = snapshot(tmp_path)
    for case, (out, error) in cases.items():
        line = one_line_error(main, ["fetch-emulator", "--out", out, *sentinel], capsys)
        assert line.startswith(f"client fetch-emulator: --out {out} "), (case, line)
        assert ADVICE in line, (case, line)
        assert re.search(error, line), (case, line)
    assert snapshot(tmp_path) == before, "a refused --out lost or changed a file"


def test_fetch_emulator_refuses_the_current_directory_and_a_mount_point(tmp_path, sentinel, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)  # even empty: `--out .` printed a raw OSError (EBUSY) traceback
    for out in (".", str(empty), str(tmp_path), "/"):
        line = one_line_error(main, ["fetch-emulator", "--out", out, *sentinel], capsys)
        assert f"--out {out} is a mount point or holds the current directory" in line, line
    assert snapshot(tmp_path) == {"empty": None}


def test_the_download_itself_keeps_a_directory_of_user_files(served, tmp_path):
    """fetch_emulator (the API, no CLI check first) downloads, then refuses to move the user's directory aside."""
    server, _ = served
    run = finished_run(tmp_path / "run")
    before = snapshot(tmp_path)
    with pytest.raises(ClientError, match="holds files that are not the emulator package's") as e:
        fetch_emulator(server.transport_cfg(), run)
    assert "\n" not in str(e.value)
    assert snapshot(tmp_path) == before, "nothing lost, and no staging or set-aside directory left"


def test_a_refetch_replaces_an_earlier_package_and_fills_an_empty_dir(served, tmp_path, capsys):
    server, pkg = served
    want = load_package(pkg).manifest
    fetched, empty, built = str(tmp_path / "fetched"), str(tmp_path / "empty"), str(tmp_path / "built")
    os.mkdir(empty)
    shutil.copytree(pkg, built)  # a package as `cloud build-emulator` writes it: manifest.json, no download mark
    for out in (fetched, fetched, empty, built):
        if os.path.exists(os.path.join(out, "config.json")):  # stale: the re-fetch must replace it
            with open(os.path.join(out, "config.json"), "w") as f:
                f.write("{}")
        assert main(["fetch-emulator", "--out", out, *server.cli_args()]) == 0, capsys.readouterr().err
        summary = json.loads(capsys.readouterr().out)
        assert summary["package"] == out and summary["files"] == len(want["files"]) + 1
        assert load_package(out).manifest == want  # every file verified against the manifest's SHA-256
        assert os.path.isfile(os.path.join(out, CACHE_MANIFEST))
    assert sorted(os.listdir(tmp_path)) == ["built", "empty", "fetched"], "no staging or set-aside directory left"


ADAPTER_CONFIGS = [
    ("missing r", b'{"lora_alpha": 16}', "'r' must be an integer in 1..4096"),
    ("r a string", b'{"r": "x", "lora_alpha": 16}', "'r' must be .*, not 'x'"),
    ("r a bool", b'{"r": true}', "'r' must be"),
    ("r zero", b'{"r": 0}', "'r' must be"),
    ("r huge", b'{"r": 1000000000000}', "'r' must be"),
    ("a list", b"[1, 2]", "holds a JSON list, not an object"),
    ("alpha a string", b'{"r": 8, "lora_alpha": "x"}', "'lora_alpha' must be a number"),
    ("alpha infinite", b'{"r": 8, "lora_alpha": 1e400}', "'lora_alpha' must be a number"),
    ("alpha NaN", b'{"r": 8, "lora_alpha": NaN}', "'lora_alpha' must be a number"),
    ("targets a string", b'{"r": 8, "target_modules": "q_proj"}', "'target_modules' must be a list of names"),
    ("targets numbers", b'{"r": 8, "target_modules": [1]}', "'target_modules' must be a list of names"),
    ("not JSON", b"{r: 8", "cannot read"),
    ("not UTF-8", b"\xff\xfe{", "cannot read"),
    ("deep", b"[" * 100000, "cannot read"),
]


@pytest.mark.parametrize("case,raw,error", ADAPTER_CONFIGS, ids=[c[0] for c in ADAPTER_CONFIGS])
def test_a_malformed_adapter_config_is_one_line_naming_file_and_field(tmp_path, case, raw, error):
    (tmp_path / "adapter_config.json").write_bytes(raw)
    with pytest.raises(ClientError, match=error) as e:
        adapter_lora_config(str(tmp_path))
    assert "\n" not in str(e.value) and str(tmp_path / "adapter_config.json") in str(e.value)


def test_client_eval_refuses_a_malformed_adapter_config_before_the_network(sample_data, tmp_path, sentinel, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for raw, field in ((b'{"lora_alpha": 16}', "'r'"), (b'{"r": "x"}', "'r'"), (b"[]", "JSON list")):
        (adapter / "adapter_config.json").write_bytes(raw)
        argv = ["eval", "--adapter", str(adapter), "--data", sample_data, "--out", str(tmp_path / "ev"), *sentinel]
        line = one_line_error(main, argv, capsys)
        assert line.startswith("client eval: --adapter: ") and field in line, line
        assert str(adapter / "adapter_config.json") in line, line


def test_a_well_formed_adapter_config_reads_as_before(tmp_path):
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [3, 1]})
    )
    lora = adapter_lora_config(str(tmp_path))
    assert (lora.rank, lora.alpha, lora.target_modules, lora.layers, lora.dropout) == (
        4,
        8.0,
        ("q_proj", "v_proj"),
        (1, 3),
        0.0,
    )
    (tmp_path / "adapter_config.json").write_text('{"r": 4}')  # peft may omit lora_alpha; the cloud reads it as r
    assert adapter_lora_config(str(tmp_path)).alpha == 4.0
