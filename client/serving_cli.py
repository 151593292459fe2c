"""`client generate`: text from the cloud's model with a registered adapter applied (adapter serving)."""

from __future__ import annotations

import argparse
import json

from . import flags


def run_generate(args: argparse.Namespace) -> int:
    """Prints each completion (blank-line separated), or the whole result as JSON with --json."""
    from .serving import generate

    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    if args.private:
        return run_private(args, settings)
    if args.out or args.no_seal:
        from .errors import ClientError

        raise ClientError("--out and --no-seal are options of --private generation; add --private")
    result = generate(flags.transport_config(args), args.prompt, args.adapter, **settings)
    if args.json:
        print(json.dumps(result))
        return 0
    for i, completion in enumerate(result["completions"]):
        if i:
            print()
        print(completion["text"])
    return 0


def run_private(args: argparse.Namespace, settings: dict) -> int:
    """`client generate --private`: the adapter stays here (client/private_generation.py)."""
    from .errors import ClientError
    from .private_generation import generate_private

    if not args.adapter:
        raise ClientError("--private needs --adapter RUN_DIR/adapter (the adapter/ directory of a `client tune` run)")
    transport_cfg = flags.transport_config(args, seal=not args.no_seal)
    result = generate_private(transport_cfg, args.prompt, args.adapter, out=args.out, **settings)
    if args.json:
        print(json.dumps(result))
        return 0
    for completion in result["completions"]:
        print(completion["text"], end="\n\n")
    print(
        f"{sum(len(c['token_ids']) for c in result['completions'])} tokens in {result['seconds']:.2f} s: "
        f"{result['tokens_per_s']:.1f} tokens/s, {result['bytes_per_token']:,.0f} bytes/token over the network "
        f"({result['forwards']} Forwards; the middle's LoRA: {result['lora_bytes']:,} bytes, once)"
    )
    return 0


def add_generate_parser(sub) -> None:
    """Adds `generate` to the `client` command line."""
    parser = sub.add_parser(
        "generate",
        help="generate text on the cloud with an adapter you pushed (or the base model), or with --private with an "
        "adapter that stays here",
        description="Continue each prompt on the cloud's model with a registered adapter applied (see "
        "`client push`). Requests for different adapters are batched together on the server; "
        "each result is what generating alone gives (up to float rounding). With --private, generation runs in "
        "split mode and the adapter is never pushed: the same tokens as the merged model, one round trip per token.",
    )
    parser.add_argument(
        "--adapter",
        default="",
        metavar="NAME",
        help="registered adapter name (`client push --name`): yours, or one another identity pushed with --public; "
        "default: none, the base model. With --private: the adapter/ directory of a `client tune` run",
    )
    parser.add_argument(
        "--private",
        action="store_true",
        help="split-mode generation: your adapter stays here (its bottom and top LoRA never leave this process; the "
        "middle's LoRA goes up once, sealed, and the cloud drops it at close); the cloud keeps the middle's KV cache "
        "and each new token crosses once each way. Prints tokens/s and bytes per token",
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="with --private: record what the cloud received (the bottom stage's outputs) in DIR for `client audit DIR`",
    )
    parser.add_argument(
        "--no-seal",
        action="store_true",
        help="with --private: send tensors under TLS only, unsealed (default: sealed with the session's keys)",
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
