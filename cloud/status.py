"""The cloud's one map from errors to gRPC status codes, and the one guard every servicer method runs under."""

from __future__ import annotations

import functools
import inspect
import logging
import time

import grpc

from tandem.protos.serde import WireError
from tandem.stages.errors import StageError

from . import errors

log = logging.getLogger(__name__)

STATUS = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.SessionNotFound: grpc.StatusCode.NOT_FOUND,
    errors.NotOwner: grpc.StatusCode.PERMISSION_DENIED,
    errors.StepNotPending: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StateEvicted: grpc.StatusCode.ABORTED,
    errors.LoraMissing: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.OverQuota: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.SealFailure: grpc.StatusCode.INVALID_ARGUMENT,
    errors.AdapterRejected: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NameTaken: grpc.StatusCode.ALREADY_EXISTS,
    errors.RegistryFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.NoEmulator: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AdapterNotFound: grpc.StatusCode.NOT_FOUND,
    errors.NotServable: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ServingClosed: grpc.StatusCode.UNAVAILABLE,
}

MAX_DETAILS = 1024  # characters of a status's details: they travel in a header (clients drop one over 16 KiB)
OUT_OF_MEMORY = "the server ran out of memory for this request; retry with a smaller batch"
INTERNAL = "the server failed on this request (logged); retry, and report it if it persists"


def bounded(text: str, limit: int = MAX_DETAILS) -> str:
    """One line of at most `limit` characters (an ellipsis marks a cut). Messages may quote the request:
    unbounded, a huge name would come back as a header the client refuses."""
    text = " ".join(text[: 4 * limit].split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def code_of(e: errors.CloudError) -> grpc.StatusCode:
    """The status code of a cloud error (of its nearest mapped base class; INTERNAL if none is mapped)."""
    for cls in type(e).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


def abort(context, code: grpc.StatusCode, reason: str, message: str):
    """Ends the call with `code`, the reason as trailing metadata (tandem-reason), and bounded details."""
    context.set_trailing_metadata((("tandem-reason", reason),))
    context.abort(code, bounded(message))


def refuse(context, e: errors.CloudError):
    """Ends the call with a cloud error's status, reason and message."""
    abort(context, code_of(e), e.reason, str(e))


def _status_of(e: Exception, method: str, out_of_memory: str) -> tuple[grpc.StatusCode, str, str]:
    """(code, reason, message) for what a handler raised; logs it in one line, never with a traceback."""
    if isinstance(e, errors.CloudError):
        code, reason, message = code_of(e), e.reason, str(e)
    elif isinstance(e, (WireError, StageError, ValueError)):
        code, reason, message = grpc.StatusCode.INVALID_ARGUMENT, "invalid", str(e)
    elif isinstance(e, MemoryError):
        code, reason, message = grpc.StatusCode.RESOURCE_EXHAUSTED, "too-large", out_of_memory
    else:  # a bug or an unforeseen input: INTERNAL, one log line, never UNKNOWN
        code, reason, message = grpc.StatusCode.INTERNAL, "internal", INTERNAL
        log.error("%s: internal error: %s: %s", method, type(e).__name__, bounded(str(e), 200))
    # One line per refused request; malformed ones at INFO (an operator may want to see a fuzzer).
    level = logging.INFO if reason in ("invalid", "seal") else logging.DEBUG
    log.log(level, "%s refused: %s %s: %s", method, code.name, reason, bounded(message, 160))
    return code, reason, message


def _aborted(context) -> bool:
    """Whether the handler already ended the call with its own status (context.abort raised through it)."""
    return getattr(getattr(context, "_state", None), "aborted", False)


class Guarded:
    """What `guarded` needs of a servicer: its identities, a memory-refusal text, and a hook per unary call."""

    identities = None  # tandem.cloud.identity.Identities: every call's caller is resolved and charged
    out_of_memory = OUT_OF_MEMORY  # the details of a request the server ran out of memory for

    def observe(self, method: str, request, code: grpc.StatusCode, seconds: float, reply) -> None:
        """Called once per unary call, answered (`reply`) or refused (None); the split servicer's metrics."""


def guarded(method):
    """Wraps a servicer method (unary or response-streaming) of a `Guarded` servicer.

    The caller's identity is resolved and the request's bytes charged to it before the method runs; the
    method gets that identity as a fourth argument. A unary reply's bytes are charged too (streams pace
    their chunks themselves). Whatever the method raises ends the call with a status from STATUS, a
    tandem-reason and bounded details; a failure of another session's call never reaches this one.
    """
    name = method.__name__

    def caller(self, request, context) -> str:
        who = self.identities.resolve(context)
        self.identities.charge(who, request.ByteSize())
        return who

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context, caller(self, request, context))
            except Exception as e:
                if _aborted(context):
                    raise
                code, reason, message = _status_of(e, name, self.out_of_memory)
                abort(context, code, reason, message)

        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        start, code, reply = time.perf_counter(), grpc.StatusCode.OK, None
        try:
            who = caller(self, request, context)
            reply = method(self, request, context, who)
            self.identities.charge_reply(who, reply.ByteSize())  # replies count against the byte quota too
            return reply
        except Exception as e:
            if _aborted(context):
                raise
            code, reason, message = _status_of(e, name, self.out_of_memory)
        finally:
            self.observe(name, request, code, time.perf_counter() - start, reply)
        abort(context, code, reason, message)

    return unary
