"""Command-line values checked as they are parsed: a bad flag is one line on stderr, before any work or network call."""

from __future__ import annotations

import argparse
import math


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (the flag, what it needs, what it got) instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _number(kind, text: str):
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if kind is float and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _checked(kind, ok, need: str):
    def parse(text: str):
        v = _number(kind, text)
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
        return v

    parse.__name__ = need  # argparse names the type in some messages
    return parse


positive_int = _checked(int, lambda v: v >= 1, ">= 1")
nonneg_int = _checked(int, lambda v: v >= 0, ">= 0")
positive_float = _checked(float, lambda v: v > 0, "> 0")
nonneg_float = _checked(float, lambda v: v >= 0, ">= 0")
open_fraction = _checked(float, lambda v: 0 < v < 1, "between 0 and 1 (exclusive)")
dropout = _checked(float, lambda v: 0 <= v < 1, "in [0, 1)")
seq_len = _checked(int, lambda v: v >= 2, ">= 2")


def server_address(text: str) -> str:
    """HOST:PORT with a port in 1..65535 ([IPv6]:PORT too)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port in 1..65535, got {text!r}")
    return text


def block_split(text: str) -> str:
    """K:M (client blocks at the bottom and at the top), K >= 1 and M >= 0."""
    k, sep, m = text.partition(":")
    if not sep or not k.isdigit() or not m.isdigit() or int(k) < 1:
        raise argparse.ArgumentTypeError(f"expected K:M with K >= 1 and M >= 0 (e.g. 2:2), got {text!r}")
    return text
