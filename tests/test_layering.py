"""Imports go one way (STYLE.md): client never imports cloud, cloud never imports client, and so on."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORBIDDEN = {
    "client": {"tandem.cloud"},
    "cloud": {"tandem.client"},
    "kernels": {"tandem.cloud", "tandem.client", "tandem.protos", "tandem.stages", "tandem.emulator"},
    "stages": {"tandem.cloud", "tandem.client", "tandem.protos"},
    "protos": {"tandem.cloud", "tandem.client", "tandem.stages"},
    "emulator": {"tandem.cloud", "tandem.client", "tandem.protos"},
}


def _imports(path):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
        for f in files:
            if f.endswith(".py") and not f.endswith("_pb2_grpc.py"):
                for mod in _imports(os.path.join(dirpath, f)):
                    bad = [x for x in FORBIDDEN[package] if mod == x or mod.startswith(x + ".")]
                    assert not bad, f"{package}/{f} imports {mod}"
