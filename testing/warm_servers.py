"""`cloud serve` processes forked from one warm interpreter, for tests that kill and restart the cloud many times.

Each server is its own process running `cloud serve` (tandem.cloud.cli.main), killed with SIGKILL like any other;
forking it from an interpreter that already imported torch, transformers and grpc makes a restart cost the model
load (well under a second for a tiny model) instead of the imports (about 4 s, 10 s on a loaded 2-core machine).
The parent never creates a gRPC channel, server or torch thread pool, so forking it is safe.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

_ZYGOTE = r"""
import json, os, signal, sys
import grpc, torch, transformers  # noqa: F401  (the imports every server would repeat)
import importlib, pkgutil
import tandem.cloud, tandem.stages
import tandem.cloud.cli as cli
for package in (tandem.cloud, tandem.stages):  # every module `cloud serve` may load (ray itself loads lazily)
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)

signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps killed servers
for line in sys.stdin:
    log_path, argv = json.loads(line)
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os._exit(cli.main(argv) or 0)
    print(pid, flush=True)
"""


class WarmServers:
    """Starts `cloud serve` processes on demand; `start(...)` returns (pid, addr) once the server is ready."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.pids: list[int] = []

    def start(self, argv: list[str], timeout: float = 60.0) -> tuple[int, str]:
        log_path = str(self.tmp / f"warm-server-{time.monotonic_ns()}.log")
        self.proc.stdin.write(json.dumps([log_path, ["serve", *argv]]) + "\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline())
        self.pids.append(pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = ""
            if os.path.exists(log_path):
                with open(log_path) as f:
                    text = f.read()
            m = re.search(r"on (127\.0\.0\.1:\d+)", text)
            if m:
                return pid, m.group(1)
            if not alive(pid):
                raise RuntimeError(f"cloud serve exited: {text}")
            time.sleep(0.02)
        raise RuntimeError("cloud serve did not start in time")

    def kill(self, pid: int) -> None:
        """SIGKILL (a crash: no drain) and wait until the process is gone."""
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        while alive(pid):
            time.sleep(0.01)

    def close(self) -> None:
        for pid in self.pids:
            self.kill(pid)
        self.proc.stdin.close()
        self.proc.wait(10)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
