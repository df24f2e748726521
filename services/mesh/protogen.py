"""Generates the committed gRPC stubs in ``gen/`` from ``protos/``, or checks they match.

``python -m services.mesh.protogen gen`` rewrites ``gen/``; ``… check`` fails when the committed
stubs differ from what the protos generate (CI runs it). The output tree mirrors the proto
packages, so generated imports work as they are.

Beside the stubs, ``gen/scoremesh/descriptor_set.binpb`` holds every proto's descriptor with
its imports (a ``FileDescriptorSet``): the Envoy configuration generator reads the services and
their streaming methods from it, and Envoy's gRPC-JSON transcoder loads it.
"""

from __future__ import annotations

import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
GENERATED = ROOT / "gen"
DESCRIPTOR_SET = Path("scoremesh") / "descriptor_set.binpb"
"""Where the descriptor set lies under ``gen/`` (and in the installed ``scoremesh`` package)."""


def _include_dirs() -> list[Path]:
    import google.api
    import grpc_tools

    googleapis_root = Path(google.api.__path__[0]).parent.parent
    return [PROTOS, Path(grpc_tools.__file__).parent / "_proto", googleapis_root]


def generate(out: Path) -> None:
    from grpc_tools import protoc

    (out / DESCRIPTOR_SET).parent.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        *(f"-I{d}" for d in _include_dirs()),
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        f"--descriptor_set_out={out / DESCRIPTOR_SET}",
        "--include_imports",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for directory in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        if directory != out:
            (directory / "__init__.py").touch()


def _differences(expected: Path, actual: Path) -> list[str]:
    cmp = filecmp.dircmp(expected, actual, ignore=["__pycache__"])
    problems = [f"missing {actual / name}" for name in cmp.left_only]
    problems += [f"stale {actual / name}" for name in cmp.right_only]
    for name in cmp.diff_files:
        problems.append(f"differs {actual / name}")
    for name in cmp.common_dirs:
        problems += _differences(expected / name, actual / name)
    return problems


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "gen"
    if command == "gen":
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            import shutil

            shutil.rmtree(GENERATED, ignore_errors=True)
            shutil.copytree(tmp, GENERATED)
        print(f"generated {GENERATED}")
        return 0
    if command == "check":
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            problems = _differences(Path(tmp), GENERATED)
        if problems:
            print("generated stubs are out of date; run `make protos`:", *problems, sep="\n  ")
            return 1
        print("generated stubs match protos/")
        return 0
    print("usage: python -m services.mesh.protogen gen|check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
