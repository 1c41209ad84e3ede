"""Generate the Python gRPC code for proto/ into the package tree.

    python tools/gen_proto.py            # write pixelprune_api/grounding/v1/*_pb2*.py(i)
    python tools/gen_proto.py --out DIR  # write under DIR instead (the tests compare)

The output is committed so that installs need no code generator; the tests
regenerate it with the pinned grpcio-tools and fail if it differs. The proto
package stays `pixelprune.grounding.v1` (the wire names); the Python package is
`pixelprune_api`, apart from the `pixelprune` library, whose core never imports
grpc: protoc writes under a temporary root and the one generated import line is
moved to the new package.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
PROTOS = ["pixelprune/grounding/v1/grounding.proto"]
PROTO_PACKAGE, PYTHON_PACKAGE = "pixelprune.grounding.v1", "pixelprune_api.grounding.v1"


def generate(out: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) and return the files written under out/pixelprune_api/."""
    from grpc_tools import protoc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *PROTOS]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        for proto in PROTOS:
            stem = proto[: -len(".proto")]
            for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
                source = Path(tmp) / f"{stem}{suffix}"
                target = out / "pixelprune_api" / Path(stem).relative_to("pixelprune").parent / source.name
                target.parent.mkdir(parents=True, exist_ok=True)
                text = source.read_text().replace(f"from {PROTO_PACKAGE} import", f"from {PYTHON_PACKAGE} import")
                target.write_text(text)
                written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
