"""The client's one door to the cloud: channel, TLS, stubs, retries and byte/time accounting."""

from __future__ import annotations

import logging
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field

import grpc

from tandem.protos import serde
from tandem.protos import split_pb2_grpc as pb_grpc

from .errors import ClientError, explain
from .tls_failure import CLOSED, TlsSetup, failure_kind

log = logging.getLogger(__name__)

DEFAULT_CA = os.path.join(os.path.expanduser("~"), ".tandem", "tls", "ca.pem")
# `cloud serve` issues this identity on first use, for a data owner on the same machine.
DEFAULT_IDENTITY = os.path.join(os.path.expanduser("~"), ".tandem", "tls", "clients", "local.pem")
# A closed TLS handshake is tried once more after this long (gRPC's first reconnect backoff is 1 s +- 20 %, and a
# call before it ends gets the cached error): a connection cut by chance gets a second chance, a refusal is told.
HANDSHAKE_RETRY_S = 1.5
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", serde.MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", serde.MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
]

# Estimated framing around each serialized message (payload bytes are measured exactly):
# gRPC adds a 5-byte length prefix; HTTP/2 a 9-byte header per DATA frame (16 KiB max) plus
# HEADERS frames (~40 B request with HPACK, ~30 B response + trailers); TLS 1.3 adds 22 B per
# record of at most 16 KiB (5 header, 1 content type, 16 AEAD tag).
_FRAME = 16 * 1024


