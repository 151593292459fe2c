"""The cloud on a two-node Ray cluster whose nodes live in separate network namespaces (issue #6).

The closest thing to several machines on one box: the test creates two network namespaces joined by
a veth pair with addresses it assigns (10.213.X.1/24 and 10.213.X.2/24, X from the pid), caps the
worker side with `tc ... tbf`, starts a Ray head inside namespace A and a Ray worker node inside
namespace B, and serves the middle blocks with `cloud serve --ray --pipeline 2`, pinning shard 0 to
node A and shard 1 to node B with `--ray-shard-resources`. Every activation and gradient that goes
to or from shard 1 therefore crosses a real (virtual) network interface, not loopback.

Where each process runs, and why:
- `cloud serve` runs inside namespace A: it is a Ray driver and must reach the head's GCS at
  10.213.X.1, and the worker node must reach it back (Ray object ownership). It listens for gRPC on
  127.0.0.1 of namespace A, an address its TLS certificate covers.
- The training client therefore also runs inside namespace A (a subprocess under `ip netns exec`),
  talking to the server over namespace A's loopback, so client<->server traffic never touches the
  veth and the veth counters measure Ray traffic between the nodes only.
- The reference run (same seed, data and steps against a plain `cloud serve`) runs in the test's own
  namespace; the losses must agree to rel=1e-5.

Teardown kills every process in the two namespaces (only this test's processes live there: no
`ray stop`, which would stop every Ray cluster on the machine) and deletes the namespaces, which
also removes the veth pair.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import pytest
import torch

from tandem.testing.servers import BIN, Server, start_server, terminate
from tandem.testing.split_runs import split_losses

SEED, STEPS, SEQ_LEN, BATCH = 3, 4, 128, 4  # activations of 4 x 128 x 32 float32 = 64 KiB per hop
HIDDEN = 32  # tandem.testing.models' default hidden size
GCS_PORT = 6379  # inside namespace A: no clash with anything outside it
_count = itertools.count()


def _run(*cmd, check=True, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, timeout=timeout, **kw)


def _in(ns: str, *cmd) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


@dataclass
class NetnsPair:
    a: str  # namespace of the Ray head (and of the server and client)
    b: str  # namespace of the Ray worker node
    veth_a: str
    veth_b: str
    addr_a: str
    addr_b: str
    shaped: bool  # whether veth_b's egress is capped by tbf

    def counters(self) -> dict[str, int]:
        """tx/rx bytes of both veth ends, read inside their namespaces."""
        out = {}
        for ns, dev in ((self.a, self.veth_a), (self.b, self.veth_b)):
            for k in ("tx_bytes", "rx_bytes"):
                out[f"{dev}.{k}"] = int(_run(*_in(ns, "cat", f"/sys/class/net/{dev}/statistics/{k}")).stdout)
        return out

    def tbf_sent(self) -> int:
        """Bytes the tbf qdisc on veth_b has sent (egress of node B)."""
        s = _run("tc", "-n", self.b, "-s", "qdisc", "show", "dev", self.veth_b).stdout
        return int(re.search(r"Sent (\d+) bytes", s).group(1))


def _kill_namespace_processes(ns: str) -> None:
    """Ends every process in `ns` (all started by this test), TERM first, then KILL."""
    terminate(lambda: [int(p) for p in _run("ip", "netns", "pids", ns, check=False).stdout.split()])


@pytest.fixture
def netns_pair():
    """Two fresh network namespaces joined by a veth pair; the worker side capped at 200 Mbit/s."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if not shutil.which("ip"):
        pytest.skip("iproute2 `ip` is not installed")
    pid, n = os.getpid(), next(_count)
    a, b = f"tdm-{pid}-{n}a", f"tdm-{pid}-{n}b"
    veth_a, veth_b = f"tv{pid}{n}a", f"tv{pid}{n}b"  # <= 15 characters
    x = pid % 250 + 1  # the subnet only has to be unique inside these namespaces; vary it anyway
    addr_a, addr_b = f"10.213.{x}.1", f"10.213.{x}.2"
    made = []
    try:
        for ns in (a, b):
            r = _run("ip", "netns", "add", ns, check=False)
            if r.returncode:
                pytest.skip(f"`ip netns add` failed: {r.stderr.strip()}")
            made.append(ns)
        _run("ip", "link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        _run("ip", "link", "set", veth_a, "netns", a)
        _run("ip", "link", "set", veth_b, "netns", b)
        for ns, dev, addr in ((a, veth_a, addr_a), (b, veth_b, addr_b)):
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "link", "set", dev, "up")
        shaped = (
            shutil.which("tc") is not None
            and _run(
                "tc",
                "-n",
                b,
                "qdisc",
                "add",
                "dev",
                veth_b,
                "root",
                "tbf",
                "rate",
                "200mbit",
                "burst",
                "256kb",
                "latency",
                "50ms",
                check=False,
            ).returncode
            == 0
        )
        yield NetnsPair(a, b, veth_a, veth_b, addr_a, addr_b, shaped)
    finally:
        for ns in made:
            _kill_namespace_processes(ns)
        for ns in made:
            _run("ip", "netns", "del", ns, check=False)  # takes the veth pair with it
        _run("ip", "link", "del", veth_a, check=False)  # in case it never left the root namespace


