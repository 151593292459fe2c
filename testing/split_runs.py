"""Short real split-mode client runs against a server: the per-step losses of a few steps, or one connect-and-close.

`python -m tandem.testing.split_runs ADDR CA IDENTITY DATA SEED STEPS SEQ_LEN BATCH` prints the losses as JSON
with one torch thread (a client in another process or network namespace).
"""

from __future__ import annotations

import json
import sys

import torch

from tandem.client.assemble import connect_split
from tandem.client.checkpoint import surviving_restarts
from tandem.client.data import load_split
from tandem.client.transport import Transport, TransportConfig
from tandem.stages.lora import LoraConfig


def split_losses(
    transport_cfg: TransportConfig,
    data_dir: str,
    seed: int,
    steps: int,
    seq_len: int = 24,
    batch: int = 2,
    hook=None,
) -> list[float]:
    """A short split run (LoRA r=4 on every slot, remote LoRA on the middle): the per-step training losses.

    Survives a lost session the way `client tune` does (reopen and redo the step); `hook(step)` runs
    before each step (tests kill replicas there).
    """
    transport = Transport(transport_cfg)
    model = connect_split(transport, LoraConfig(rank=4, alpha=8), seed=seed)
    data = load_split(data_dir, model.tokenizer, seq_len, batch, seed, 0.1)
    losses = train_losses(model, data, steps, seed, hook)
    model.close()
    transport.close()
    return losses


def train_losses(model, data, steps: int, seed: int, hook=None) -> list[float]:
    """`steps` AdamW steps (lr 1e-2) of a staged model on `data`, surviving a lost session as `client tune` does;
    `hook(step)` runs before each step. Returns the per-step training losses."""
    optimizer = torch.optim.AdamW(model.adapter.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        if hook:
            hook(step)

        def one_step():
            optimizer.zero_grad()
            loss, _ = model.loss(data.batch_at(step), step, seed, train=True)  # noqa: B023
            loss.backward()
            return loss

        losses.append(float(surviving_restarts(model, one_step).detach()))
        optimizer.step()
    return losses


def connect_via(addr: str, server, **kw):
    """A split model built through `addr` (the server itself or a proxy in front of it), its session closed."""
    transport = Transport(TransportConfig(server=addr, ca=server.ca, identity=server.identity, retries=0, **kw))
    try:
        model = connect_split(transport, LoraConfig(rank=4, alpha=8), seed=0)
        model.close()
        return model
    finally:
        transport.close()


def main(argv: list[str]) -> None:
    addr, ca, identity, data_dir = argv[:4]
    seed, steps, seq_len, batch = map(int, argv[4:])
    torch.set_num_threads(1)
    transport_cfg = TransportConfig(server=addr, ca=ca, identity=identity)
    print(json.dumps(split_losses(transport_cfg, data_dir, seed, steps, seq_len, batch)))


if __name__ == "__main__":
    main(sys.argv[1:])
