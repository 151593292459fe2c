"""gRPC servicer of adapter serving: identity, decoding the request, a call into GenerationService, status codes."""

from __future__ import annotations

import grpc

from tandem.protos import serving_pb2 as pb
from tandem.protos import serving_pb2_grpc as pb_grpc

from . import errors
from .identity import Identities
from .serving import AdapterNotFound, GenerationService, NotServable, ServingClosed

_STATUS = {
    AdapterNotFound: grpc.StatusCode.NOT_FOUND,
    NotServable: grpc.StatusCode.FAILED_PRECONDITION,
    ServingClosed: grpc.StatusCode.UNAVAILABLE,
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.OverQuota: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}


class AdapterServingServicer(pb_grpc.AdapterServingServicer):
    """Thin gRPC shell over a GenerationService; every call needs a valid identity (under mutual TLS), and an
    adapter serves only the identity that pushed it, unless it was pushed as public."""

    def __init__(self, service: GenerationService, identities: Identities):
        self.service = service
        self.identities = identities

    def Generate(self, request, context):
        try:
            who = self.identities.resolve(context)
            self.identities.charge(who, request.ByteSize())
            future = self.service.submit(
                request.adapter,
                list(request.prompts),
                request.max_new_tokens,
                request.temperature,
                request.seed,
                who=who,
            )
            context.add_callback(future.cancel)  # a caller that hangs up before its batch starts is skipped
            gen = future.result()
        except errors.CloudError as e:
            context.set_trailing_metadata((("tandem-reason", e.reason),))
            context.abort(_STATUS.get(type(e), grpc.StatusCode.INTERNAL), errors.details(e))
        except MemoryError:
            context.set_trailing_metadata((("tandem-reason", "too-large"),))
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "the server ran out of memory for this batch; retry with fewer prompts or fewer --max-new-tokens",
            )
        resp = pb.GenerateResponse(
            completions=[
                pb.Completion(
                    text=c.text, token_ids=c.token_ids, prompt_tokens=c.prompt_tokens, finish_reason=c.finish_reason
                )
                for c in gen.completions
            ],
            adapter=gen.adapter,
            batch_sequences=gen.batch_sequences,
        )
        self.identities.charge_reply(who, resp.ByteSize())  # responses count against the byte quota too
        return resp


def add_serving(server: grpc.Server, service: GenerationService, identities: Identities) -> None:
    """Registers the adapter-serving servicer on a grpc.Server."""
    pb_grpc.add_AdapterServingServicer_to_server(AdapterServingServicer(service, identities), server)
