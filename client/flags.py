"""The client's argparse set-up: one-line errors, values checked as they are parsed, and the flags commands share."""

from __future__ import annotations

import argparse
import math

from .transport import DEFAULT_IDENTITY


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (the flag, what it needs, what it got) instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _number(kind, text: str):
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if kind is float and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _checked(kind, ok, need: str):
    def parse(text: str):
        v = _number(kind, text)
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
        return v

    parse.__name__ = need  # argparse names the type in some messages
    return parse


positive_int = _checked(int, lambda v: v >= 1, ">= 1")
nonneg_int = _checked(int, lambda v: v >= 0, ">= 0")
positive_float = _checked(float, lambda v: v > 0, "> 0")
nonneg_float = _checked(float, lambda v: v >= 0, ">= 0")
open_fraction = _checked(float, lambda v: 0 < v < 1, "between 0 and 1 (exclusive)")
dropout = _checked(float, lambda v: 0 <= v < 1, "in [0, 1)")
seq_len = _checked(int, lambda v: v >= 2, ">= 2")


def server_address(text: str) -> str:
    """HOST:PORT with a port in 1..65535 ([IPv6]:PORT too)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port in 1..65535, got {text!r}")
    return text


def block_split(text: str) -> str:
    """K:M (client blocks at the bottom and at the top), K >= 1 and M >= 0."""
    k, sep, m = text.partition(":")
    if not sep or not k.isdigit() or not m.isdigit() or int(k) < 1:
        raise argparse.ArgumentTypeError(f"expected K:M with K >= 1 and M >= 0 (e.g. 2:2), got {text!r}")
    return text


def lora_layers(text: str) -> str:
    """Full-model block indices: "28,29", "26-29" or a mix ("0,26-29"), each block once, and the words of
    tandem.stages.lora_layers.WORDS ("client,clusters"); checked here, resolved once the layout is known
    (tandem.client.placement)."""
    from tandem.stages.lora_layers import split_words

    try:
        split_words(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_server_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default="127.0.0.1:50051",
        type=server_address,
        help="HOST:PORT of `cloud serve`; default 127.0.0.1:50051",
    )


def add_insecure_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC, no TLS (only against a server started with --insecure); warns",
    )


def add_transport_flags(parser: argparse.ArgumentParser) -> None:
    """The connection flags of every command that talks to the server (tune has its own, longer help texts)."""
    add_server_flag(parser)
    parser.add_argument(
        "--identity",
        default=DEFAULT_IDENTITY,
        help=f"your identity bundle from the operator; default {DEFAULT_IDENTITY} when it exists",
    )
    parser.add_argument(
        "--ca", default=None, help="CA certificate (PEM) that signed the server's certificate; default: the bundle's CA"
    )
    add_insecure_flag(parser)
    parser.add_argument(
        "--timeout", type=positive_float, default=300.0, help="deadline of one call, seconds; default 300"
    )
    parser.add_argument(
        "--retries", type=nonneg_int, default=8, help="retries while the server is unreachable or busy; default 8"
    )


def transport_config(args: argparse.Namespace, **settings):
    """The TransportConfig the connection flags describe; `settings` adds the command's own (seal, codecs)."""
    from .errors import ClientError
    from .transport import TransportConfig

    if args.insecure and args.ca:  # plaintext checks no certificate and no signature: the CA would do nothing
        raise ClientError("--insecure talks plaintext and checks nothing, so it cannot go with --ca")
    return TransportConfig(
        server=args.server,
        insecure=args.insecure,
        ca=args.ca,
        identity=args.identity,
        timeout_s=args.timeout,
        retries=args.retries,
        **settings,
    )


def add_compute_flags(parser: argparse.ArgumentParser) -> None:
    """--threads and --no-progress, the last flags of the commands that compute."""
    parser.add_argument("--threads", type=nonneg_int, default=0, help="torch compute threads (0 = torch's default)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def apply_threads(args: argparse.Namespace) -> None:
    """Sets torch's compute threads when --threads asks for a number."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
