"""gRPC servicer of adapter serving: Generate, decoded and handed to a ServingService."""

from __future__ import annotations

import grpc

from tandem.protos import serving_pb2 as pb
from tandem.protos import serving_pb2_grpc as pb_grpc

from .identity import Identities
from .serving import ServingService
from .status import Guarded, guarded


class ServingServicer(Guarded, pb_grpc.AdapterServingServicer):
    """Thin gRPC shell over a ServingService; every call needs a valid identity (under mutual TLS), and an
    adapter serves only the identity that pushed it, unless it was pushed as public."""

    out_of_memory = "the server ran out of memory for this batch; retry with fewer prompts or fewer --max-new-tokens"

    def __init__(self, service: ServingService, identities: Identities):
        self.service = service
        self.identities = identities

    @guarded
    def Generate(self, request, context, who):
        future = self.service.submit(
            request.adapter,
            list(request.prompts),
            request.max_new_tokens,
            request.temperature,
            request.seed,
            who=who,
        )
        context.add_callback(future.cancel)  # a caller that hangs up before its batch starts is skipped
        generation = future.result()
        return pb.GenerateResponse(
            completions=[
                pb.Completion(
                    text=c.text, token_ids=c.token_ids, prompt_tokens=c.prompt_tokens, finish_reason=c.finish_reason
                )
                for c in generation.completions
            ],
            adapter=generation.adapter,
            batch_sequences=generation.batch_sequences,
        )


def add_serving(server: grpc.Server, service: ServingService, identities: Identities) -> None:
    """Registers the adapter-serving servicer on a grpc.Server."""
    pb_grpc.add_AdapterServingServicer_to_server(ServingServicer(service, identities), server)
