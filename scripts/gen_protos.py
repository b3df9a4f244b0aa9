"""Regenerate stimnet/v1/*_pb2*.py from protos/. `--check` fails if the committed files differ."""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT_PKG = ROOT / "stimnet" / "v1"


def generate(dest: Path) -> list[Path]:
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "stimnet" / "v1").glob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={dest}",
        f"--pyi_out={dest}",
        f"--grpc_python_out={dest}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((dest / "stimnet" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        if opts.check:
            committed = sorted(OUT_PKG.glob("*_pb2*.py*"))
            names_fresh = {p.name for p in fresh}
            names_committed = {p.name for p in committed}
            diff = names_fresh ^ names_committed
            diff |= {p.name for p in fresh if p.name in names_committed
                     and not filecmp.cmp(p, OUT_PKG / p.name, shallow=False)}
            if diff:
                print(f"generated code is stale: {', '.join(sorted(diff))}; "
                      "run scripts/gen_protos.py", file=sys.stderr)
                return 1
            return 0
        for p in OUT_PKG.glob("*_pb2*.py*"):
            p.unlink()
        for p in fresh:
            shutil.copy2(p, OUT_PKG / p.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
