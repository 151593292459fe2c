"""Text generation with a registered adapter on the cloud (`client generate`)."""

from __future__ import annotations

import math

from tandem.protos import serving_pb2 as spb
from tandem.protos import serving_pb2_grpc as spb_grpc

from .errors import ClientError
from .transport import Meter, Transport, TransportConfig


class ServingTransport(Transport):
    """The client's transport (TLS, identity, retries, accounting) with the AdapterServing stub."""

    def __init__(self, cfg: TransportConfig, meter: Meter | None = None):
        super().__init__(cfg, meter)
        self.stub = spb_grpc.AdapterServingStub(self.channel)


def generate(
    tcfg: TransportConfig,
    prompts: list[str],
    adapter: str = "",
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict:
    """Asks the cloud to continue each prompt with adapter `adapter` applied ('' for the base model).

    Returns:
        {"adapter", "completions": [{"text", "token_ids", "prompt_tokens", "finish_reason"}, ...],
        "batch_sequences", "bytes_sent", "bytes_received"}.

    Raises:
        ClientError: bad arguments; ServerError (a ClientError) when the server refuses, e.g. an unknown adapter.
    """
    if not prompts:
        raise ClientError("--prompt: give at least one prompt")
    if max_new_tokens < 0:
        raise ClientError(f"--max-new-tokens must be >= 0 (0: the server's default), got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ClientError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 <= seed < 2**64:
        raise ClientError(f"--seed must be in [0, 2**64), got {seed}")
    req = spb.GenerateRequest(
        adapter=adapter, prompts=prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
    )
    t = ServingTransport(tcfg)
    try:
        resp = t.call("Generate", req, kind="Generate", one_time=True, retry=True)
    finally:
        t.close()
    tot = t.meter.totals()["one_time"]["Generate"]
    return {
        "adapter": resp.adapter,
        "batch_sequences": resp.batch_sequences,
        "completions": [
            {
                "text": c.text,
                "token_ids": list(c.token_ids),
                "prompt_tokens": c.prompt_tokens,
                "finish_reason": c.finish_reason,
            }
            for c in resp.completions
        ],
        "bytes_sent": tot["sent"],
        "bytes_received": tot["received"],
    }
