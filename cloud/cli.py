"""`cloud`: the model owner's command line (serve the backbone, manage certificates, build emulators, plan)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .certs_cli import add_certs_parser
from .offsite_cli import add_emulator_parser
from .plan_cli import add_plan_parser
from .serve_cli import add_serve_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloud",
        description="tandem cloud: serve a frozen LLM backbone for split fine-tuning, and size a deployment.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING); default INFO")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_serve_parser(sub)
    add_certs_parser(sub)
    add_emulator_parser(sub)
    add_plan_parser(sub)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
