"""Generate the checked-in Python code for the contracts under protos/.

One command for people and for the drift test:

    python scripts/generate_protos.py            # writes gen/python/
    python scripts/generate_protos.py --out DIR  # writes elsewhere (the drift test)

Uses grpcio-tools' bundled protoc, mypy-protobuf and protoc-gen-connect-python, all
pinned in pyproject.toml so that every machine produces byte-identical output.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
DEFAULT_OUT = ROOT / "gen" / "python"
# Only the user-facing contract is served over Connect (browsers, curl); banks speak gRPC alone.
CONNECT_PACKAGE = Path("cardlookup")


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    # The mypy-protobuf plugins live next to this interpreter (the venv's bin/),
    # which need not be on PATH when make calls .venv/bin/python directly.
    bindir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    connect_files = [f for f in files if Path(f).is_relative_to(CONNECT_PACKAGE)]
    connect_args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-connect-python={bindir / 'protoc-gen-connect-python'}",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--connect-python_out={out}",
        *connect_files,
    ]
    if protoc.main(connect_args) != 0:
        raise SystemExit("protoc (connect-python) failed")
    # protoc writes modules, not packages: add the __init__.py files so the
    # generated code imports as regular packages (cardlookup.v1, bankquery.v1).
    for directory in sorted({p.parent for p in out.rglob("*.py")}):
        while directory != out:
            (directory / "__init__.py").touch()
            (directory / "py.typed").touch()
            directory = directory.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    generate(args.out)
    print(f"generated {len(proto_files())} proto files into {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
