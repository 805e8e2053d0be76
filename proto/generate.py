"""Regenerate the Python code for proto/canvaswatch/v1/*.proto.

The one way generated code is produced: `python proto/generate.py`. It writes
`*_pb2.py`, `*_pb2.pyi` and `*_pb2_grpc.py` beside each .proto, inside the
`canvaswatch.v1` package that pyproject maps to this folder.
`python proto/generate.py --check` exits 1 when the committed files differ
from a fresh generation (tests/test_proto_fresh.py runs it).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = PROTO_ROOT / "canvaswatch" / "v1"


def generate(out_root: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) into out_root; return the written files."""
    from grpc_tools import protoc  # imported late: only needed to regenerate

    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(PACKAGE_DIR.glob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted((out_root / "canvaswatch" / "v1").glob("*_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for path in fresh:
            committed = PACKAGE_DIR / path.name
            if args.check:
                if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                    stale.append(committed.name)
            else:
                committed.write_bytes(path.read_bytes())
        if stale:
            print(f"stale generated code: {', '.join(stale)}; run python proto/generate.py", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
