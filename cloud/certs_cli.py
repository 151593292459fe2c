"""`cloud certs init | issue | revoke`: the operator's certificate authority and data owners' identity bundles."""

from __future__ import annotations

import argparse
import os
import sys

from .flags import DEFAULT_TLS_DIR


def run_init(args: argparse.Namespace) -> int:
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


def run_issue(args: argparse.Namespace) -> int:
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


def run_revoke(args: argparse.Namespace) -> int:
    from .tls import revoke

    try:
        serial = revoke(args.dir, args.name)
    except FileNotFoundError as e:
        print(f"cloud certs revoke: {e}", file=sys.stderr)
        return 2
    print(f"revoked identity {args.name!r} (serial {serial}); running servers refuse it from the next call")
    return 0


def add_certs_parser(sub) -> None:
    """Adds `certs init | issue | revoke` to the `cloud` command line."""
    parser = sub.add_parser("certs", help="certificates for TLS")
    certs_sub = parser.add_subparsers(dest="certs_cmd", required=True)
    _add_init_parser(certs_sub)
    _add_issue_parser(certs_sub)
    _add_revoke_parser(certs_sub)


def _add_init_parser(certs_sub) -> None:
    parser = certs_sub.add_parser("init", help="create a local CA and a server certificate")
    parser.add_argument("--dir", default=DEFAULT_TLS_DIR, help=f"where to write them; default {DEFAULT_TLS_DIR}")
    parser.add_argument(
        "--host",
        action="append",
        default=["localhost", "127.0.0.1", "::1"],
        help="host name or IP the server certificate is valid for (repeatable); localhost and loopback always included",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing CA in --dir; every identity bundle issued from the old one stops working",
    )
    parser.set_defaults(func=run_init)


def _add_issue_parser(certs_sub) -> None:
    parser = certs_sub.add_parser(
        "issue", help="issue a data owner's identity bundle (key + certificate + CA, one PEM file)"
    )
    parser.add_argument("name", help="the identity's name (letters, digits, '-', '_', '.'); sessions belong to it")
    parser.add_argument("--dir", default=DEFAULT_TLS_DIR, help=f"the CA directory; default {DEFAULT_TLS_DIR}")
    parser.add_argument("--days", type=int, default=365, help="validity in days; default 365")
    parser.add_argument(
        "--force",
        action="store_true",
        help="NAME was issued before: revoke its current certificate and issue a new bundle in its place",
    )
    parser.set_defaults(func=run_issue)


def _add_revoke_parser(certs_sub) -> None:
    parser = certs_sub.add_parser(
        "revoke", help="revoke a data owner's current certificate (takes effect on the next call, no restart)"
    )
    parser.add_argument(
        "name",
        help="the identity whose certificate to revoke (by serial: `cloud certs issue NAME --force` issues a working one again)",
    )
    parser.add_argument("--dir", default=DEFAULT_TLS_DIR, help=f"the CA directory; default {DEFAULT_TLS_DIR}")
    parser.set_defaults(func=run_revoke)
