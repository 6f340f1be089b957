"""Generate the gRPC modules of mnist_service/protos/ from the .proto files there, with grpcio-tools.

    python scripts/gen_grpc.py            # rewrite them (after changing a .proto or the grpcio-tools pin)
    python scripts/gen_grpc.py --check    # exit 1 if the committed modules differ from a fresh generation

The modules are committed, so that the server's image needs grpcio and protobuf but not grpcio-tools
(requirements-dev.txt pins it); tests/test_grpc.py runs --check.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = Path("mnist_service/protos")
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    """Generate every .proto of PROTOS into `out` (as paths relative to the repository); the files written."""
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / PROTOS).glob("*.proto"))
    command = [
        sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT),
        f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *protos,
    ]
    subprocess.run(command, check=True)
    written = []
    for proto in protos:
        header = (
            f"# Generated from {proto} by grpcio-tools {version('grpcio-tools')}: python scripts/gen_grpc.py\n"
            "# (see mnist_service/protos/README.md). Do not edit; import only in a process that does not\n"
            "# import another copy of the package `inference` (tritonclient.grpc, kserve).\n"
        )
        for suffix in SUFFIXES:
            path = out / (proto.removesuffix(".proto") + suffix)
            path.write_text(header + path.read_text())
            written.append(path.relative_to(out))
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed modules instead")
    args = parser.parse_args()
    if not args.check:
        for path in generate(ROOT):
            print(f"wrote {path}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = [p for p in generate(Path(tmp)) if (Path(tmp) / p).read_text() != _read(ROOT / p)]
    for path in stale:
        print(f"{path} differs from what scripts/gen_grpc.py generates: run it and commit the result")
    return 1 if stale else 0


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


if __name__ == "__main__":
    sys.exit(main())