_NODES_PY = """
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + 60
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) >= 2 or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps([{"ip": n["NodeManagerAddress"], "resources": n["Resources"]} for n in nodes]))
"""


@pytest.fixture
def ray_two_nodes(netns_pair):
    """A Ray head in namespace A and a worker node in namespace B; yields (pair, GCS address)."""
    p = netns_pair
    ray_bin = os.path.join(BIN, "ray")
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus=1", "--object-store-memory=100000000", f"--temp-dir={temp}", "--disable-usage-stats"]
    gcs = f"{p.addr_a}:{GCS_PORT}"
    try:
        _run(
            *_in(
                p.a,
                ray_bin,
                "start",
                "--head",
                f"--port={GCS_PORT}",
                f"--node-ip-address={p.addr_a}",
                "--include-dashboard=false",
                '--resources={"tandem_node_a": 1}',
                *common,
            ),
            env=env,
        )
        _run(
            *_in(
                p.b,
                ray_bin,
                "start",
                f"--address={gcs}",
                f"--node-ip-address={p.addr_b}",
                '--resources={"tandem_node_b": 1}',
                *common,
            ),
            env=env,
        )
        nodes = json.loads(
            _run(*_in(p.a, sys.executable, "-c", _NODES_PY, gcs), env=env).stdout.strip().splitlines()[-1]
        )
        assert sorted(n["ip"] for n in nodes) == sorted([p.addr_a, p.addr_b]), nodes
        yield p, gcs
    finally:
        # The namespaces' teardown ends the Ray processes; the temp dir is ours alone.
        for ns in (p.a, p.b):
            _kill_namespace_processes(ns)
        shutil.rmtree(temp, ignore_errors=True)


def _start_server_in(ns: str, model_dir: str, tmp_path, *extra, timeout=240) -> Server:
    """start_server, but inside network namespace `ns` (listening on its loopback)."""
    return start_server(model_dir, tmp_path, *extra, timeout=timeout, prefix=_in(ns))


def _train(transport_cfg, data_dir: str, seed: int, steps: int, seq_len: int, batch: int) -> list[float]:
    """A short split run (remote LoRA on the middle), one torch thread: the per-step training losses."""
    torch.set_num_threads(1)
    return split_losses(transport_cfg, data_dir, seed, steps, seq_len, batch)


def _shard_processes(ns: str) -> list[int]:
    """Pids of Ray actor processes of MiddleShard living in namespace `ns`."""
    out = []
    for pid in _run("ip", "netns", "pids", ns).stdout.split():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::MiddleShard"):
                    out.append(int(pid))
        except OSError:
            pass
    return out


