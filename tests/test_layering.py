"""The layering rules (STYLE.md), checked by reading every file's imports and sizes; each rule also on a planted violation.

- Imports go one way: ALLOWED says which tandem packages each folder may import (its own always).
- Helpers for tests and bench scripts come from tandem.testing: nothing imports a module of tests/ (conftest and
  the rest), and nothing puts a folder on sys.path.
- No module imports another module's private (leading underscore) names, by `from m import _x` or by `m._x`.
- client/ and cloud/: no file over 350 lines, no function over 60 (argparse parser builders aside).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("kernels", "protos", "stages", "emulator", "client", "cloud")
# Which tandem packages each folder may import, besides itself. tandem.testing is in no product package's row.
ALLOWED = {
    "kernels": set(),
    "protos": {"kernels"},  # serde packs tensors with the wire codecs of kernels.codecs
    "stages": {"kernels"},
    "emulator": {"stages", "kernels"},
    "client": {"stages", "protos", "kernels", "emulator"},  # never cloud
    "cloud": {"stages", "protos", "kernels", "emulator"},  # never client
    "testing": set(PRODUCT),
    "bench": {*PRODUCT, "testing"},  # but never tests/
    "tests": {*PRODUCT, "testing"},
}
PACKAGES = {name: name for name in (*PRODUCT, "testing")}  # tandem.<key> lives in folder <value>
MAX_FILE_LINES, MAX_FUNCTION_LINES = 350, 60
SIZED = ("client", "cloud")
FORMER_TEST_HELPERS = {"conftest", "tiny", "hop", "hostile", "warm_servers"}  # modules of tests/ before tandem.testing
PARSER_BUILDER = re.compile(r"^(build_parser|add_\w+_parsers?|\w+_parser)$")


def python_files(root: Path, folder: str):
    """The hand-written .py files under root/folder (generated gRPC code aside)."""
    for path in sorted((root / folder).rglob("*.py")):
        if "__pycache__" not in path.parts and not re.search(r"_pb2(_grpc)?\.py$", path.name):
            yield path


def module_name(root: Path, path: Path) -> str | None:
    """tandem.<package>.<...> for a file of an installed package; None for a script (bench/, tests/)."""
    rel = path.relative_to(root)
    if rel.parts[0] not in PACKAGES:
        return None
    parts = ["tandem", *rel.with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(root: Path, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names (relative imports resolved against the file's package)."""
    if not node.level:
        return node.module or ""
    name = module_name(root, path) or ""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def is_local_module(root: Path, path: Path, dotted: str) -> bool:
    """Whether `dotted` is a module of this repository: tandem.*, or a script beside `path` (bench, tests)."""
    parts = dotted.split(".")
    if parts[0] == "tandem" and len(parts) > 1 and parts[1] in PACKAGES:
        where = root / PACKAGES[parts[1]] / Path(*parts[2:]) if len(parts) > 2 else root / PACKAGES[parts[1]]
    elif module_name(root, path) is None:
        where = path.parent / Path(*parts)
    else:
        return False
    return where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()


