"""The steps of `cloud serve`: check the exposure, prepare the process, build the services, start the server."""

from __future__ import annotations

import argparse
import errno
import logging

log = logging.getLogger("tandem.cloud")


def listen_problem(listen: str) -> str:
    """Why HOST:PORT cannot be listened on ('' when it can). Binds without SO_REUSEPORT, which gRPC sets: a port
    another server (gRPC or not) listens on is refused here instead of shared or failing deep inside grpc."""
    import socket

    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return "expected HOST:PORT"
    host = host.strip("[]")
    try:
        family = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
            )  # a restart may find old connections in TIME_WAIT
            sock.bind((host, int(port)))
    except OSError as e:
        return "the port is in use" if e.errno == errno.EADDRINUSE else str(e.strerror or e)
    return ""


def is_loopback(host: str) -> bool:
    """Every address `host` names is a loopback one (an unresolvable name counts as not)."""
    import ipaddress
    import socket

    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def exposure_problem(args: argparse.Namespace) -> str:
    """Why these flags cannot serve, or would expose the server carelessly ('' when neither). Runs before the
    model loads: a taken port is one line, not a traceback."""
    problem = listen_problem(args.listen)
    if problem:
        return f"--listen {args.listen}: {problem}; choose another --listen"
    host = args.listen.rpartition(":")[0]
    if args.insecure and not args.insecure_public and not is_loopback(host):
        return (
            f"--insecure with --listen {args.listen} would serve PLAINTEXT on a non-loopback address: activations, "
            "gradients and adapters would cross the network in clear; listen on 127.0.0.1, drop --insecure, or "
            "add --insecure-public if this network is trusted"
        )
    if args.metrics_port:
        problem = listen_problem(f"{args.metrics_listen}:{args.metrics_port}")
        if problem:
            return f"--metrics-listen {args.metrics_listen} --metrics-port {args.metrics_port}: {problem}; choose another --metrics-port"
    return ""


def placement_problem(args: argparse.Namespace) -> str:
    """Why --device / --dtype cannot compute here ('' when they can): a bad value, or CUDA on a machine without it.
    Runs before the model loads."""
    from tandem.stages.precision import PlacementError, check_dtype, resolve_device

    try:
        check_dtype(args.dtype)
        resolve_device(args.device)
    except PlacementError as e:
        return str(e)
    return ""


def prepare_process(args: argparse.Namespace) -> str | None:
    """Allocator, torch threads and TLS material (created on first use); returns the TLS directory (None: plaintext)."""
    from .allocator import configure as configure_allocator
    from .flags import apply_threads
    from .tls import ensure_server_tls

    configure_allocator()  # before the worker threads exist: memory freed by ended sessions goes back to the OS
    apply_threads(args)
    if args.insecure:
        log.warning("--insecure: serving PLAINTEXT gRPC; activations and adapters cross the network unencrypted")
        return None
    ensure_server_tls(args.tls_dir)
    return args.tls_dir


def build_backbone(args: argparse.Namespace, loaded, layout):
    """The split-tuning Backbone (cloud/backbone.py): in this process, or on a Ray cluster with --ray."""
    from .batching import BatchingConfig

    log.info("computing in %s (frozen weights; LoRA and optimizer state in float32)", loaded.placement)
    from .limits import ServiceLimits
    from .sessions import StoreConfig
    from .split import SplitService

    store = StoreConfig(
        max_sessions=args.max_sessions,
        memory_bytes=int(args.memory_cap_mb * 2**20),
        ttl_s=args.session_ttl,
        max_sessions_per_identity=args.quota_sessions,
        max_cache_tokens=args.max_cache_tokens,
    )
    limits = ServiceLimits(
        max_tokens_per_step=args.max_tokens_per_step,
        cloud_optimizer=not args.no_cloud_optimizer,
        max_lora_rank=args.max_lora_rank,
        max_lora_targets=args.max_lora_targets,
    )
    batching = None
    if not args.no_batching:
        batching = BatchingConfig(
            window_ms=args.batch_window_ms,
            max_tokens=args.batch_max_tokens,
            backward_wait_ms=args.batch_backward_wait_ms,
        )
    if not args.ray:
        return SplitService(loaded, layout, store, limits, batching=batching, forward_state=args.forward_state)
    from .ray_backend import RaySplitService

    if args.forward_state == "recompute":
        log.warning("--forward-state recompute is not wired to Ray shards yet: each shard keeps its steps' graphs")
    return RaySplitService(
        loaded,
        layout,
        store,
        limits,
        args.ray,
        replicas=args.replicas,
        pipeline=args.pipeline,
        actor_cpus=args.actor_cpus,
        threads=args.threads,
        shard_resources=args.ray_shard_resources,
        batching=batching,
    )


def start_metrics(args: argparse.Namespace):
    """The metrics, served over HTTP with --metrics-port (warned about off loopback)."""
    from .metrics import Metrics

    metrics = Metrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_listen.strip("[]"))
        if not is_loopback(args.metrics_listen):
            log.warning(
                "--metrics-listen %s: metrics are served over plain HTTP without authentication to every "
                "host that can reach %s:%d",
                args.metrics_listen,
                args.metrics_listen,
                args.metrics_port,
            )
    return metrics


def warn_without_client_auth(args: argparse.Namespace, tls_dir: str | None) -> None:
    if tls_dir is not None and args.no_client_auth:
        log.warning("--no-client-auth: any client that trusts the CA may connect; sessions are not tied to identities")


def build_adapter_services(args: argparse.Namespace, loaded, layout):
    """The emulator download, the adapter registry and adapter serving; returns (offsite, registry, serving)."""
    from .offsite import OffsiteService
    from .registry import AdapterRegistry
    from .serving import ServingConfig, ServingService

    offsite = OffsiteService(loaded.model_id, layout, args.emulator)
    registry = AdapterRegistry(
        loaded.model,
        loaded.model_id,
        offsite.layout,  # the package's, when there is one: the blocks data owners may retune
        args.adapter_registry,
        quota_bytes=int(args.registry_quota_mb * 2**20),
        max_adapters=args.registry_max_adapters,
    )
    serving = ServingService(
        loaded,
        registry,
        ServingConfig(  # after the backbone: it adds slots to the other blocks
            window_ms=args.generate_window_ms,
            max_batch=args.generate_max_batch,
            max_new_tokens=args.generate_max_new_tokens,
            default_new_tokens=min(64, args.generate_max_new_tokens),
            adapter_cache=args.generate_adapter_cache,
        ),
    )
    return offsite, registry, serving


def start_server(args: argparse.Namespace, backbone, tls_dir: str | None, metrics, adapter_services):
    """Builds and starts the gRPC server over every service; returns (server, bound port)."""
    from .identity import QuotaConfig
    from .server import build_server

    offsite, registry, serving = adapter_services
    return build_server(
        backbone,
        args.listen,
        tls_dir,
        workers=args.workers,
        mutual=not args.no_client_auth,
        quotas=QuotaConfig(bytes_per_s=args.quota_mbps * 2**20),
        require_sealing=args.require_sealing,
        metrics=metrics,
        offsite=offsite,
        registry=registry,
        serving=serving,
        max_downloads=args.max_downloads,
        download_deadline_s=args.download_timeout,
    )
