"""Shared fixtures: tiny models of each architecture, sample data, and real `cloud serve` processes."""

from __future__ import annotations

import os
import pathlib

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tandem.testing.models import ARCHS, make_model  # noqa: E402
from tandem.testing.servers import start_server  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Client-stage downloads go to a per-test-run cache, never the user's."""
    root = str(tmp_path_factory.mktemp("cache"))
    real = os.environ.get("TANDEM_CACHE")
    # The converted default model is expensive to make: keep using the user's cache for it.
    os.environ["TANDEM_CACHE"] = root
    if real is None:
        home = os.path.join(os.path.expanduser("~"), ".cache", "tandem")
        if os.path.isdir(os.path.join(home, "models")):
            os.symlink(os.path.join(home, "models"), os.path.join(root, "models"))
    yield


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{arch: model dir} for tiny random Llama, Qwen2 and GPT-2 (6 blocks, hidden 32)."""
    root = tmp_path_factory.mktemp("models")
    return {arch: make_model(arch, str(root / arch)) for arch in ARCHS}


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    from tandem.client.sample import write_sample

    return write_sample(str(tmp_path_factory.mktemp("data")), n=120, seed=0)


@pytest.fixture
def server_factory(tmp_path):
    """`make(model_dir, *flags, **start_server options)` starts a `cloud serve`; all are stopped after the test."""
    started = []

    def make(model_dir, *extra, **kw):
        server = start_server(model_dir, tmp_path, *extra, **kw)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


class Planted:
    """What a planted or swapped checkpoint can hold: an object whose unpickling runs code (here: creates a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.fixture
def planted(tmp_path):
    """(an object whose unpickling creates a marker file, that file's path); the file does not exist yet."""
    marker = tmp_path / "planted-code-ran"
    return Planted(marker), marker
