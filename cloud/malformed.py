"""Requests whose bytes are not the RPC's message: refused as INVALID_ARGUMENT with a reason, logged in one line.

Left to itself gRPC answers an undecodable body with INTERNAL and no `tandem-reason`, and logs a full
traceback for each one, so anyone can flood the log. This interceptor decodes every request of every
service itself and turns a decode failure into an ordinary refusal, before any handler runs.
"""

from __future__ import annotations

import logging

import grpc

from .status import abort

log = logging.getLogger(__name__)


class _Undecodable:
    """Stands in for a request that failed to decode (the handler never sees it)."""


_UNDECODABLE = _Undecodable()


def _safe(deserializer):
    if deserializer is None:
        return None

    def decode(data: bytes):
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - any parse failure of untrusted bytes is the caller's error
            return _UNDECODABLE

    return decode


def _refuse(method: str, context) -> None:
    log.info("%s: refused a request that is not a valid message", method)
    abort(
        context,
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid",
        f"the request is not a valid {method.rsplit('/', 1)[-1]} message",
    )


def _guarded(behavior, method: str):
    def run(request, context, *rest):
        if request is _UNDECODABLE:
            _refuse(method, context)
        return behavior(request, context, *rest)

    return run


class MalformedRequests(grpc.ServerInterceptor):
    """Wraps unary-request handlers (all that tandem and the health service have) with a decoder that cannot raise."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method
        decode, encode = _safe(handler.request_deserializer), handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_guarded(handler.unary_unary, method), decode, encode)
        return grpc.unary_stream_rpc_method_handler(_guarded(handler.unary_stream, method), decode, encode)
