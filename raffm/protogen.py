"""Regenerate the Python gRPC stubs under ``raffm/v1/`` from ``protos/raffm/v1/*.proto``.

``python -m raffm.protogen`` (what ``make protos`` runs) rewrites the stubs; ``--check`` only reports stubs that differ
from what the ``.proto`` files generate (exit status 1), which is what the stubs-up-to-date test uses.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.resources
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO_ROOT / "protos"
PACKAGE_DIR = Path("raffm") / "v1"
# Generated suffixes per proto file; the stub package keeps its hand-written __init__.py.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """The contract's .proto files, sorted so output is deterministic."""
    files = sorted((proto_root / PACKAGE_DIR).glob("*.proto"))
    if not files:
        raise FileNotFoundError(f"no .proto files under {proto_root / PACKAGE_DIR}")
    return files


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (from grpcio-tools) on every contract file; returns the files written under ``out_dir``."""
    from grpc_tools import protoc  # heavy; keep it out of import time

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    files = proto_files(proto_root)
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(f.relative_to(proto_root)) for f in files),
    ]
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}; see its messages above")
    return sorted(p for p in (out_dir / PACKAGE_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def stale_stubs(repo_root: Path = REPO_ROOT) -> list[str]:
    """Stub files (relative paths) that are missing, extra, or differ from freshly generated ones."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(Path(tmp), repo_root / "protos")}
        current_dir = repo_root / PACKAGE_DIR
        current = {p.name: p for p in current_dir.glob("*") if p.name.endswith(GENERATED_SUFFIXES)}
        stale = sorted(set(fresh) ^ set(current))
        stale += sorted(n for n in set(fresh) & set(current) if not filecmp.cmp(fresh[n], current[n], shallow=False))
    return [str(PACKAGE_DIR / n) for n in sorted(stale)]


def write_stubs(repo_root: Path = REPO_ROOT) -> list[Path]:
    """Regenerate the stubs in place, removing stale generated files; returns the files written."""
    target = repo_root / PACKAGE_DIR
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp), repo_root / "protos")
        for old in target.glob("*"):
            if old.name.endswith(GENERATED_SUFFIXES) and old.name not in {f.name for f in fresh}:
                old.unlink()
        written = [Path(shutil.copyfile(f, target / f.name)) for f in fresh]
    init = target / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated protobuf and gRPC stubs for package raffm.v1 (see raffm/protogen.py)."""\n')
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raffm.protogen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stubs that are out of date (exit 1)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_stubs()
        for path in stale:
            print(f"out of date: {path} (run `make protos`)", file=sys.stderr)
        return 1 if stale else 0
    for written in write_stubs():
        print(f"wrote {written.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
