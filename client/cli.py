"""`client`: the data owner's command line; `tune`, `audit`, `report` and `sample-data` here, the rest registered."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import flags
from .errors import ClientError
from .offsite_cli import add_offsite_parsers
from .serving_cli import add_generate_parser
from .tune_flags import add_tune_parser


def run_audit(args: argparse.Namespace) -> int:
    """Attacks a run's recorded cloud view, stores the result in its report.json and prints it."""
    import json

    from . import report as rep
    from .privacy.audit import audit_run

    flags.apply_threads(args)
    report = rep.load(args.run_dir)
    report["privacy"] = audit_run(
        args.run_dir,
        report["config"],
        tokens=args.tokens,
        search_tokens=args.search_tokens,
        candidates=args.candidates,
        progress=not args.no_progress,
    )
    with open(os.path.join(args.run_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    rep.render_privacy(report["privacy"])
    return 0


def run_report(args: argparse.Namespace) -> int:
    from . import report as rep

    report = rep.load(args.run_dir)
    rep.render(report)
    png = rep.plot(report, os.path.join(args.run_dir, "report.png"))
    print(f"plot: {png}")
    return 0


def run_sample_data(args: argparse.Namespace) -> int:
    from .rundir import check_writable
    from .sample import write_sample

    check_writable(args.out)
    print(f"wrote sample data to {write_sample(args.out, n=args.n, seed=args.seed)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = flags.Parser(
        prog="client",
        description="tandem client: fine-tune a cloud-hosted LLM on private text that never leaves this machine.",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level (DEBUG, INFO, WARNING, ERROR); default WARNING",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_tune_parser(sub)
    _add_audit_parser(sub)
    _add_report_parser(sub)
    _add_sample_data_parser(sub)
    add_offsite_parsers(sub)
    add_generate_parser(sub)
    return parser


def _add_audit_parser(sub) -> None:
    parser = sub.add_parser(
        "audit",
        help="attack what the cloud received in a run (its privacy audit), and update its report",
        description="Attacks the requests recorded in RUN_DIR/cloud_view with the cloud's knowledge (the "
        "client-stage weights it shipped, public text) and measures token recovery and "
        "ROUGE-L against your text. Runs here; sends nothing.",
    )
    parser.add_argument("run_dir", help="the --out directory of a `client tune` run (split mode, or --audit yes)")
    parser.add_argument("--tokens", type=flags.positive_int, default=256, help="received tokens to attack; default 256")
    parser.add_argument(
        "--search-tokens",
        type=flags.nonneg_int,
        default=128,
        help="of those, tokens the (slowest) search attack tries; default 128",
    )
    parser.add_argument(
        "--candidates",
        type=flags.positive_int,
        default=8,
        help="candidate tokens per position for the search; default 8",
    )
    flags.add_compute_flags(parser)
    parser.set_defaults(func=run_audit)


def _add_report_parser(sub) -> None:
    parser = sub.add_parser("report", help="print a run's report and write report.png")
    parser.add_argument("run_dir", help="the --out directory of a `client tune` run")
    parser.set_defaults(func=run_report)


def _add_sample_data_parser(sub) -> None:
    parser = sub.add_parser("sample-data", help="write a small generated corpus to try tandem on")
    parser.add_argument("--out", default="sample-data", help="directory to write; default ./sample-data")
    parser.add_argument("--n", type=flags.positive_int, default=400, help="number of generated records; default 400")
    parser.add_argument("--seed", type=flags.nonneg_int, default=0, help="generator seed; default 0")
    parser.set_defaults(func=run_sample_data)


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from tandem.stages.errors import StageError

    umask = os.umask(0o077)  # what the client writes (runs, adapters, checkpoints, recorded traffic, caches) is private
    try:
        return args.func(args)
    except (ClientError, StageError) as e:
        print(f"client {args.cmd}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"client {args.cmd}: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr
        )
        return 130
    finally:
        os.umask(umask)  # main() may run inside another program (tests do)


if __name__ == "__main__":
    sys.exit(main())
