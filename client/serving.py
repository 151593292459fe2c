"""Text generation with a registered adapter on the cloud (`client generate`)."""

from __future__ import annotations

import math

from tandem.protos import serving_pb2 as serving_pb
from tandem.protos import serving_pb2_grpc as serving_pb_grpc

from .errors import ClientError
from .transport import Transport, TransportConfig


def generate(
    transport_cfg: TransportConfig,
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
    req = serving_pb.GenerateRequest(
        adapter=adapter, prompts=prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
    )
    transport = Transport(transport_cfg, stub=serving_pb_grpc.AdapterServingStub)
    try:
        resp = transport.call("Generate", req, kind="Generate", one_time=True, retry=True)
    finally:
        transport.close()
    totals = transport.meter.totals()["one_time"]["Generate"]
    return {
        "adapter": resp.adapter,
        "batch_sequences": resp.batch_sequences,
        "completions": [
            {
                "text": completion.text,
                "token_ids": list(completion.token_ids),
                "prompt_tokens": completion.prompt_tokens,
                "finish_reason": completion.finish_reason,
            }
            for completion in resp.completions
        ],
        "bytes_sent": totals["sent"],
        "bytes_received": totals["received"],
    }
