"""The client's one door to the cloud: channel, TLS, a stub of any service, retried calls and chunked downloads."""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass

import grpc

from tandem.protos import serde
from tandem.protos import split_pb2_grpc as pb_grpc

from .allowed_files import Allowed
from .downloads import receive
from .errors import ClientError
from .meter import Meter
from .retry import Retry, call_error
from .tls_failure import TlsSetup

log = logging.getLogger(__name__)

DEFAULT_CA = os.path.join(os.path.expanduser("~"), ".tandem", "tls", "ca.pem")
# `cloud serve` issues this identity on first use, for a data owner on the same machine.
DEFAULT_IDENTITY = os.path.join(os.path.expanduser("~"), ".tandem", "tls", "clients", "local.pem")

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", serde.MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", serde.MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
]


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
    error_feedback: bool = False  # carry each int8/int4 stream's quantization error into its next step
    exact_eval: bool = False  # evaluation forwards travel in float32, whatever the codec

    def __post_init__(self):
        if ":" not in self.server:
            raise ValueError(f"server must be HOST:PORT, got {self.server!r}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.error_feedback and (self.gradient_codec or self.codec) not in ("int8", "int4"):
            raise ValueError(
                "--error-feedback needs int8 or int4 gradients (--codec, or --gradient-codec): float codecs "
                "have no error to carry"
            )


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
    """TLS credentials and the certificates in use: the CA to trust and the client certificate (with a bundle)."""
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
    """Channel + stub with retries and accounting. All cloud calls go through `call` / `stream` / `download`.

    `stub` makes the stub of the service to call from the channel (the split-tuning service by default; e.g.
    `offsite_pb2_grpc.OffsiteTuningStub` or `serving_pb2_grpc.AdapterServingStub`).
    """

    def __init__(
        self,
        cfg: TransportConfig,
        meter: Meter | None = None,
        recorder: Recorder | None = None,
        stub=pb_grpc.SplitTuningStub,
    ):
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
        self.stub = stub(self.channel)

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
        """Unary call, retried as tandem.client.retry says; raises ServerError with an actionable message.

        With a sealer, each attempt seals a fresh copy of the request (new counters, so a retry is
        never a replay) and the response is opened before it is returned.
        """
        fn = getattr(self.stub, method)
        attempts = Retry(method, self.cfg.retries, self.cfg.backoff_s, self.tls, self.cfg.server, enabled=retry)
        while True:
            sent = self._seal(request, sealer, step)
            t0 = time.perf_counter()
            try:
                resp = fn(sent, timeout=self.cfg.timeout_s)
            except grpc.RpcError as e:
                self.meter.step_rpc_s += time.perf_counter() - t0
                attempts.after(e)  # sleeps before the next attempt, or raises
                continue
            self.meter.step_rpc_s += time.perf_counter() - t0
            self.meter.add(kind or method, serde.nbytes(sent), serde.nbytes(resp), one_time)
            if self.recorder is not None:
                self.recorder(kind or method, sent)
            if sealer is not None:
                self._open(resp, sealer, step)
            return resp

    def _seal(self, request, sealer, step: int):
        """The request as it goes on the wire: a freshly sealed copy with a sealer, else the request itself."""
        if sealer is None:
            return request
        t0 = time.perf_counter()
        sealed = type(request)()
        sealed.CopyFrom(request)
        sealer.seal(sealed, step)
        self.meter.step_seal_s += time.perf_counter() - t0
        return sealed

    def _open(self, resp, sealer, step: int) -> None:
        t0 = time.perf_counter()
        try:
            sealer.open(resp, step)
        except ValueError as e:
            raise ClientError(
                f"the server's reply failed its seal check ({e}); the connection may be tampered with"
            ) from None
        self.meter.step_seal_s += time.perf_counter() - t0

    def stream(self, method: str, request, kind: str | None = None):
        """Server-streaming call (one-time downloads); yields messages and accounts every byte."""
        try:
            sent = serde.nbytes(request)
            for msg in getattr(self.stub, method)(request, timeout=self.cfg.timeout_s):
                self.meter.add(kind or method, sent, serde.nbytes(msg), one_time=True)
                sent = 0
                yield msg
        except grpc.RpcError as e:
            raise call_error(e, self.tls, self.cfg.server) from None

    def download(self, method: str, request, target: str, allowed: Allowed, check=None) -> dict[str, str]:
        """Receives a FileChunk stream into the directory `target`, all or nothing; returns name -> SHA-256.

        Every chunked download goes through here: only `allowed` files are accepted, and `check(staging, digests)`
        may refuse them before they are committed (see tandem.client.downloads.receive).
        """
        return receive(self.stream(method, request, kind=method), target, allowed, check)