_ACTORS_PY = """
import json, sys, ray
ray.init(address=sys.argv[1], namespace="tandem", log_to_driver=False)
nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
out = {}
for a in ray._private.state.actors().values():
    if a.get("Name", "").startswith("tandem-") and a.get("State") == "ALIVE":
        out[a["Name"]] = nodes.get(a["Address"]["NodeID"], a["Address"].get("IPAddress"))
print(json.dumps(out))
"""


@pytest.mark.timeout(600)
def test_pipeline_shards_on_two_netns_nodes(tiny_models, sample_data, server_factory, ray_two_nodes, tmp_path):
    pair, gcs = ray_two_nodes
    model = tiny_models["llama"]

    plain = server_factory(model)
    ref = _train(plain.transport_cfg(), sample_data, SEED, STEPS, SEQ_LEN, BATCH)
    plain.stop()

    server = _start_server_in(
        pair.a,
        model,
        tmp_path,
        "--ray",
        gcs,
        "--pipeline",
        "2",
        "--ray-shard-resources",
        '[{"tandem_node_a": 1}, {"tandem_node_b": 1}]',
    )
    try:
        # (c) the two shards run on different nodes: by Ray's actor table, and by the OS (one MiddleShard
        # process in each namespace, whose only non-loopback address is its node's IP).
        where = json.loads(_run(*_in(pair.a, sys.executable, "-c", _ACTORS_PY, gcs)).stdout.strip().splitlines()[-1])
        assert where == {"tandem-replica0-shard0": pair.addr_a, "tandem-replica0-shard1": pair.addr_b}, where
        assert len(_shard_processes(pair.a)) == 1 and len(_shard_processes(pair.b)) == 1

        before = pair.counters()
        sent_before = pair.tbf_sent() if pair.shaped else 0
        t0 = time.monotonic()
        r = _run(
            *_in(
                pair.a,
                sys.executable,
                "-m",
                "tandem.testing.split_runs",
                server.addr,
                server.ca,
                server.identity,
                sample_data,
                str(SEED),
                str(STEPS),
                str(SEQ_LEN),
                str(BATCH),
            ),
            timeout=300,
            check=False,
        )
        assert r.returncode == 0, f"client failed:\n{r.stderr[-4000:]}\nserver log:\n{server.log()[-4000:]}"
        train_s = time.monotonic() - t0
        after = pair.counters()
        losses = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        server.stop()

    # (a) the same losses as the plain single-process server.
    assert losses == pytest.approx(ref, rel=1e-5)

    # (b) the activations really crossed the veth. Shard 1 lives on node B and the front door (the Ray
    # driver) on node A, which calls the shards in turn and gets each result back: per training step
    # A->B carries at least shard 1's forward input h and its backward input grad_out, and B->A its
    # forward output and its grad_input, each a float32 (batch, seq_len, hidden) tensor (the default
    # wire codec is float32 and the server computes in float32). Remote-LoRA weights, their gradients,
    # the mask, pickling and Ray's own control traffic only add to that, so this is a lower bound.
    bound = STEPS * 2 * BATCH * SEQ_LEN * HIDDEN * 4
    grew = {k: after[k] - before[k] for k in after}
    print(f"\nveth growth over {train_s:.1f} s of training: {grew}; lower bound per direction {bound}")
    assert grew[f"{pair.veth_a}.tx_bytes"] >= bound and grew[f"{pair.veth_b}.rx_bytes"] >= bound, grew
    assert grew[f"{pair.veth_b}.tx_bytes"] >= bound and grew[f"{pair.veth_a}.rx_bytes"] >= bound, grew
    if pair.shaped:  # node B's egress went through the tbf qdisc that caps it
        assert pair.tbf_sent() - sent_before >= bound
