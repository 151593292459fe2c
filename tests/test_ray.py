"""The cloud on a real local multi-process Ray cluster: replicas, pipeline shards, sticky sessions, a killed replica."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import pytest
import torch

from tandem.testing.servers import BIN, free_port, terminate
from tandem.testing.split_runs import split_losses


@pytest.fixture
def ray_cluster(tmp_path):
    """A Ray head on loopback (its own processes), started and stopped by the test."""
    import tempfile

    ray_bin = os.path.join(BIN, "ray")
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=4",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=120,
    )
    yield f"127.0.0.1:{port}"
    terminate(lambda: _cluster_pids(temp, port))  # not `ray stop`, which stops every Ray cluster on the machine
    shutil.rmtree(temp, ignore_errors=True)


def _cluster_pids(temp: str, port: int) -> list[int]:
    """Processes of the cluster with this temp dir and GCS port, and their descendants.

    Ray passes the temp dir (as the session dir) to most of them and the GCS address to the rest
    (the client server); the agents, renamed `ray::...`, are children of the raylet.
    """
    mine, parent = set(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                parent[int(entry)] = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile, or not ours to read
            continue
        if any(temp.encode() in a for a in args) or any(
            a.startswith(b"--address=") and a.endswith(b":%d" % port) for a in args
        ):
            mine.add(int(entry))
    grew = True
    while grew:
        kids = {p for p, pp in parent.items() if pp in mine} - mine
        mine |= kids
        grew = bool(kids)
    return sorted(mine)


def _train(server, data_dir, seed, steps, hook=None):
    return split_losses(server.transport_cfg(), data_dir, seed, steps, hook=hook)


def _tune(server, data_dir, out, cloud_optimizer):
    from tandem.client.trainer import TuneConfig, tune
    from tandem.stages.lora import LoraConfig

    return tune(
        TuneConfig(
            data=data_dir,
            out=str(out),
            steps=4,
            batch_size=2,
            seq_len=24,
            lr=1e-2,
            seed=3,
            lora=LoraConfig(rank=4, alpha=8),
            checkpoint_every=2,
            audit="no",
            progress=False,
            cloud_optimizer=cloud_optimizer,
        ),
        server.transport_cfg(),
    )


def test_ray_replicas_and_pipeline_match_plain_serve(tiny_models, sample_data, server_factory, ray_cluster, tmp_path):
    plain = server_factory(tiny_models["llama"])
    ref = {seed: _train(plain, sample_data, seed, 4) for seed in (1, 2)}
    ref_tune = _tune(plain, sample_data, tmp_path / "plain", cloud_optimizer=False)
    plain.stop()

    server = server_factory(
        tiny_models["llama"], "--ray", ray_cluster, "--replicas", "2", "--pipeline", "2", timeout=240
    )
    results = {}
    threads = [
        threading.Thread(target=lambda s=seed: results.__setitem__(s, _train(server, sample_data, s, 4)))
        for seed in (1, 2)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert results[1] == pytest.approx(ref[1], rel=1e-5)
    assert results[2] == pytest.approx(ref[2], rel=1e-5)

    # --cloud-optimizer across the pipeline: each shard updates its slice of the remote LoRA, the client
    # fetches and joins them at the checkpoints; the same run as the client's own optimizer on a plain server.
    cloud = _tune(server, sample_data, tmp_path / "ray", cloud_optimizer=True)
    assert [s["loss"] for s in cloud["steps"]] == pytest.approx([s["loss"] for s in ref_tune["steps"]], rel=1e-5)
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "plain" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "ray" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) for k in wa)

    # The Ray backend does not serve generation sessions (the middle runs in the shards): one clear refusal.
    from tandem.client.errors import ServerError
    from tandem.client.session import open_session
    from tandem.client.transport import Transport
    from tandem.stages.lora import LoraConfig

    transport = Transport(server.transport_cfg())
    with pytest.raises(ServerError, match=r"\(Ray\) does not serve generation sessions"):
        open_session(transport, LoraConfig(rank=4, alpha=8), remote_lora=False, generation=True)
    transport.close()

    # Kill a replica's actor mid-run: Ray restarts it, the client reopens and finishes with identical losses.
    import ray

    ray.init(address=ray_cluster, namespace="tandem", log_to_driver=False)
    try:

        def kill_at_2(step):
            if step == 2:
                for r in (0, 1):
                    ray.kill(ray.get_actor(f"tandem-replica{r}-shard1"), no_restart=False)
                time.sleep(0.5)

        assert _train(server, sample_data, 1, 4, hook=kill_at_2) == pytest.approx(ref[1], rel=1e-5)
    finally:
        ray.shutdown()
    assert server.proc.poll() is None
