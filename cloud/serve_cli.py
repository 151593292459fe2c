"""`cloud serve`: its flags, and the run that checks them, builds the services and serves until stopped."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from . import flags


def run_serve(args: argparse.Namespace) -> int:
    """Serves until stopped, then exits the process; 2 (one line on stderr) when the flags cannot serve."""
    from tandem.stages.errors import StageError
    from tandem.stages.loading import load_model
    from tandem.stages.modules import StageLayout

    from . import serve_steps as steps
    from .server import serve_forever

    problem = steps.exposure_problem(args) or steps.placement_problem(args)
    if problem:
        print(f"cloud serve: {problem}", file=sys.stderr)
        return 2
    tls_dir = steps.prepare_process(args)
    try:
        loaded = load_model(args.model, args.device, args.dtype)
        layout = StageLayout.parse(args.client_blocks, loaded.config)
        backbone = steps.build_backbone(args, loaded, layout)
        metrics = steps.start_metrics(args)
        steps.warn_without_client_auth(args, tls_dir)
        adapter_services = steps.build_adapter_services(args, loaded, layout)
        server, port = steps.start_server(args, backbone, tls_dir, metrics, adapter_services)
    except (StageError, OSError, ValueError) as e:
        print(f"cloud serve: {e}", file=sys.stderr)
        return 2
    host = args.listen.rsplit(":", 1)[0]
    # One machine-readable line on stdout: tests and scripts wait for it.
    print(
        f"tandem cloud serving {loaded.model_id} on {host}:{port} ({'plaintext' if tls_dir is None else 'TLS, CA ' + os.path.join(tls_dir, 'ca.pem')})",
        flush=True,
    )
    serve_forever(server, backbone)
    # Exit now: handler threads stuck past the drain time must not keep the process alive (interpreter exit joins them).
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


def add_serve_parser(sub) -> None:
    """Adds `serve` to the `cloud` command line."""
    parser = sub.add_parser(
        "serve",
        help="serve the model's middle blocks over gRPC",
        description="Serve the frozen middle of a causal LM. Clients run the embeddings, the first K and "
        "last M blocks and the head themselves, and own every adapter.",
    )
    _add_listen_flags(parser)
    flags.add_placement_flags(parser)
    _add_session_flags(parser)
    _add_identity_flags(parser)
    _add_metrics_flags(parser)
    _add_adapter_flags(parser)
    _add_ray_flags(parser)
    _add_batching_flags(parser)
    _add_generate_flags(parser)
    _add_worker_flags(parser)
    flags.add_threads_flag(parser)
    parser.set_defaults(func=run_serve)


def _add_listen_flags(parser: argparse.ArgumentParser) -> None:
    """The model, where it is served, and how the connection is secured."""
    parser.add_argument(
        "--model", default=None, help="Hugging Face causal-LM directory; default: the embedded SmolLM2-135M-Instruct"
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:50051",
        help="HOST:PORT to listen on (port 0 picks a free one); default 127.0.0.1:50051",
    )
    parser.add_argument(
        "--client-blocks",
        default="2:2",
        metavar="K:M",
        help="blocks the client runs below (K) and above (M) the cloud; default 2:2",
    )
    parser.add_argument(
        "--tls-dir",
        default=flags.DEFAULT_TLS_DIR,
        help=f"directory with ca.pem/server.pem/server.key, created on first use; default {flags.DEFAULT_TLS_DIR}",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="serve plaintext gRPC (no TLS); only for trusted networks, prints a warning; refused on a "
        "non-loopback --listen unless --insecure-public is given too",
    )
    parser.add_argument(
        "--insecure-public",
        action="store_true",
        help="with --insecure: allow plaintext on a non-loopback --listen (e.g. 0.0.0.0), where anyone on "
        "the network can read activations, gradients and adapters",
    )


def _add_session_flags(parser: argparse.ArgumentParser) -> None:
    """Limits on the sessions, all identities together."""
    parser.add_argument("--max-sessions", type=int, default=64, help="open sessions at once; default 64")
    parser.add_argument(
        "--memory-cap-mb",
        type=float,
        default=flags.DEFAULT_MEMORY_CAP_MB,
        help="cap on memory held for sessions, all together, in MiB: forward state kept for backward (checked "
        "from the request's shape before it runs) and remote LoRAs with their cloud-optimizer state; default 8192",
    )
    parser.add_argument(
        "--forward-state",
        choices=("keep", "recompute", "auto"),
        default="auto",
        help="what a training step keeps in the cloud between its Forward and its Backward: keep (the whole "
        "autograd graph: fastest; 449 MiB for a 4x128 SmolLM2 step), recompute (only the middle's input, mask, "
        "dropout seed and a reference to the LoRA it used: 1.1 MiB there; the Backward reruns the forward "
        "first: 1.4-1.7x the compute on a CPU, results bit-exact with keep), or auto: recompute on a GPU device, keep "
        "on the CPU; --memory-cap-mb counts the chosen mode's state (Ray shards always keep); default auto",
    )
    parser.add_argument(
        "--session-ttl",
        type=float,
        default=600,
        help="seconds of inactivity after which a session is closed and freed; default 600",
    )
    parser.add_argument(
        "--max-cache-tokens",
        type=int,
        default=4096,
        help="private generation (client generate --private): most cached positions (batch x length) of one session's "
        "KV cache; its worst case counts in --memory-cap-mb for the session's life; default 4096",
    )
    parser.add_argument(
        "--max-tokens-per-step",
        type=int,
        default=64 * 1024,
        help="largest batch*seq_len accepted in one request; default 65536",
    )


def _add_identity_flags(parser: argparse.ArgumentParser) -> None:
    """Client authentication and what one identity's session may ask for."""
    parser.add_argument(
        "--no-client-auth",
        action="store_true",
        help="TLS without client certificates (every caller is 'anonymous'); default: mutual TLS",
    )
    parser.add_argument(
        "--quota-sessions",
        type=int,
        default=8,
        help="open sessions per identity (0 = only --max-sessions applies); default 8",
    )
    parser.add_argument(
        "--max-lora-rank", type=int, default=256, help="largest LoRA rank a session may ask for; default 256"
    )
    parser.add_argument(
        "--max-lora-targets", type=int, default=16, help="most target module names in one session's LoRA; default 16"
    )
    parser.add_argument(
        "--quota-mbps",
        type=float,
        default=0.0,
        help="MiB/s per identity, every byte of every call both ways (requests, responses, downloads, "
        "pushes); a 4 s burst, so one request above 4x this is refused outright (0 = unlimited)",
    )
    parser.add_argument(
        "--no-cloud-optimizer",
        action="store_true",
        help="refuse sessions that ask this server to run their remote LoRA's AdamW (`client tune "
        "--cloud-optimizer`); such a session keeps its remote LoRA and both AdamW moments here (3x the "
        "LoRA: 4.8 MB for SmolLM2 at r=8 on q,v) until it closes, counted in --memory-cap-mb",
    )
    parser.add_argument(
        "--require-sealing",
        action="store_true",
        help="refuse sessions whose tensors are not sealed (X25519 + AES-256-GCM on top of TLS)",
    )


