"""Real `cloud serve` processes on loopback with TLS, and the probes tests use on them (free port, metric, kill)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

BIN = os.path.dirname(sys.executable)


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

    def transport_cfg(self, **kw):
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
        match = re.search(r"on (127\.0\.0\.1:\d+)", line)
        if match:
            return Server(proc, match.group(1), tls_dir, log_path)
    proc.kill()
    raise RuntimeError("cloud serve did not start in time")


def terminate(pids_now) -> None:
    """Ends the processes `pids_now()` lists (called again to see which are left): TERM, then KILL after 10 s."""
    for sig, wait in ((15, 10.0), (9, 5.0)):
        pids = pids_now()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and pids_now():
            time.sleep(0.2)


def free_port() -> int:
    """A TCP port on loopback that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metric(port: int, name: str) -> float:
    """One value from a server's Prometheus metrics (`--metrics-port`); 0 when absent."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
