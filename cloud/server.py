"""The plain gRPC entry point: a grpc.server over a Backbone, with TLS, health and graceful stop."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tandem.protos import serde
from tandem.protos import split_pb2_grpc as pb_grpc

from .backbone import Backbone
from .errors import Unauthenticated
from .identity import Identities, QuotaConfig
from .malformed import MalformedRequests
from .metrics import Metrics
from .offsite_servicer import add_offsite
from .serving_servicer import add_serving
from .split_servicer import SplitServicer
from .status import refuse
from .streams import StreamSlots
from .tls import load_sealing, server_credentials

log = logging.getLogger(__name__)

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", serde.MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", serde.MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
]


def build_server(
    service: Backbone,
    listen: str,
    tls_dir: str | None,
    workers: int = 8,
    mutual: bool = True,
    quotas: QuotaConfig | None = None,
    require_sealing: bool = False,
    metrics: Metrics | None = None,
    offsite=None,
    registry=None,
    serving=None,
    max_downloads: int = 4,
    download_deadline_s: float = 600.0,
) -> tuple[grpc.Server, int]:
    """Creates and starts the server; returns it and the bound port.

    Args:
        tls_dir: CA and server certificate directory; None means plaintext (identities off).
        mutual: Require client certificates signed by the CA (identities, revocation, quotas).
        require_sealing: Refuse sessions that do not seal their tensors.
        offsite: OffsiteService (emulator download), or None.
        registry: AdapterRegistry (adapter push and list; needed with `offsite`).
        serving: ServingService (Generate with registered adapters), or None.
        max_downloads: Download streams (client stages and emulator) at once (at most workers - 2); more are refused as overloaded.
        download_deadline_s: A download still running after this long is cancelled (a reader that stopped reading).
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers), options=SERVER_OPTIONS, interceptors=[MalformedRequests()]
    )
    mutual = mutual and tls_dir is not None
    identities = Identities(tls_dir, mutual, quotas)
    sealing = load_sealing(tls_dir) if tls_dir is not None else None  # signs sealing handshakes (protos/handshake.py)
    if tls_dir is not None and sealing is None:
        log.warning(
            "no sealing certificate in %s: TLS clients will refuse to seal or to fetch (`cloud serve` issues one)",
            tls_dir,
        )
    streams = download_slots(max_downloads, workers, download_deadline_s)
    servicer = SplitServicer(
        service, identities, metrics or Metrics(), require_sealing, sealing=sealing, streams=streams
    )
    pb_grpc.add_SplitTuningServicer_to_server(servicer, server)
    if offsite is not None:  # Offsite-Tuning (emulator download, adapter push): cloud/offsite_servicer.py
        add_offsite(server, offsite, registry, identities, streams, sealing)
    if serving is not None:  # adapter serving (Generate): cloud/serving_servicer.py
        add_serving(server, serving, identities)
    health_servicer = _CheckedHealth(identities)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = _bind(server, listen, tls_dir, mutual)
    server.start()
    _report_health(health_servicer, service)
    server._tandem_health = health_servicer  # noqa: SLF001 - kept for graceful shutdown
    return server, port


def download_slots(max_downloads: int, workers: int, deadline_s: float) -> StreamSlots:
    """The download streams' slots: downloads may hold at most all workers but two, so that health checks
    and training calls always find one free."""
    if max_downloads < 1:
        raise ValueError(f"--max-downloads must be >= 1, got {max_downloads}")
    return StreamSlots(max(1, min(max_downloads, workers - 2)), deadline_s)


def _bind(server: grpc.Server, listen: str, tls_dir: str | None, mutual: bool) -> int:
    """Binds `listen` (TLS unless `tls_dir` is None); returns the port, or raises OSError naming the address."""
    try:  # older gRPC returns port 0 when it cannot bind, newer raises RuntimeError
        if tls_dir is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, server_credentials(tls_dir, mutual))
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(
            f"--listen {listen}: cannot bind it (in use or not an address of this machine); choose another --listen"
        )
    return port


def _report_health(health_servicer, service: Backbone) -> None:
    """Serving; and NOT_SERVING from the moment the batching worker dies (nothing can be served then)."""
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("tandem.v1.SplitTuning", health_pb2.HealthCheckResponse.SERVING)
    batcher = service.batcher
    if batcher is not None:  # say so to load balancers
        batcher.on_death = lambda: _not_serving(health_servicer)
        if not batcher.alive:
            _not_serving(health_servicer)


class _CheckedHealth(health.HealthServicer):
    """The standard health service behind the identity check of every other RPC: a revoked certificate is refused."""

    def __init__(self, identities: Identities):
        super().__init__()
        self._identities = identities

    def _check(self, context) -> None:
        try:
            self._identities.resolve(context)
        except Unauthenticated as e:
            refuse(context, e)

    def Check(self, request, context):
        self._check(context)
        return super().Check(request, context)

    def Watch(self, request, context, send_response_callback=None):
        self._check(context)
        return super().Watch(request, context, send_response_callback)


def _not_serving(health_servicer) -> None:
    for name in ("", "tandem.v1.SplitTuning"):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)


def serve_forever(server: grpc.Server, service: Backbone, grace_s: float = 10.0) -> None:
    """Blocks until SIGTERM/SIGINT; then stops accepting and drains in-flight calls for grace_s.

    The process then ends even if a call is still stuck (a handler thread blocked for good would otherwise
    hold the interpreter's exit forever): the caller exits right after this returns.
    """
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal %d: draining in-flight calls (up to %.0f s)", signum, grace_s)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(timeout=30.0):
        n = service.store.expire()
        if n:
            log.info("closed %d idle session(s) after their TTL", n)
    server._tandem_health.enter_graceful_shutdown()  # noqa: SLF001
    drained = server.stop(grace_s).wait(grace_s + 2.0)
    service.stop()  # fails what is still queued for the compute worker
    if not drained:
        log.warning("calls still running after %.0f s; exiting without them", grace_s)