def _add_metrics_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve Prometheus metrics at http://METRICS_LISTEN:PORT/metrics (0 = off)",
    )
    parser.add_argument(
        "--metrics-listen",
        default="127.0.0.1",
        metavar="HOST",
        help="address the metrics server binds (plain HTTP, no authentication; whatever --listen is); default 127.0.0.1",
    )


def _add_adapter_flags(parser: argparse.ArgumentParser) -> None:
    """The emulator package handed out and the adapter registry."""
    parser.add_argument(
        "--emulator",
        default=None,
        metavar="PKG",
        help="Offsite-Tuning: hand out this emulator package (`cloud emulator build`) to `client fetch-emulator`; default: none",
    )
    parser.add_argument(
        "--adapter-registry",
        default=flags.DEFAULT_REGISTRY,
        metavar="DIR",
        help=f"where adapters uploaded with `client push` are registered; default {flags.DEFAULT_REGISTRY}",
    )
    parser.add_argument(
        "--registry-quota-mb",
        type=float,
        default=1024,
        help="adapter registry disk per identity, in MiB (0 = unlimited); default 1024",
    )
    parser.add_argument(
        "--registry-max-adapters",
        type=int,
        default=64,
        help="adapters one identity may register (0 = unlimited); default 64",
    )


def _add_ray_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="run the middle blocks on a Ray cluster at ADDRESS (host:port of its GCS), or 'local' to start one in-process",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="with --ray: copies of the middle stage; sessions stick to one; default 1",
    )
    parser.add_argument(
        "--pipeline",
        type=int,
        default=1,
        help="with --ray: split the middle blocks across this many actors per replica; default 1",
    )
    parser.add_argument(
        "--ray-shard-resources",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="with --ray: Ray custom resources each pipeline shard requires, one object per shard, e.g. "
        '\'[{"node_a": 1}, {"node_b": 1}]\' to pin shards to nodes started with `ray start --resources`; default none',
    )
    parser.add_argument(
        "--actor-cpus", type=float, default=1.0, help="with --ray: CPUs Ray reserves per actor; default 1"
    )


def _add_batching_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-batching",
        action="store_true",
        help="run each session's requests alone instead of batching concurrent sessions through one pass "
        "(batched results equal unbatched up to float rounding; a session alone in a batch is bit-exact)",
    )
    parser.add_argument(
        "--batch-window-ms",
        type=float,
        default=5.0,
        help="how long an idle server waits for other sessions' requests to join a batch; default 5",
    )
    parser.add_argument(
        "--batch-max-tokens",
        type=int,
        default=16384,
        help="most tokens (all sessions) in one batched pass; default 16384",
    )
    parser.add_argument(
        "--batch-backward-wait-ms",
        type=float,
        default=200.0,
        help="how long a backward waits for the other sessions of its batch before running without them; default 200",
    )


def _add_generate_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--generate-window-ms",
        type=float,
        default=10.0,
        help="Generate: after the first waiting request, how long to collect others (any adapter) into one decode batch; default 10",
    )
    parser.add_argument(
        "--generate-max-batch",
        type=int,
        default=32,
        help="Generate: most prompts decoded in one batch, and per request; default 32",
    )
    parser.add_argument(
        "--generate-max-new-tokens", type=int, default=256, help="Generate: cap on new tokens per prompt; default 256"
    )
    parser.add_argument(
        "--generate-adapter-cache",
        type=int,
        default=16,
        help="Generate: adapters kept loaded in memory (least recently used dropped); default 16",
    )


def _add_worker_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        type=int,
        default=8,
        help="gRPC worker threads; every waiting request holds one, so a batch can gather at most this many sessions; default 8",
    )
    parser.add_argument(
        "--max-downloads",
        type=int,
        default=4,
        help="downloads (client stages, emulator) streamed at once (at most --workers minus 2, so health checks and "
        "training calls always find a worker); more are refused as overloaded; default 4",
    )
    parser.add_argument(
        "--download-timeout",
        type=float,
        default=600.0,
        help="seconds after which a download still streaming is cancelled (a reader that stopped reading); default 600",
    )
