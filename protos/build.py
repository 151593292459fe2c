"""Regenerates X_pb2.py / X_pb2_grpc.py from every X.proto in protos/: `python -m tandem.protos.build`.

The proto is compiled under the virtual path tandem/protos/, so the generated code imports
`tandem.protos.split_pb2` absolutely. The stubs are committed; tests/protos checks for drift.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTOS = tuple(sorted(n for n in os.listdir(HERE) if n.endswith(".proto")))


def generate(out_dir: str) -> list[str]:
    """Compiles every .proto of this folder into out_dir; returns the generated file paths."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-Itandem/protos={HERE}",
            f"-I{os.path.join(os.path.dirname(protoc.__file__), '_proto')}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(f"tandem/protos/{p}" for p in PROTOS),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        made = []
        for name in (f"{p[:-6]}{suffix}" for p in PROTOS for suffix in ("_pb2.py", "_pb2_grpc.py")):
            dst = os.path.join(out_dir, name)
            shutil.copyfile(os.path.join(tmp, "tandem", "protos", name), dst)
            made.append(dst)
        return made


if __name__ == "__main__":
    for p in generate(HERE):
        print("wrote", p, file=sys.stderr)
