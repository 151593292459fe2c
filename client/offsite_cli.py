"""`client push | eval | fetch-emulator | generate`: the data owner's Offsite-Tuning and adapter-serving commands."""

from __future__ import annotations

import json

from . import flags
from .data import MAX_VAL_SEQUENCES
from .transport import DEFAULT_IDENTITY


def _transport_flags(p) -> None:
    p.add_argument(
        "--server",
        default="127.0.0.1:50051",
        type=flags.server_address,
        help="HOST:PORT of `cloud serve`; default 127.0.0.1:50051",
    )
    p.add_argument(
        "--identity",
        default=DEFAULT_IDENTITY,
        help=f"your identity bundle from the operator; default {DEFAULT_IDENTITY} when it exists",
    )
    p.add_argument(
        "--ca", default=None, help="CA certificate (PEM) that signed the server's certificate; default: the bundle's CA"
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC, no TLS (only against a server started with --insecure); warns",
    )
    p.add_argument(
        "--timeout", type=flags.positive_float, default=300.0, help="deadline of one call, seconds; default 300"
    )
    p.add_argument(
        "--retries", type=flags.nonneg_int, default=8, help="retries while the server is unreachable or busy; default 8"
    )


def _adapter_dir(path: str) -> None:
    import os

    from .errors import ClientError

    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ClientError(
            f"--adapter {path!r} is not an adapter directory (no adapter_config.json); pass the "
            "adapter/ folder of a `client tune` run"
        )


def _tcfg(args, **kw):
    from .transport import TransportConfig

    return TransportConfig(
        server=args.server,
        insecure=args.insecure,
        ca=args.ca,
        identity=args.identity,
        timeout_s=args.timeout,
        retries=args.retries,
        **kw,
    )


def _push(args) -> int:
    from .offsite import push_adapter

    _adapter_dir(args.adapter)
    r = push_adapter(_tcfg(args), args.adapter, args.name, public=args.public)
    what = "already registered" if r["already_registered"] else "registered"
    who = "every identity" if r["public"] else f"only {r['owner']!r}"
    print(
        f"{what} {r['name']} (sha256 {r['sha256'][:16]}, {r['params']:,} values, blocks {r['blocks']}) for "
        f"{r['model_id']}; usable by {who}; uploaded {r['bytes_sent']:,} bytes"
    )
    return 0


def _eval(args) -> int:
    from .data import data_files
    from .offsite import eval_plugin
    from .rundir import check_writable

    _adapter_dir(args.adapter)
    data_files(args.data, warn=True)  # before any network call
    check_writable(args.out)
    r = eval_plugin(
        _tcfg(args, seal=not args.no_seal),
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
    v = r["validation"]
    print(
        f"validation ({v['sequences']} sequences): zero-shot ppl {v['zero_shot']['ppl']:.3f} -> plugged-in ppl "
        f"{v['plugged_in']['ppl']:.3f}; report: {args.out}/eval.json"
    )
    return 0


def _fetch(args) -> int:
    from .offsite import fetch_emulator
    from .rundir import check_creatable

    check_creatable(args.out, "--out")
    r = fetch_emulator(_tcfg(args), args.out)
    print(json.dumps(r))
    return 0


def _generate(args) -> int:
    from .serving import generate

    r = generate(
        _tcfg(args),
        args.prompt,
        args.adapter,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(r))
        return 0
    for i, c in enumerate(r["completions"]):
        if i:
            print()
        print(c["text"])
    return 0


def add_offsite_parsers(sub) -> None:
    """Adds push, eval, fetch-emulator and generate to the `client` command line."""
    p = sub.add_parser(
        "push", help="upload a tuned adapter (only the adapter) to the cloud, which validates and registers it"
    )
    p.add_argument("--adapter", required=True, metavar="DIR", help="the adapter/ directory of a `client tune` run")
    p.add_argument("--name", default="", help="name to register it under; default: derived from its SHA-256")
    p.add_argument(
        "--public",
        action="store_true",
        help="let every identity on the server list it and generate with it (an adapter can reveal what it "
        "was tuned on); default: only your identity. Pushing again without --public makes it private",
    )
    _transport_flags(p)
    p.set_defaults(func=_push)

    e = sub.add_parser(
        "eval",
        help="measure an adapter plugged into the full model, through the split path",
        description="Evaluate the adapter in the full model on your validation split (the same split as "
        "`client tune` with the same --seed/--seq-len/--val-fraction). Your text stays here.",
    )
    e.add_argument("--adapter", required=True, metavar="DIR", help="the adapter/ directory of a `client tune` run")
    e.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="the data directory the adapter was tuned on (its validation split is used)",
    )
    e.add_argument("--out", default="tandem-eval", metavar="DIR", help="where eval.json goes; default ./tandem-eval")
    e.add_argument("--name", default="", help="also check that the server registered this adapter under NAME")
    e.add_argument(
        "--seq-len", type=flags.seq_len, default=128, help="tokens per packed sequence (as in tune); default 128"
    )
    e.add_argument("--batch-size", type=flags.positive_int, default=4, help="sequences per evaluation batch; default 4")
    e.add_argument(
        "--seed", type=flags.nonneg_int, default=0, help="seed of the train/validation split (as in tune); default 0"
    )
    e.add_argument(
        "--val-fraction", type=flags.open_fraction, default=0.1, help="validation share (as in tune); default 0.1"
    )
    e.add_argument(
        "--val-max-sequences",
        type=flags.positive_int,
        default=MAX_VAL_SEQUENCES,
        help=f"the validation set's cap (as in tune); default {MAX_VAL_SEQUENCES}",
    )
    e.add_argument("--no-seal", action="store_true", help="do not seal tensors end to end (TLS still applies)")
    _transport_flags(e)
    e.set_defaults(func=_eval)

    f = sub.add_parser(
        "fetch-emulator", help="download the cloud's emulator package for offsite tuning (bytes accounted)"
    )
    f.add_argument("--out", required=True, metavar="PKG", help="package directory to write (replaced when it exists)")
    _transport_flags(f)
    f.set_defaults(func=_fetch)

    g = sub.add_parser(
        "generate",
        help="generate text on the cloud with an adapter you pushed (or the base model)",
        description="Continue each prompt on the cloud's model with a registered adapter applied (see "
        "`client push`). Requests for different adapters are batched together on the server; "
        "each result is what generating alone gives (up to float rounding).",
    )
    g.add_argument(
        "--adapter",
        default="",
        metavar="NAME",
        help="registered adapter name (`client push --name`): yours, or one another identity pushed with --public; "
        "default: none, the base model",
    )
    g.add_argument(
        "--prompt",
        action="append",
        required=True,
        metavar="TEXT",
        help="text to continue (repeatable: one completion per prompt, printed in order, blank-line separated)",
    )
    g.add_argument(
        "--max-new-tokens",
        type=flags.nonneg_int,
        default=0,
        metavar="N",
        help="tokens to generate per prompt at most; default: the server's default (64), capped by the server",
    )
    g.add_argument(
        "--temperature",
        type=flags.nonneg_float,
        default=0.0,
        metavar="T",
        help="0 for greedy decoding (default); > 0 samples at this temperature",
    )
    g.add_argument(
        "--seed",
        type=flags.nonneg_int,
        default=0,
        metavar="S",
        help="seed of the sampling with --temperature; the same seed gives the same text; default 0",
    )
    g.add_argument(
        "--json", action="store_true", help="print the full result (token ids, counts, finish reasons, bytes) as JSON"
    )
    _transport_flags(g)
    g.set_defaults(func=_generate)
