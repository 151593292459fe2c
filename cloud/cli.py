"""`cloud`: the model owner's command line (serve the backbone, manage certificates)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys

from .offsite_cli import add_emulator_parser

DEFAULT_TLS_DIR = os.path.join(os.path.expanduser("~"), ".tandem", "tls")
DEFAULT_REGISTRY = os.path.join(os.path.expanduser("~"), ".tandem", "adapters")


def _listen_problem(listen: str) -> str:
    """Why HOST:PORT cannot be listened on ('' when it can). Binds without SO_REUSEPORT, which gRPC sets: a port
    another server (gRPC or not) listens on is refused here instead of shared or failing deep inside grpc."""
    import socket

    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return "expected HOST:PORT"
    host = host.strip("[]")
    try:
        family = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may find old connections in TIME_WAIT
            s.bind((host, int(port)))
    except OSError as e:
        return "the port is in use" if e.errno == errno.EADDRINUSE else str(e.strerror or e)
    return ""


def _is_loopback(host: str) -> bool:
    """Every address `host` names is a loopback one (an unresolvable name counts as not)."""
    import ipaddress
    import socket

    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def _exposure_problem(args) -> str:
    """Why these flags would expose the server carelessly ('' when they do not)."""
    host = args.listen.rpartition(":")[0]
    if args.insecure and not args.insecure_public and not _is_loopback(host):
        return (
            f"--insecure with --listen {args.listen} would serve PLAINTEXT on a non-loopback address: activations, "
            "gradients and adapters would cross the network in clear; listen on 127.0.0.1, drop --insecure, or "
            "add --insecure-public if this network is trusted"
        )
    if args.metrics_port:
        problem = _listen_problem(f"{args.metrics_listen}:{args.metrics_port}")
        if problem:
            return f"--metrics-listen {args.metrics_listen} --metrics-port {args.metrics_port}: {problem}; choose another --metrics-port"
    return ""


def _serve(args) -> int:
    import torch

    from tandem.stages.errors import StageError
    from tandem.stages.loading import load_model
    from tandem.stages.modules import StageLayout

    from .batching import BatchingConfig
    from .identity import QuotaConfig
    from .metrics import Metrics
    from .offsite import OffsiteService
    from .server import build_server, serve_forever
    from .service import BackboneService, ServiceLimits
    from .serving import GenerationService, ServingConfig
    from .sessions import StoreConfig
    from .tls import ensure_server_tls

    log = logging.getLogger("tandem.cloud")
    problem = _listen_problem(args.listen)  # before the model loads: a taken port is one line, not a traceback
    if problem:
        print(f"cloud serve: --listen {args.listen}: {problem}; choose another --listen", file=sys.stderr)
        return 2
    problem = _exposure_problem(args)
    if problem:
        print(f"cloud serve: {problem}", file=sys.stderr)
        return 2
    from .allocator import configure as configure_allocator

    configure_allocator()  # before the worker threads exist: memory freed by ended sessions goes back to the OS
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.insecure:
        log.warning("--insecure: serving PLAINTEXT gRPC; activations and adapters cross the network unencrypted")
        tls_dir = None
    else:
        tls_dir = args.tls_dir
        ensure_server_tls(tls_dir)
    try:
        loaded = load_model(args.model)
        layout = StageLayout.parse(args.client_blocks, loaded.config)
        store = StoreConfig(
            max_sessions=args.max_sessions,
            memory_bytes=int(args.memory_cap_mb * 2**20),
            ttl_s=args.session_ttl,
            max_sessions_per_identity=args.quota_sessions,
        )
        limits = ServiceLimits(
            max_tokens_per_step=args.max_tokens_per_step,
            cloud_optimizer=not args.no_cloud_optimizer,
            max_lora_rank=args.max_lora_rank,
            max_lora_targets=args.max_lora_targets,
        )
        batching = (
            None
            if args.no_batching
            else BatchingConfig(
                window_ms=args.batch_window_ms,
                max_tokens=args.batch_max_tokens,
                backward_wait_ms=args.batch_backward_wait_ms,
            )
        )
        if args.ray:
            from .ray_backend import RayBackbone

            service = RayBackbone(
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
        else:
            service = BackboneService(loaded, layout, store, limits, batching=batching)
        metrics = Metrics()
        if args.metrics_port:
            metrics.serve(args.metrics_port, args.metrics_listen.strip("[]"))
            if not _is_loopback(args.metrics_listen):
                log.warning(
                    "--metrics-listen %s: metrics are served over plain HTTP without authentication to every "
                    "host that can reach %s:%d",
                    args.metrics_listen,
                    args.metrics_listen,
                    args.metrics_port,
                )
        if tls_dir is not None and args.no_client_auth:
            log.warning(
                "--no-client-auth: any client that trusts the CA may connect; sessions are not tied to identities"
            )
        offsite = OffsiteService(
            loaded.model,
            loaded.model_id,
            layout,
            args.adapter_registry,
            args.emulator,
            quota_bytes=int(args.registry_quota_mb * 2**20),
            max_adapters=args.registry_max_adapters,
        )
        serving = GenerationService(
            loaded,
            offsite,
            ServingConfig(  # after the service: it adds slots to the other blocks
                window_ms=args.generate_window_ms,
                max_batch=args.generate_max_batch,
                max_new_tokens=args.generate_max_new_tokens,
                default_new_tokens=min(64, args.generate_max_new_tokens),
                adapter_cache=args.generate_adapter_cache,
            ),
        )
        server, port = build_server(
            service,
            args.listen,
            tls_dir,
            workers=args.workers,
            mutual=not args.no_client_auth,
            quotas=QuotaConfig(bytes_per_s=args.quota_mbps * 2**20),
            require_sealing=args.require_sealing,
            metrics=metrics,
            offsite=offsite,
            serving=serving,
            max_downloads=args.max_downloads,
            download_deadline_s=args.download_timeout,
        )
    except (StageError, OSError, ValueError) as e:
        print(f"cloud serve: {e}", file=sys.stderr)
        return 2
    host = args.listen.rsplit(":", 1)[0]
    # One machine-readable line on stdout: tests and scripts wait for it.
    print(
        f"tandem cloud serving {loaded.model_id} on {host}:{port} ({'plaintext' if tls_dir is None else 'TLS, CA ' + os.path.join(tls_dir, 'ca.pem')})",
        flush=True,
    )
    serve_forever(server, service)
    # Exit now: handler threads stuck past the drain time must not keep the process alive (interpreter exit joins them).
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


def _certs_init(args) -> int:
    from .tls import init_ca

    try:
        init_ca(args.dir, hosts=tuple(args.host), force=args.force)
    except OSError as e:
        print(f"cloud certs init: {e}", file=sys.stderr)
        return 2
    print(f"created CA and server certificate in {args.dir}; give data owners {os.path.join(args.dir, 'ca.pem')}")
    if args.force:
        print(
            "the CA was replaced: identity bundles issued before no longer connect; re-issue them with "
            "`cloud certs issue NAME --force`"
        )
    return 0


def _certs_issue(args) -> int:
    from .tls import issue_bundle

    try:
        path = issue_bundle(args.dir, args.name, days=args.days, replace=args.force)
    except ValueError as e:
        print(f"cloud certs issue: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"cloud certs issue: {e} (run `cloud certs init --dir {args.dir}` first?)", file=sys.stderr)
        return 2
    if args.force:
        print(f"the previous certificate of {args.name!r}, if any, is revoked: its bundle no longer connects")
    print(
        f"issued identity {args.name!r}: {path} (give it to the data owner: `client tune --identity {os.path.basename(path)}`; it holds a private key)"
    )
    return 0


def _certs_revoke(args) -> int:
    from .tls import revoke

    try:
        serial = revoke(args.dir, args.name)
    except FileNotFoundError as e:
        print(f"cloud certs revoke: {e}", file=sys.stderr)
        return 2
    print(f"revoked identity {args.name!r} (serial {serial}); running servers refuse it from the next call")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cloud", description="tandem cloud: serve a frozen LLM backbone for split fine-tuning."
    )
    p.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING); default INFO")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser(
        "serve",
        help="serve the model's middle blocks over gRPC",
        description="Serve the frozen middle of a causal LM. Clients run the embeddings, the first K and "
        "last M blocks and the head themselves, and own every adapter.",
    )
    s.add_argument(
        "--model", default=None, help="Hugging Face causal-LM directory; default: the embedded SmolLM2-135M-Instruct"
    )
    s.add_argument(
        "--listen",
        default="127.0.0.1:50051",
        help="HOST:PORT to listen on (port 0 picks a free one); default 127.0.0.1:50051",
    )
    s.add_argument(
        "--client-blocks",
        default="2:2",
        metavar="K:M",
        help="blocks the client runs below (K) and above (M) the cloud; default 2:2",
    )
    s.add_argument(
        "--tls-dir",
        default=DEFAULT_TLS_DIR,
        help=f"directory with ca.pem/server.pem/server.key, created on first use; default {DEFAULT_TLS_DIR}",
    )
    s.add_argument(
        "--insecure",
        action="store_true",
        help="serve plaintext gRPC (no TLS); only for trusted networks, prints a warning; refused on a "
        "non-loopback --listen unless --insecure-public is given too",
    )
    s.add_argument(
        "--insecure-public",
        action="store_true",
        help="with --insecure: allow plaintext on a non-loopback --listen (e.g. 0.0.0.0), where anyone on "
        "the network can read activations, gradients and adapters",
    )
    s.add_argument("--max-sessions", type=int, default=64, help="open sessions at once; default 64")
    s.add_argument(
        "--memory-cap-mb",
        type=float,
        default=8192,
        help="cap on memory held for sessions, all together, in MiB: forward state kept for backward (checked "
        "from the request's shape before it runs) and remote LoRAs with their cloud-optimizer state; default 8192",
    )
    s.add_argument(
        "--session-ttl",
        type=float,
        default=600,
        help="seconds of inactivity after which a session is closed and freed; default 600",
    )
    s.add_argument(
        "--max-tokens-per-step",
        type=int,
        default=64 * 1024,
        help="largest batch*seq_len accepted in one request; default 65536",
    )
    s.add_argument(
        "--no-client-auth",
        action="store_true",
        help="TLS without client certificates (every caller is 'anonymous'); default: mutual TLS",
    )
    s.add_argument(
        "--quota-sessions",
        type=int,
        default=8,
        help="open sessions per identity (0 = only --max-sessions applies); default 8",
    )
    s.add_argument(
        "--max-lora-rank", type=int, default=256, help="largest LoRA rank a session may ask for; default 256"
    )
    s.add_argument(
        "--max-lora-targets", type=int, default=16, help="most target module names in one session's LoRA; default 16"
    )
    s.add_argument(
        "--quota-mbps",
        type=float,
        default=0.0,
        help="MiB/s per identity, every byte of every call both ways (requests, responses, downloads, "
        "pushes); a 4 s burst, so one request above 4x this is refused outright (0 = unlimited)",
    )
    s.add_argument(
        "--no-cloud-optimizer",
        action="store_true",
        help="refuse sessions that ask this server to run their remote LoRA's AdamW (`client tune "
        "--cloud-optimizer`); such a session keeps its remote LoRA and both AdamW moments here (3x the "
        "LoRA: 4.8 MB for SmolLM2 at r=8 on q,v) until it closes, counted in --memory-cap-mb",
    )
    s.add_argument(
        "--require-sealing",
        action="store_true",
        help="refuse sessions whose tensors are not sealed (X25519 + AES-256-GCM on top of TLS)",
    )
    s.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve Prometheus metrics at http://METRICS_LISTEN:PORT/metrics (0 = off)",
    )
    s.add_argument(
        "--metrics-listen",
        default="127.0.0.1",
        metavar="HOST",
        help="address the metrics server binds (plain HTTP, no authentication; whatever --listen is); default 127.0.0.1",
    )
    s.add_argument(
        "--emulator",
        default=None,
        metavar="PKG",
        help="Offsite-Tuning: hand out this emulator package (`cloud emulator build`) to `client fetch-emulator`; default: none",
    )
    s.add_argument(
        "--adapter-registry",
        default=DEFAULT_REGISTRY,
        metavar="DIR",
        help=f"where adapters uploaded with `client push` are registered; default {DEFAULT_REGISTRY}",
    )
    s.add_argument(
        "--registry-quota-mb",
        type=float,
        default=1024,
        help="adapter registry disk per identity, in MiB (0 = unlimited); default 1024",
    )
    s.add_argument(
        "--registry-max-adapters",
        type=int,
        default=64,
        help="adapters one identity may register (0 = unlimited); default 64",
    )
    s.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="run the middle blocks on a Ray cluster at ADDRESS (host:port of its GCS), or 'local' to start one in-process",
    )
    s.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="with --ray: copies of the middle stage; sessions stick to one; default 1",
    )
    s.add_argument(
        "--pipeline",
        type=int,
        default=1,
        help="with --ray: split the middle blocks across this many actors per replica; default 1",
    )
    s.add_argument(
        "--ray-shard-resources",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="with --ray: Ray custom resources each pipeline shard requires, one object per shard, e.g. "
        '\'[{"node_a": 1}, {"node_b": 1}]\' to pin shards to nodes started with `ray start --resources`; default none',
    )
    s.add_argument("--actor-cpus", type=float, default=1.0, help="with --ray: CPUs Ray reserves per actor; default 1")
    s.add_argument(
        "--no-batching",
        action="store_true",
        help="run each session's requests alone instead of batching concurrent sessions through one pass "
        "(batched results equal unbatched up to float rounding; a session alone in a batch is bit-exact)",
    )
    s.add_argument(
        "--batch-window-ms",
        type=float,
        default=5.0,
        help="how long an idle server waits for other sessions' requests to join a batch; default 5",
    )
    s.add_argument(
        "--batch-max-tokens",
        type=int,
        default=16384,
        help="most tokens (all sessions) in one batched pass; default 16384",
    )
    s.add_argument(
        "--batch-backward-wait-ms",
        type=float,
        default=200.0,
        help="how long a backward waits for the other sessions of its batch before running without them; default 200",
    )
    s.add_argument(
        "--generate-window-ms",
        type=float,
        default=10.0,
        help="Generate: after the first waiting request, how long to collect others (any adapter) into one decode batch; default 10",
    )
    s.add_argument(
        "--generate-max-batch",
        type=int,
        default=32,
        help="Generate: most prompts decoded in one batch, and per request; default 32",
    )
    s.add_argument(
        "--generate-max-new-tokens", type=int, default=256, help="Generate: cap on new tokens per prompt; default 256"
    )
    s.add_argument(
        "--generate-adapter-cache",
        type=int,
        default=16,
        help="Generate: adapters kept loaded in memory (least recently used dropped); default 16",
    )
    s.add_argument(
        "--workers",
        type=int,
        default=8,
        help="gRPC worker threads; every waiting request holds one, so a batch can gather at most this many sessions; default 8",
    )
    s.add_argument(
        "--max-downloads",
        type=int,
        default=4,
        help="downloads (client stages, emulator) streamed at once (at most --workers minus 2, so health checks and "
        "training calls always find a worker); more are refused as overloaded; default 4",
    )
    s.add_argument(
        "--download-timeout",
        type=float,
        default=600.0,
        help="seconds after which a download still streaming is cancelled (a reader that stopped reading); default 600",
    )
    s.add_argument("--threads", type=int, default=0, help="torch compute threads (0 = torch's default)")
    s.set_defaults(func=_serve)

    c = sub.add_parser("certs", help="certificates for TLS")
    csub = c.add_subparsers(dest="certs_cmd", required=True)
    ci = csub.add_parser("init", help="create a local CA and a server certificate")
    ci.add_argument("--dir", default=DEFAULT_TLS_DIR, help=f"where to write them; default {DEFAULT_TLS_DIR}")
    ci.add_argument(
        "--host",
        action="append",
        default=["localhost", "127.0.0.1", "::1"],
        help="host name or IP the server certificate is valid for (repeatable); localhost and loopback always included",
    )
    ci.add_argument(
        "--force",
        action="store_true",
        help="replace an existing CA in --dir; every identity bundle issued from the old one stops working",
    )
    ci.set_defaults(func=_certs_init)
    cs = csub.add_parser("issue", help="issue a data owner's identity bundle (key + certificate + CA, one PEM file)")
    cs.add_argument("name", help="the identity's name (letters, digits, '-', '_', '.'); sessions belong to it")
    cs.add_argument("--dir", default=DEFAULT_TLS_DIR, help=f"the CA directory; default {DEFAULT_TLS_DIR}")
    cs.add_argument("--days", type=int, default=365, help="validity in days; default 365")
    cs.add_argument(
        "--force",
        action="store_true",
        help="NAME was issued before: revoke its current certificate and issue a new bundle in its place",
    )
    cs.set_defaults(func=_certs_issue)
    cr = csub.add_parser(
        "revoke", help="revoke a data owner's current certificate (takes effect on the next call, no restart)"
    )
    cr.add_argument(
        "name",
        help="the identity whose certificate to revoke (by serial: `cloud certs issue NAME --force` issues a working one again)",
    )
    cr.add_argument("--dir", default=DEFAULT_TLS_DIR, help=f"the CA directory; default {DEFAULT_TLS_DIR}")
    cr.set_defaults(func=_certs_revoke)
    add_emulator_parser(sub)
    return p


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
