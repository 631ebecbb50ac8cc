"""Regenerate the Python stubs of the wire contract: `make protos` (`python -m server.protogen`).

Stubs are generated with `-I protos`, so they live in protos/fastadapt/v1/ and import each other as
`fastadapt.v1.*`; server.wire puts protos/ on sys.path. The generated files are committed: the runtime never needs
protoc (grpcio-tools), and tests/server/test_protos.py fails when they are stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTOS_DIR = Path(__file__).resolve().parents[1] / "protos"
PROTO_FILES = ("fastadapt/v1/fastadapt.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_files(proto: str) -> list[str]:
    """Paths (relative to the output root) protoc writes for one .proto file."""
    stem = proto[: -len(".proto")]
    return [stem + suffix for suffix in GENERATED_SUFFIXES]


def generate(out_dir: Path = PROTOS_DIR) -> list[Path]:
    """Run protoc (grpcio-tools) over every proto into out_dir; returns the files written."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise RuntimeError("generating stubs needs grpcio-tools (pip install grpcio-tools); serving does not") from exc
    import grpc_tools

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTO_FILES,
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc exited with {code} for {' '.join(args[1:])}")
    return [out_dir / f for proto in PROTO_FILES for f in generated_files(proto)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTOS_DIR, help="output root (default: protos/)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
