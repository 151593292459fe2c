"""Client-side errors, and sentences a person can act on for each gRPC status."""

from __future__ import annotations

import grpc


class ClientError(Exception):
    """Base class: a problem the data owner can fix; the message says how."""


class DataError(ClientError):
    """The --data directory is missing, empty or unreadable."""


class ServerError(ClientError):
    """The server refused or failed a call."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, reason: str = ""):
        super().__init__(message)
        self.code = code
        self.reason = reason


class CheckpointError(ClientError):
    """A checkpoint could not be written or read."""


_HINTS = {
    grpc.StatusCode.UNAVAILABLE: "the server at {addr} is not reachable: is `cloud serve` running there, and do --server and TLS settings (--ca / --insecure) match?",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the server at {addr} did not answer in time; it may be overloaded, try again",
    grpc.StatusCode.UNAUTHENTICATED: "the server did not accept this client's identity",
    grpc.StatusCode.PERMISSION_DENIED: "this identity may not use that session",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "the server is at a limit; retry later or use a smaller --batch-size/--seq-len",
    grpc.StatusCode.NOT_FOUND: "the session is gone (closed, expired or the server restarted)",
    grpc.StatusCode.INVALID_ARGUMENT: "the server rejected the request",
    grpc.StatusCode.UNIMPLEMENTED: "the server at {addr} does not speak tandem's protocol (wrong address or version?)",
}

# Reasons (tandem-reason trailer) whose hint is more precise than their status code's.
_REASON_HINTS = {
    "no-adapter": "the server has no adapter of that name",
    "not-servable": "the server cannot serve this adapter",
    "over-quota-burst": "the request is larger than this identity's byte quota lets through at once (retrying cannot help)",
    "registry-quota": "this identity's share of the adapter registry is full",
}


def explain(e: grpc.RpcError, addr: str) -> ServerError:
    """Turns a gRPC error into a ServerError whose message says what happened and what to do."""
    code = e.code() if hasattr(e, "code") else None
    detail = e.details() if hasattr(e, "details") else str(e)
    reason = ""
    try:
        for k, v in e.trailing_metadata() or ():
            if k == "tandem-reason":
                reason = v
    except (AttributeError, TypeError):
        pass
    hint = _REASON_HINTS.get(reason) or _HINTS.get(code, "the call failed").format(addr=addr)
    name = code.name if code is not None else "UNKNOWN"
    return ServerError(f"{hint} [{name}: {printable(detail)}]", code, _printable_reason(reason))


MAX_DETAILS = 1024  # characters of a status's details the client shows (the server clips its own to the same)


def printable(text, limit: int = MAX_DETAILS) -> str:
    """Text from the network as one line of printable characters, clipped (no escape sequences reach a terminal)."""
    text = "".join(c if c.isprintable() else " " for c in str(text or ""))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _printable_reason(reason) -> str:
    return printable(reason, 64)
