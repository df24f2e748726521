"""``scoremesh envoy``: the Envoy configuration for a mesh description, and the descriptor set
Envoy's gRPC-JSON transcoder loads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from services.gateway.envoy_config import descriptor_set_bytes, render_yaml
from services.gateway.envoy_mesh import DEFAULT_MESH, in_file, load_mesh
from services.mesh.errors import InvalidArgument

__all__ = ["add_command", "rendered"]


def add_command(commands: Any) -> None:
    """Adds ``envoy render`` and ``envoy descriptors`` to the CLI's subcommands."""
    envoy = commands.add_parser("envoy", help="generate Envoy's configuration for the mesh")
    verbs = envoy.add_subparsers(dest="verb", required=True)
    render = verbs.add_parser(
        "render",
        help="print (or write) the Envoy configuration of a mesh description",
        description=(
            "Renders the mesh description in --mesh (YAML; see services/gateway/envoy_mesh.py), or"
            " without it the Kubernetes mesh of k8s/, as an Envoy configuration."
        ),
    )
    render.add_argument("--mesh", type=Path, metavar="FILE", help="the mesh description (default: built in)")
    render.add_argument("--output", type=Path, metavar="FILE", help="write here instead of stdout")
    render.set_defaults(run=run_render)
    descriptors = verbs.add_parser(
        "descriptors", help="write the protos' descriptor set, for Envoy's gRPC-JSON transcoder"
    )
    descriptors.add_argument("--output", type=Path, metavar="FILE", required=True)
    descriptors.set_defaults(run=run_descriptors)


def rendered(mesh_file: Path | None) -> str:
    """What ``scoremesh envoy render [--mesh FILE]`` prints."""
    if mesh_file is None:
        return render_yaml(DEFAULT_MESH)
    mesh = load_mesh(mesh_file)
    try:
        return render_yaml(mesh)
    except InvalidArgument as error:
        raise in_file(mesh_file, error) from None


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as error:
        raise InvalidArgument.for_field("--output", f"cannot write {path}: {error.strerror}") from None


def run_render(args: argparse.Namespace) -> int:
    text = rendered(args.mesh)
    if args.output is None:
        sys.stdout.write(text)
    else:
        _write(args.output, text.encode())
    return 0


def run_descriptors(args: argparse.Namespace) -> int:
    _write(args.output, descriptor_set_bytes())
    return 0
