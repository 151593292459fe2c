"""`client push | eval | fetch-emulator`: the data owner's Offsite-Tuning and adapter-registry commands."""

from __future__ import annotations

import argparse
import json

from . import flags
from .data import MAX_VAL_SEQUENCES


def check_adapter_dir(path: str) -> None:
    """Refuses (one line) an --adapter that is not the adapter/ folder of a run."""
    import os

    from .errors import ClientError

    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ClientError(
            f"--adapter {path!r} is not an adapter directory (no adapter_config.json); pass the "
            "adapter/ folder of a `client tune` run"
        )


def run_push(args: argparse.Namespace) -> int:
    from .offsite import push_adapter

    check_adapter_dir(args.adapter)
    result = push_adapter(flags.transport_config(args), args.adapter, args.name, public=args.public)
    what = "already registered" if result["already_registered"] else "registered"
    who = "every identity" if result["public"] else f"only {result['owner']!r}"
    print(
        f"{what} {result['name']} (sha256 {result['sha256'][:16]}, {result['params']:,} values, blocks "
        f"{result['blocks']}) for {result['model_id']}; usable by {who}; uploaded {result['bytes_sent']:,} bytes"
    )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from .data import data_files
    from .offsite import eval_plugin
    from .rundir import check_writable

    check_adapter_dir(args.adapter)
    data_files(args.data, warn=True)  # before any network call
    check_writable(args.out)
    result = eval_plugin(
        flags.transport_config(args, seal=not args.no_seal),
        args.adapter,
        args.data,
        args.out,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
        val_fraction=args.val_fraction,
        name=args.name,
        val_max=args.val_max_sequences,
    )
    validation = result["validation"]
    print(
        f"validation ({validation['sequences']} sequences): zero-shot ppl {validation['zero_shot']['ppl']:.3f} -> "
        f"plugged-in ppl {validation['plugged_in']['ppl']:.3f}; report: {args.out}/eval.json"
    )
    return 0


def run_fetch_emulator(args: argparse.Namespace) -> int:
    from .allowed_files import emulator_files
    from .download_target import check_replaceable
    from .offsite import fetch_emulator
    from .rundir import check_creatable

    check_creatable(args.out, "--out")
    check_replaceable(args.out, emulator_files(), "--out")  # before any network call: a user's files are kept
    print(json.dumps(fetch_emulator(flags.transport_config(args), args.out)))
    return 0


def add_offsite_parsers(sub) -> None:
    """Adds push, eval and fetch-emulator to the `client` command line."""
    _add_push_parser(sub)
    _add_eval_parser(sub)
    _add_fetch_emulator_parser(sub)


def _add_push_parser(sub) -> None:
    parser = sub.add_parser(
        "push", help="upload a tuned adapter (only the adapter) to the cloud, which validates and registers it"
    )
    parser.add_argument("--adapter", required=True, metavar="DIR", help="the adapter/ directory of a `client tune` run")
    parser.add_argument("--name", default="", help="name to register it under; default: derived from its SHA-256")
    parser.add_argument(
        "--public",
        action="store_true",
        help="let every identity on the server list it and generate with it (an adapter can reveal what it "
        "was tuned on); default: only your identity. Pushing again without --public makes it private",
    )
    flags.add_transport_flags(parser)
    parser.set_defaults(func=run_push)


def _add_eval_parser(sub) -> None:
    parser = sub.add_parser(
        "eval",
        help="measure an adapter plugged into the full model, through the split path",
        description="Evaluate the adapter in the full model on your validation split (the same split as "
        "`client tune` with the same --seed/--seq-len/--val-fraction). Your text stays here.",
    )
    parser.add_argument("--adapter", required=True, metavar="DIR", help="the adapter/ directory of a `client tune` run")
    parser.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="the data directory the adapter was tuned on (its validation split is used)",
    )
    parser.add_argument(
        "--out", default="tandem-eval", metavar="DIR", help="where eval.json goes; default ./tandem-eval"
    )
    parser.add_argument("--name", default="", help="also check that the server registered this adapter under NAME")
    parser.add_argument(
        "--seq-len", type=flags.seq_len, default=128, help="tokens per packed sequence (as in tune); default 128"
    )
    parser.add_argument(
        "--batch-size", type=flags.positive_int, default=4, help="sequences per evaluation batch; default 4"
    )
    parser.add_argument(
        "--seed", type=flags.nonneg_int, default=0, help="seed of the train/validation split (as in tune); default 0"
    )
    parser.add_argument(
        "--val-fraction", type=flags.open_fraction, default=0.1, help="validation share (as in tune); default 0.1"
    )
    parser.add_argument(
        "--val-max-sequences",
        type=flags.positive_int,
        default=MAX_VAL_SEQUENCES,
        help=f"the validation set's cap (as in tune); default {MAX_VAL_SEQUENCES}",
    )
    parser.add_argument("--no-seal", action="store_true", help="do not seal tensors end to end (TLS still applies)")
    flags.add_transport_flags(parser)
    parser.set_defaults(func=run_eval)


def _add_fetch_emulator_parser(sub) -> None:
    parser = sub.add_parser(
        "fetch-emulator", help="download the cloud's emulator package for offsite tuning (bytes accounted)"
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="PKG",
        help="package directory to write; an existing one is replaced only when it is empty or holds an "
        "emulator package (a directory of other files, such as a run, is refused and kept)",
    )
    flags.add_transport_flags(parser)
    parser.set_defaults(func=run_fetch_emulator)
