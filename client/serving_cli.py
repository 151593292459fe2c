"""`client generate`: text from the cloud's model with a registered adapter applied (adapter serving)."""

from __future__ import annotations

import argparse
import json

from . import flags


def run_generate(args: argparse.Namespace) -> int:
    """Prints each completion (blank-line separated), or the whole result as JSON with --json."""
    from .serving import generate

    result = generate(
        flags.transport_config(args),
        args.prompt,
        args.adapter,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(result))
        return 0
    for i, completion in enumerate(result["completions"]):
        if i:
            print()
        print(completion["text"])
    return 0


def add_generate_parser(sub) -> None:
    """Adds `generate` to the `client` command line."""
    parser = sub.add_parser(
        "generate",
        help="generate text on the cloud with an adapter you pushed (or the base model)",
        description="Continue each prompt on the cloud's model with a registered adapter applied (see "
        "`client push`). Requests for different adapters are batched together on the server; "
        "each result is what generating alone gives (up to float rounding).",
    )
    parser.add_argument(
        "--adapter",
        default="",
        metavar="NAME",
        help="registered adapter name (`client push --name`): yours, or one another identity pushed with --public; "
        "default: none, the base model",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        required=True,
        metavar="TEXT",
        help="text to continue (repeatable: one completion per prompt, printed in order, blank-line separated)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=flags.nonneg_int,
        default=0,
        metavar="N",
        help="tokens to generate per prompt at most; default: the server's default (64), capped by the server",
    )
    parser.add_argument(
        "--temperature",
        type=flags.nonneg_float,
        default=0.0,
        metavar="T",
        help="0 for greedy decoding (default); > 0 samples at this temperature",
    )
    parser.add_argument(
        "--seed",
        type=flags.nonneg_int,
        default=0,
        metavar="S",
        help="seed of the sampling with --temperature; the same seed gives the same text; default 0",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the full result (token ids, counts, finish reasons, bytes) as JSON"
    )
    flags.add_transport_flags(parser)
    parser.set_defaults(func=run_generate)
