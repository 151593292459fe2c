"""The retry policy of every cloud call: which failures are tried again, after how long, and which are told at once."""

from __future__ import annotations

import logging
import random
import time

import grpc

from .errors import ClientError, explain
from .tls_failure import CLOSED, TlsSetup, failure_kind

log = logging.getLogger(__name__)

# A closed TLS handshake is tried once more after this long (gRPC's first reconnect backoff is 1 s +- 20 %, and a
# call before it ends gets the cached error): a connection cut by chance gets a second chance, a refusal is told.
HANDSHAKE_RETRY_S = 1.5
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
MAX_BACKOFF_S = 30.0


def transient(e: grpc.RpcError) -> bool:
    """Worth retrying: unavailable, deadline, or a capacity limit that may clear.

    RESOURCE_EXHAUSTED is retried only with the reason "overloaded" (the server or the identity's byte quota is
    busy now). Any other reason, e.g. "too-large", "over-quota-burst" (one request above the identity's quota
    burst) or "registry-quota", or none at all (gRPC's own message-size limit), fails the same way every time.
    """
    if e.code() not in RETRYABLE:
        return False
    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        try:
            reasons = [v for k, v in (e.trailing_metadata() or ()) if k == "tandem-reason"]
        except (AttributeError, TypeError):
            return False
        return reasons == ["overloaded"]
    return True


def call_error(e: grpc.RpcError, tls: TlsSetup | None, server: str) -> ClientError:
    """The error a failed call ends with: the certificate problem when the TLS handshake failed, else the status."""
    kind = failure_kind(e) if tls is not None else None
    return tls.error(kind) if kind is not None else explain(e, server)


class Retry:
    """One call's attempts: `after(e)` sleeps before the next attempt, or raises the error the call ends with.

    Transient failures (see `transient`) are retried up to `retries` times with a doubling, jittered backoff
    from `backoff_s` (capped at MAX_BACKOFF_S); a closed TLS handshake once after HANDSHAKE_RETRY_S; a
    certificate problem never. `enabled=False` (e.g. a call that must not be repeated) tries once.
    """

    def __init__(self, method: str, retries: int, backoff_s: float, tls: TlsSetup | None, server: str, enabled=True):
        self.method, self.retries, self.backoff_s, self.tls, self.server = method, retries, backoff_s, tls, server
        self.enabled = enabled
        self.attempt = 0
        self.handshake_retried = not enabled or retries == 0

    def after(self, e: grpc.RpcError) -> None:
        kind = failure_kind(e) if self.tls is not None else None
        if kind == CLOSED and not self.handshake_retried and not self.tls.identity_problem():
            self.handshake_retried = True
            log.warning(
                "%s: the server closed the TLS handshake; trying once more in %.1f s", self.method, HANDSHAKE_RETRY_S
            )
            time.sleep(HANDSHAKE_RETRY_S)
            return
        if kind is not None:  # a certificate problem: retrying cannot help
            raise self.tls.error(kind) from None
        if self.enabled and transient(e) and self.attempt < self.retries:
            delay = min(MAX_BACKOFF_S, self.backoff_s * 2**self.attempt) * (0.5 + random.random())
            log.warning(
                "%s: %s; retrying in %.1f s (%d/%d)", self.method, e.code().name, delay, self.attempt + 1, self.retries
            )
            time.sleep(delay)
            self.attempt += 1
            return
        raise explain(e, self.server) from None
