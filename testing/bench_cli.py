"""The command line every bench script shares: an offline hub, the script's docstring as help, and the common flags."""

from __future__ import annotations

import argparse
import os

MODEL_HELP = "HF causal-LM directory; default: the embedded SmolLM2-135M-Instruct"


def offline_hub() -> None:
    """No Hugging Face downloads or log chatter: a bench's models are local directories or the embedded default."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def out_path(script: str, name: str) -> str:
    """`name` under the bench's output folder, bench/out/ beside `script` (the bench script's `__file__`)."""
    return os.path.join(os.path.dirname(os.path.abspath(script)), "out", name)


def bench_parser(
    script: str,
    doc: str,
    *,
    model: bool = False,
    work: str | None = None,
    results: bool = False,
    threads: int | None = None,
    seed: int | None = None,
) -> argparse.ArgumentParser:
    """A parser whose help is the script's docstring (`doc`, layout kept), with the shared flags asked for.

    model: --model (default: the embedded model); work: --work, a scratch folder bench/out/NAME (this help text);
    results: --json, bench/out/NAME.json; threads, seed: --threads and --seed with that default. NAME is the
    script's file name without .py.
    """
    name = os.path.splitext(os.path.basename(script))[0]
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if model:
        parser.add_argument("--model", default=None, help=MODEL_HELP)
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads, help=f"torch threads; default {threads}")
    if seed is not None:
        parser.add_argument("--seed", type=int, default=seed, help=f"seed; default {seed}")
    if work is not None:
        parser.add_argument("--work", default=out_path(script, name), help=work)
    if results:
        parser.add_argument("--json", default=out_path(script, name + ".json"), help="where to write the results")
    return parser
