"""The README's layout table names every module of every package, and nothing that is not there."""

from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ["client", "cloud", "stages", "protos", "kernels", "emulator", "testing"]


def layout_rows(readme: str) -> dict[str, set[str]]:
    """folder -> the backticked names in its row of the README's Layout table."""
    section = readme.split("## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `(\w+)/`[^|]*\| (.*) \|$", line)
        if m:
            rows[m.group(1)] = set(re.findall(r"`([\w./]+)`", m.group(2)))
    return rows


def modules(root: str, folder: str) -> set[str]:
    """The folder's modules as the table names them: `x` for x.py, `x.proto`, subpackage modules by stem."""
    out = set()
    for _, dirs, files in os.walk(os.path.join(root, folder)):
        dirs[:] = [d for d in dirs if not d.startswith("__")]
        for f in files:
            stem, ext = os.path.splitext(f)
            if ext == ".proto":
                out.add(f)
            elif ext == ".py" and stem != "__init__" and not stem.endswith(("_pb2", "_pb2_grpc")):
                out.add(stem)
    return out


def listed_modules(names: set[str]) -> set[str]:
    """Drops what the table names that is not a module: classes (CamelCase), attributes, folders."""
    return {n for n in names if n.endswith(".proto") or not (n[0].isupper() or n.endswith("/") or "." in n)}


def mismatch(root: str, readme: str, folder: str) -> tuple[list[str], list[str]]:
    """(modules the table misses, names the table lists that the folder lacks)."""
    rows = layout_rows(readme)
    assert folder in rows, f"README's Layout table has no row for {folder}/"
    on_disk, listed = modules(root, folder), listed_modules(rows[folder])
    return sorted(on_disk - listed), sorted(listed - on_disk)


@pytest.mark.parametrize("folder", PACKAGES)
def test_the_layout_table_matches_the_tree(folder):
    with open(os.path.join(ROOT, "README.md")) as f:
        missing, extra = mismatch(ROOT, f.read(), folder)
    assert not missing, f"{folder}/ modules missing from README's Layout table: {missing}"
    assert not extra, f"README's Layout table lists modules {folder}/ does not have: {extra}"


def test_a_planted_module_or_a_stale_name_is_caught(tmp_path):
    (tmp_path / "client" / "privacy").mkdir(parents=True)
    for f in ("trainer.py", "ghost.py", "privacy/audit.py", "__init__.py"):
        (tmp_path / "client" / f).write_text("")
    readme = "## Layout\n| `client/` (`tandem.client`) | `trainer` (`TuneConfig`), `staged`; **privacy/**: `audit` |\n"
    assert mismatch(str(tmp_path), readme, "client") == (["ghost"], ["staged"])