def imported_modules(root: Path, path: Path, tree: ast.AST):
    """(line, absolute module) for every import in the file, `from m import x` naming m and, if a module, m.x."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = resolve(root, path, node)
            yield node.lineno, module
            for alias in node.names:
                if is_local_module(root, path, f"{module}.{alias.name}"):
                    yield node.lineno, f"{module}.{alias.name}"


def arrow_violations(root: Path, folder: str) -> list[str]:
    """Imports of tandem packages outside ALLOWED[folder], of tests/ modules, and sys.path changes."""
    test_modules = {p.stem for p in (root / "tests").glob("*.py")} | FORMER_TEST_HELPERS
    allowed = ALLOWED[folder] | ({folder} if folder in PACKAGES else set())
    out = []
    for path in python_files(root, folder):
        rel = path.relative_to(root)
        tree = ast.parse(path.read_text(), str(path))
        for line, module in imported_modules(root, path, tree):
            parts = module.split(".")
            if parts[0] == "tandem" and len(parts) > 1 and parts[1] not in allowed:
                out.append(f"{rel}:{line} imports {module} ({folder} may import {sorted(allowed) or 'no tandem'})")
            if parts[0] == "tests" or (parts[0] in test_modules and module_name(root, path) is None):
                out.append(f"{rel}:{line} imports {module} from tests/ (helpers live in tandem.testing)")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and re.match(r"sys\.path\.\w+$", ast.unparse(node.func)):
                out.append(f"{rel}:{node.lineno} changes sys.path (import helpers from tandem.testing)")
    return out


def private_name_violations(root: Path, folder: str) -> list[str]:
    """`from m import _x` and `m._x` where m is another module of this repository."""
    out = []
    for path in python_files(root, folder):
        rel = path.relative_to(root)
        tree = ast.parse(path.read_text(), str(path))
        modules = {}  # local name -> module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    bound = alias.asname or (None if "." in alias.name else alias.name)
                    if bound and is_local_module(root, path, alias.name):
                        modules[bound] = alias.name
            elif isinstance(node, ast.ImportFrom):
                module = resolve(root, path, node)
                if not is_local_module(root, path, module) and not module.startswith("tandem."):
                    continue
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        out.append(f"{rel}:{node.lineno} imports {module}.{alias.name}, a private name")
                    elif is_local_module(root, path, f"{module}.{alias.name}"):
                        modules[alias.asname or alias.name] = f"{module}.{alias.name}"
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in modules
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                out.append(f"{rel}:{node.lineno} uses {modules[node.value.id]}.{node.attr}, a private name")
    return out


def size_violations(root: Path, folder: str) -> list[str]:
    """Files over MAX_FILE_LINES lines and functions over MAX_FUNCTION_LINES lines (parser builders aside)."""
    out = []
    for path in python_files(root, folder):
        rel = path.relative_to(root)
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            out.append(f"{rel} has {len(text.splitlines())} lines (at most {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not PARSER_BUILDER.match(node.name):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    out.append(f"{rel}:{node.lineno} {node.name} has {length} lines (at most {MAX_FUNCTION_LINES})")
    return out


# The repository ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_import_arrows(folder):
    found = arrow_violations(ROOT, folder)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_no_private_names_across_modules(folder):
    found = private_name_violations(ROOT, folder)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("folder", SIZED)
def test_file_and_function_sizes(folder):
    found = size_violations(ROOT, folder)
    assert not found, "\n".join(found)


def test_every_folder_is_checked():
    """A new top-level package folder needs a row in ALLOWED."""
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert folders <= set(ALLOWED), folders - set(ALLOWED)


# The checkers, on planted violations ---------------------------------------------------------------------------------


def plant(root: Path, files: dict[str, str]) -> Path:
    """A repository tree under root: every package folder with an __init__.py, tests/ and bench/, plus `files`."""
    for folder in PACKAGES:
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "__init__.py").write_text("")
    (root / "tests").mkdir(exist_ok=True)
    (root / "tests" / "conftest.py").write_text("import pytest\n")
    (root / "bench").mkdir(exist_ok=True)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    "folder, text",
    [
        ("client", "from tandem.cloud.server import build_server\n"),
        ("cloud", "import tandem.client.trainer\n"),
        ("cloud", "from tandem import client\n"),
        ("kernels", "from tandem.stages import arch\n"),
        ("stages", "from tandem.protos import serde\n"),
        ("emulator", "from ..client import data\n"),
        ("client", "from tandem.testing.servers import BIN\n"),
        ("bench", "from conftest import start_server\n"),
        ("bench", "import tiny\n"),
        ("bench", "import sys\nsys.path.insert(0, 'tests')\n"),
        ("tests", "from tests.conftest import start_server\n"),
    ],
)
def test_arrow_checker_reports_a_planted_violation(tmp_path, folder, text):
    root = plant(tmp_path, {f"{folder}/planted.py": text})
    found = arrow_violations(root, folder)
    assert len(found) == 1 and found[0].startswith(f"{folder}/planted.py:"), found


def test_arrow_checker_passes_allowed_imports(tmp_path):
    root = plant(
        tmp_path,
        {
            "client/sub/deep.py": "from ...stages import arch\nfrom .. import data\nfrom tandem.protos import serde\n",
            "client/data.py": "",
            "bench/script.py": "from tandem.testing.servers import BIN\nfrom tandem.cloud import tls\nimport other\n",
            "bench/other.py": "",
            "testing/servers.py": "from tandem.client import data\nfrom tandem.cloud import tls\n",
        },
    )
    assert not [v for folder in ALLOWED for v in arrow_violations(root, folder)]


@pytest.mark.parametrize(
    "files, where",
    [
        ({"client/a.py": "from .b import _helper\n", "client/b.py": ""}, "client/a.py:1"),
        ({"client/a.py": "from tandem.cloud.b import _helper\n"}, "client/a.py:1"),
        ({"cloud/a.py": "from . import b\n\nb._helper()\n", "cloud/b.py": ""}, "cloud/a.py:3"),
        ({"cloud/a.py": "import tandem.cloud.b as b\nb._x\n", "cloud/b.py": ""}, "cloud/a.py:2"),
        ({"bench/a.py": "import b\nprint(b._table)\n", "bench/b.py": ""}, "bench/a.py:2"),
        ({"bench/a.py": "from b import _table\n", "bench/b.py": ""}, "bench/a.py:1"),
    ],
)
def test_private_name_checker_reports_a_planted_violation(tmp_path, files, where):
    root = plant(tmp_path, files)
    folder = where.split("/")[0]
    found = private_name_violations(root, folder)
    assert len(found) == 1 and found[0].startswith(where), found


def test_private_name_checker_passes_own_and_foreign_names(tmp_path):
    text = "import os\nfrom torch import _C\nfrom . import b\n\n_own = b.public\nos._exit\nself._x = 1\n"
    root = plant(tmp_path, {"client/a.py": text, "client/b.py": "public = 1\n"})
    assert not private_name_violations(root, "client")


def test_size_checker_reports_a_long_file_and_a_long_function(tmp_path):
    long_body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    root = plant(
        tmp_path,
        {
            "cloud/long_file.py": "x = 1\n" * (MAX_FILE_LINES + 1),
            "cloud/long_function.py": "def tune():\n" + long_body,
            "cloud/fits.py": "x = 1\n" * (MAX_FILE_LINES - MAX_FUNCTION_LINES)
            + "def f():\n"
            + long_body.split("\n", 1)[1],
            "cloud/cli.py": "".join(f"def {n}():\n{long_body}" for n in ("build_parser", "add_emulator_parser")),
        },
    )
    found = size_violations(root, "cloud")
    assert len(found) == 2, found
    assert found[0].startswith("cloud/long_file.py has 351 lines"), found
    assert found[1].startswith("cloud/long_function.py:1 tune has 61 lines"), found
