"""Shared fixtures: tiny models of each architecture, sample data, and real `cloud serve` processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))

from tiny import make_model

ARCHS = ("llama", "qwen2", "gpt2")
BIN = os.path.dirname(sys.executable)


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
    return {a: make_model(a, str(root / a)) for a in ARCHS}


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    from tandem.client.sample import write_sample

    return write_sample(str(tmp_path_factory.mktemp("data")), n=120, seed=0)


class Server:
    """A real `cloud serve` subprocess on a free loopback port."""

    def __init__(self, proc, addr, tls_dir, log_path):
        self.proc, self.addr, self.tls_dir, self.log_path = proc, addr, tls_dir, log_path

    @property
    def ca(self):
        return os.path.join(self.tls_dir, "ca.pem") if self.tls_dir else None

    @property
    def identity(self):
        """The 'local' identity bundle `cloud serve` issues on first use (mutual TLS)."""
        return os.path.join(self.tls_dir, "clients", "local.pem") if self.tls_dir else None

    def tcfg(self, **kw):
        """A TransportConfig that reaches this server with its CA and the 'local' identity."""
        from tandem.client.transport import TransportConfig

        kw.setdefault("ca", self.ca)
        kw.setdefault("identity", self.identity)
        return TransportConfig(server=self.addr, **kw)

    def cli_args(self):
        """`client` flags that reach this server."""
        return ["--server", self.addr, "--ca", self.ca, "--identity", self.identity]

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(
    model_dir, tmp_path, *extra, insecure=False, timeout=120, tls_dir=None, listen="127.0.0.1:0", prefix=()
) -> Server:
    """Starts `cloud serve` (through `prefix`, e.g. `ip netns exec NS`) and waits for its ready line."""
    tls_dir = None if insecure else (tls_dir or str(tmp_path / "tls"))
    log_path = str(tmp_path / f"server-{time.monotonic_ns()}.log")
    cmd = [*prefix, os.path.join(BIN, "cloud"), "serve", "--listen", listen, "--threads", "1"]
    if model_dir:
        cmd += ["--model", model_dir]
    cmd += ["--insecure"] if insecure else ["--tls-dir", tls_dir]
    cmd += list(extra)
    logf = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logf, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"cloud serve exited: {open(log_path).read()}")
            continue
        m = re.search(r"on (127\.0\.0\.1:\d+)", line)
        if m:
            return Server(proc, m.group(1), tls_dir, log_path)
    proc.kill()
    raise RuntimeError("cloud serve did not start in time")


def terminate(pids_now) -> None:
    """Ends the processes `pids_now()` lists (called again to see which are left): TERM, then KILL after 10 s."""
    for sig, wait in ((15, 10.0), (9, 5.0)):
        pids = pids_now()
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and pids_now():
            time.sleep(0.2)


@pytest.fixture
def server_factory(tmp_path):
    started = []

    def make(model_dir, *extra, **kw):
        s = start_server(model_dir, tmp_path, *extra, **kw)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


def split_losses(
    tcfg, data_dir: str, seed: int, steps: int, seq_len: int = 24, batch: int = 2, hook=None
) -> list[float]:
    """A short split run (LoRA r=4 on every slot, remote LoRA on the middle): the per-step training losses.

    Survives a lost session the way `client tune` does (reopen and redo the step); `hook(step)` runs
    before each step (tests kill replicas there).
    """
    import torch

    from tandem.client.data import load_split
    from tandem.client.staged import connect_split
    from tandem.client.trainer import surviving_restarts
    from tandem.client.transport import Transport
    from tandem.stages.lora import LoraConfig

    t = Transport(tcfg)
    sm = connect_split(t, LoraConfig(rank=4, alpha=8), seed=seed)
    data = load_split(data_dir, sm.tokenizer, seq_len, batch, seed, 0.1)
    opt = torch.optim.AdamW(sm.adapter.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        if hook:
            hook(step)

        def one():
            opt.zero_grad()
            loss, _ = sm.loss(data.batch_at(step), step, seed, train=True)  # noqa: B023
            loss.backward()
            return loss

        losses.append(float(surviving_restarts(sm, one).detach()))
        opt.step()
    sm.close()
    t.close()
    return losses


def free_port() -> int:
    """A TCP port on loopback that is free now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(port: int, name: str) -> float:
    """One value from a server's Prometheus metrics (`--metrics-port`); 0 when absent."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
