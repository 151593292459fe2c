"""The cloud's command-line set-up: default paths and the flags its commands share."""

from __future__ import annotations

import argparse
import os

DEFAULT_TLS_DIR = os.path.join(os.path.expanduser("~"), ".tandem", "tls")
# Where `client push` uploads are registered (cloud/registry.py); here, so that parsing flags does not import torch.
DEFAULT_REGISTRY = os.path.join(os.path.expanduser("~"), ".tandem", "adapters")
# cloud serve --memory-cap-mb, and what `cloud plan` sizes sessions against.
DEFAULT_MEMORY_CAP_MB = 8192


def add_placement_flags(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype: where the frozen weights compute (checked before the model loads; stages/precision.py)."""
    parser.add_argument(
        "--device",
        default="auto",
        metavar="auto|cpu|cuda[:N]",
        help="where the frozen weights compute: auto (the first CUDA GPU when there is one, else the CPU), cpu, "
        "cuda or cuda:N; with --ray, each shard asks Ray for a GPU when this is cuda; default auto",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        metavar="auto|float32|bfloat16|float16",
        help="compute dtype of the frozen weights, which load directly in it: auto (the checkpoint's dtype on a "
        "GPU, float32 on a CPU), float32, bfloat16 or float16. Remote LoRAs and cloud-optimizer state stay "
        "float32; what crosses the wire follows each session's codec, not this. float32 is bit-exact with "
        "local mode; bfloat16/float16 agree with local mode in the same dtype within rounding; default auto",
    )


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=0, help="torch compute threads (0 = torch's default)")


def apply_threads(args: argparse.Namespace) -> None:
    """Sets torch's compute threads when --threads asks for a number."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
