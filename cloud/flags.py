"""The cloud's command-line set-up: default paths and the flags its commands share."""

from __future__ import annotations

import argparse
import os

DEFAULT_TLS_DIR = os.path.join(os.path.expanduser("~"), ".tandem", "tls")
# The registry's own default (cloud/registry.py), repeated so that parsing flags does not import torch.
DEFAULT_REGISTRY = os.path.join(os.path.expanduser("~"), ".tandem", "adapters")
# cloud serve --memory-cap-mb, and what `cloud plan` sizes sessions against.
DEFAULT_MEMORY_CAP_MB = 8192


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=0, help="torch compute threads (0 = torch's default)")


def apply_threads(args: argparse.Namespace) -> None:
    """Sets torch's compute threads when --threads asks for a number."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