def framing_estimate(payload: int, tls: bool) -> int:
    """Estimated HTTP/2 (+TLS) framing bytes for one message of `payload` bytes."""
    frames = max(1, -(-(payload + 5) // _FRAME))
    return 5 + 9 * frames + 35 + (22 * frames if tls else 0)


def _transient(e: grpc.RpcError) -> bool:
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


@dataclass
class TransportConfig:
    """How the client reaches the cloud.

    Attributes:
        server: HOST:PORT of `cloud serve`.
        insecure: Plaintext gRPC (warns); otherwise TLS verified against `ca`.
        ca: PEM file of the CA that signed the server certificate (default: the bundle's CA).
        identity: Identity bundle (key, certificate, CA) for mutual TLS; a missing default is skipped.
        seal: Seal tensors end to end (X25519 + AES-256-GCM) on top of TLS.
        codec: Wire codec of activations (float32 exact; float16, bfloat16, int8, int4 lossy).
        gradient_codec: Wire codec of the gradients at the cut (empty: same as codec).
        timeout_s: Deadline of one call.
        retries: Attempts after the first for UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED.
        backoff_s: First backoff; doubles each attempt, with jitter, capped at 30 s.
    """

    server: str = "127.0.0.1:50051"
    insecure: bool = False
    ca: str | None = None  # None: the CA inside the identity bundle, else DEFAULT_CA
    identity: str | None = DEFAULT_IDENTITY  # bundle from `cloud certs issue`; None: no client certificate
    timeout_s: float = 300.0
    retries: int = 8
    backoff_s: float = 0.5
    seal: bool = True
    codec: str = "float32"
    gradient_codec: str = ""  # empty: same as codec
    lora_codec: str = "float32"  # remote-LoRA weights up and their gradients down

    def __post_init__(self):
        if ":" not in self.server:
            raise ValueError(f"server must be HOST:PORT, got {self.server!r}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")


@dataclass
class KindTotals:
    calls: int = 0
    sent: int = 0
    received: int = 0


@dataclass
class Meter:
    """Counts serialized bytes per message kind and direction, and time per category.

    `step_*` fields accumulate since the last `take_step()`; `kinds` and `one_time` are run totals.
    """

    tls: bool = True
    kinds: dict[str, KindTotals] = field(default_factory=lambda: defaultdict(KindTotals))
    one_time: dict[str, KindTotals] = field(default_factory=lambda: defaultdict(KindTotals))
    step_sent: int = 0
    step_received: int = 0
    step_rpc_s: float = 0.0
    step_cloud_s: float = 0.0
    step_serde_s: float = 0.0
    step_seal_s: float = 0.0
    framing: int = 0

    def add(self, kind: str, sent: int, received: int, one_time: bool = False) -> None:
        table = self.one_time if one_time else self.kinds
        k = table[kind]
        k.calls += 1
        k.sent += sent
        k.received += received
        self.framing += framing_estimate(sent, self.tls) + framing_estimate(received, self.tls)
        if not one_time:
            self.step_sent += sent
            self.step_received += received

    def take_step(self) -> dict:
        out = dict(
            bytes_sent=self.step_sent,
            bytes_received=self.step_received,
            rpc_s=self.step_rpc_s,
            cloud_compute_s=self.step_cloud_s,
            serialization_s=self.step_serde_s,
            sealing_s=self.step_seal_s,
        )
        self.step_sent = self.step_received = 0
        self.step_rpc_s = self.step_cloud_s = self.step_serde_s = self.step_seal_s = 0.0
        return out

    def totals(self) -> dict:
        per = {k: vars(v).copy() for k, v in self.kinds.items()}
        once = {k: vars(v).copy() for k, v in self.one_time.items()}
        return dict(per_kind=per, one_time=once, framing_estimate_bytes=self.framing)


class Recorder:
    """Keeps an exact copy of what the cloud receives: the serialized requests of chosen kinds.

    Writes RUN_DIR/cloud_view/<kind>-<n>.bin (the request bytes as sent), for at most `limit`
    requests per kind. The privacy audit reads these files, not a recomputation from the text.
    """

    def __init__(self, run_dir: str, kinds=("Forward", "EvalForward", "Backward"), limit: int = 8):
        self.dir = os.path.join(run_dir, "cloud_view")
        self.kinds, self.limit = set(kinds), limit
        self.counts: dict[str, int] = defaultdict(int)
        os.makedirs(self.dir, exist_ok=True)

    def __call__(self, kind: str, request) -> None:
        if kind not in self.kinds or self.counts[kind] >= self.limit:
            return
        with open(os.path.join(self.dir, f"{kind}-{self.counts[kind]:04d}.bin"), "wb") as f:
            f.write(request.SerializeToString())
        self.counts[kind] += 1


def _credentials(cfg: TransportConfig):
    """TLS credentials and the certificates in use: the CA to trust and, when an identity bundle exists, the client certificate."""
    key = cert = ca = identity = None
    if cfg.identity and (os.path.exists(cfg.identity) or cfg.identity != DEFAULT_IDENTITY):
        if not os.path.exists(cfg.identity):
            raise ClientError(
                f"no identity bundle at {cfg.identity}: ask the operator for one (`cloud certs issue NAME`)"
            )
        from tandem.protos.bundle import read_bundle

        try:
            key, cert, ca = read_bundle(cfg.identity)
        except ValueError as e:
            raise ClientError(str(e)) from None
        identity = cfg.identity
    ca_path = cfg.ca or (None if ca else DEFAULT_CA)
    if ca_path:
        if not os.path.exists(ca_path):
            raise ClientError(
                f"no CA certificate at {ca_path}: pass --ca with the ca.pem the cloud operator gave you, "
                "or --identity with your identity bundle (or --insecure for a plaintext test server)"
            )
        with open(ca_path, "rb") as f:
            ca = f.read()
    setup = TlsSetup(cfg.server, identity, cert, ca_path or f"the CA in {identity}", ca)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert), setup


class Transport:
    """Channel + stub with retries and accounting. All cloud calls go through `call` / `stream`."""

    def __init__(self, cfg: TransportConfig, meter: Meter | None = None, recorder: Recorder | None = None):
        self.cfg = cfg
        self.recorder = recorder
        self.meter = meter or Meter(tls=not cfg.insecure)
        self.ca_pem: bytes | None = None  # the CA trusted for TLS; it also vouches for the server's sealing key
        self.tls: TlsSetup | None = None  # the certificates in use, named when a handshake fails
        if cfg.insecure:
            log.warning(
                "--insecure: talking PLAINTEXT gRPC to %s; anyone on the path can read your activations", cfg.server
            )
            self.channel = grpc.insecure_channel(cfg.server, options=CHANNEL_OPTIONS)
        else:
            creds, self.tls = _credentials(cfg)
            self.ca_pem = self.tls.ca_pem
            self.channel = grpc.secure_channel(cfg.server, creds, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.SplitTuningStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def call(
        self,
        method: str,
        request,
        kind: str | None = None,
        one_time: bool = False,
        retry: bool = True,
        sealer=None,
        step: int = 0,
    ):
        """Unary call with retries on transient codes; raises ServerError with an actionable message.

        With a sealer, each attempt seals a fresh copy of the request (new counters, so a retry is
        never a replay) and the response is opened before it is returned.
        """
        fn = getattr(self.stub, method)
        attempt = 0
        handshake_retried = not retry or self.cfg.retries == 0
        plain = request
        while True:
            if sealer is not None:
                t0 = time.perf_counter()
                request = type(plain)()
                request.CopyFrom(plain)
                sealer.seal(request, step)
                self.meter.step_seal_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            try:
                resp = fn(request, timeout=self.cfg.timeout_s)
            except grpc.RpcError as e:
                self.meter.step_rpc_s += time.perf_counter() - t0
                kind = failure_kind(e) if self.tls is not None else None
                if kind == CLOSED and not handshake_retried and not self.tls.identity_problem():
                    handshake_retried = True
                    log.warning(
                        "%s: the server closed the TLS handshake; trying once more in %.1f s", method, HANDSHAKE_RETRY_S
                    )
                    time.sleep(HANDSHAKE_RETRY_S)
                    continue
                if kind is not None:  # a certificate problem: retrying cannot help
                    raise self.tls.error(kind) from None
                if retry and _transient(e) and attempt < self.cfg.retries:
                    delay = min(30.0, self.cfg.backoff_s * 2**attempt) * (0.5 + random.random())
                    log.warning(
                        "%s: %s; retrying in %.1f s (%d/%d)",
                        method,
                        e.code().name,
                        delay,
                        attempt + 1,
                        self.cfg.retries,
                    )
                    time.sleep(delay)
                    attempt += 1
                    continue
                raise explain(e, self.cfg.server) from None
            self.meter.step_rpc_s += time.perf_counter() - t0
            self.meter.add(kind or method, serde.nbytes(request), serde.nbytes(resp), one_time)
            if self.recorder is not None:
                self.recorder(kind or method, request)
            if sealer is not None:
                t0 = time.perf_counter()
                try:
                    sealer.open(resp, step)
                except ValueError as e:
                    raise ClientError(
                        f"the server's reply failed its seal check ({e}); the connection may be tampered with"
                    ) from None
                self.meter.step_seal_s += time.perf_counter() - t0
            return resp

    def stream(self, method: str, request, kind: str | None = None):
        """Server-streaming call (one-time downloads); yields messages and accounts every byte."""
        try:
            sent = serde.nbytes(request)
            for msg in getattr(self.stub, method)(request, timeout=self.cfg.timeout_s):
                self.meter.add(kind or method, sent, serde.nbytes(msg), one_time=True)
                sent = 0
                yield msg
        except grpc.RpcError as e:
            kind = failure_kind(e) if self.tls is not None else None
            raise (self.tls.error(kind) if kind else explain(e, self.cfg.server)) from None
