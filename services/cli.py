"""The ``scoremesh`` command.

Every command that prints data takes ``--json``; every failure exits non-zero with a one-line
reason on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from scoremesh.gateway.v1.admin_pb2 import RateLimit as RateLimitPb

from services import certs
from services.gateway import envoy_command
from services.gateway.admin_command import AdminClient, key_lines, usage_lines
from services.gateway.keys import Scope
from services.mesh.channels import open_channel
from services.mesh.errors import MeshError
from services.mesh.identity import DEFAULT_TENANT, Caller
from services.mesh.settings import MeshSettings, SettingsError, env_str
from services.mesh.status import describe
from services.registry.client import Reference, RegistryClient
from services.terminal import as_json, print_json
from services.traces import command as traces_command
from services.training import commands as training_commands
from services.training.client import TrainingClient

EXIT_FAILURE = 1
EXIT_USAGE = 2


def _registry_address() -> str:
    return env_str(os.environ, "SCOREMESH_REGISTRY_ADDR", "127.0.0.1:50051")


def _caller() -> Caller:
    return Caller(
        tenant=os.environ.get("SCOREMESH_TENANT", DEFAULT_TENANT),
        principal=os.environ.get("SCOREMESH_PRINCIPAL", os.environ.get("USER", "cli")),
    )


class _Progress:
    """A one-line progress bar on stderr, drawn only for a terminal."""

    def __init__(self, total: int, label: str) -> None:
        self._total = max(total, 1)
        self._label = label
        self._enabled = sys.stderr.isatty()
        self._started = time.monotonic()

    def __call__(self, done: int) -> None:
        if not self._enabled:
            return
        fraction = done / self._total
        elapsed = max(time.monotonic() - self._started, 1e-6)
        bar = "#" * int(fraction * 30)
        sys.stderr.write(
            f"\r{self._label} [{bar:<30}] {fraction:6.1%} {done / 1e6:8.1f} MB"
            f" {done / elapsed / 1e6:6.1f} MB/s"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self._enabled:
            sys.stderr.write("\n")


# models commands


async def _models_push(args: argparse.Namespace, client: RegistryClient) -> None:
    path = Path(args.file)
    if not path.is_file():
        raise _UsageError(f"{path}: no such file")
    progress = _Progress(path.stat().st_size, f"pushing {path.name}")
    try:
        response = await client.push(
            args.name, path, alias=args.alias or "", description=args.description or "", progress=progress
        )
    finally:
        progress.close()
    version = response.version
    if args.json:
        print_json({**as_json(version), "created": response.created})
        return
    state = "created" if response.created else "already existed as"
    print(
        f"{state} {version.model} version {version.version}"
        f" ({version.sha256[:12]}, {version.size_bytes} bytes)"
    )
    if version.verification.passed:
        print("verification passed" + (f"; alias {args.alias} -> {version.version}" if args.alias else ""))
    else:
        print("verification FAILED:")
        for check in version.verification.checks:
            if not check.passed:
                print(f"  {check.name}: {check.detail}")
        raise _Failure(f"{version.model} version {version.version} failed verification")


async def _models_list(args: argparse.Namespace, client: RegistryClient) -> None:
    models = await client.list_models()
    if args.json:
        print_json([as_json(m) for m in models])
        return
    print(f"{'NAME':<32} {'TENANT':<16} {'VISIBILITY':<10} {'LATEST':>6}  DESCRIPTION")
    for model in models:
        visibility = "public" if model.visibility == 2 else "private"
        print(
            f"{model.name:<32} {model.tenant:<16} {visibility:<10}"
            f" {model.latest_version:>6}  {model.description}"
        )


async def _models_show(args: argparse.Namespace, client: RegistryClient) -> None:
    model = await client.get_model(args.name)
    versions = await client.list_versions(args.name)
    aliases = await client.list_aliases(args.name)
    if args.json:
        print_json(
            {
                **as_json(model),
                "versions": [as_json(v) for v in versions],
                "aliases": [as_json(a) for a in aliases],
            }
        )
        return
    print(f"{model.name}  (tenant {model.tenant}; {model.description or 'no description'})")
    by_version: dict[int, list[str]] = {}
    for alias in aliases:
        by_version.setdefault(alias.version, []).append(alias.alias)
    print(f"  {'VERSION':>7}  {'STATUS':<7} {'SIZE':>12}  SHA256        ALIASES")
    for version in versions:
        status = "ready" if version.status == 1 else "FAILED"
        names = ", ".join(by_version.get(version.version, []))
        print(f"  {version.version:>7}  {status:<7} {version.size_bytes:>12}  {version.sha256[:12]}  {names}")


async def _models_alias(args: argparse.Namespace, client: RegistryClient) -> None:
    alias = await client.set_alias(args.name, args.alias, args.version, args.expect)
    if args.json:
        print_json(as_json(alias))
    else:
        print(f"{alias.model}@{alias.alias} -> version {alias.version}")


async def _models_pull(args: argparse.Namespace, client: RegistryClient) -> None:
    version = await client.pull(Reference.parse(args.reference), Path(args.file))
    if args.json:
        print_json({**as_json(version), "file": str(Path(args.file).resolve())})
    else:
        print(f"wrote {version.model} version {version.version} to {args.file} ({version.size_bytes} bytes)")


# keys and usage, through the gateway's Admin service


def _admin_address() -> str:
    return env_str(os.environ, "SCOREMESH_GATEWAY_ADMIN_ADDR", "127.0.0.1:50054")


def _run_admin_command(
    command: Callable[[argparse.Namespace, AdminClient], Coroutine[Any, Any, None]],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        async def main() -> None:
            settings = MeshSettings.from_env()
            async with open_channel(_admin_address(), settings) as channel:
                await command(args, AdminClient(channel, _caller().principal))

        asyncio.run(main())
        return 0

    return run


def _scopes(text: str) -> list[str]:
    return [scope.strip() for scope in text.split(",") if scope.strip()]


async def _keys_create(args: argparse.Namespace, client: AdminClient) -> None:
    if (args.rate is None) != (args.burst is None):
        raise _UsageError("--rate and --burst go together")
    rate = RateLimitPb(requests_per_second=args.rate, burst=args.burst) if args.rate is not None else None
    created = await client.create_key(
        args.tenant, _scopes(args.scopes), description=args.description, rate=rate
    )
    if args.json:
        print_json(as_json(created))
        return
    key = created.key
    print(f"created key {key.id} for tenant {key.tenant} with scopes {', '.join(key.scopes)}")
    print("its token, shown only now:", file=sys.stderr)
    print(created.token)


async def _keys_list(args: argparse.Namespace, client: AdminClient) -> None:
    keys = await client.list_keys(args.tenant or "", include_revoked=args.all)
    if args.json:
        print_json([as_json(k) for k in keys])
        return
    print("\n".join(key_lines(keys)))


async def _keys_revoke(args: argparse.Namespace, client: AdminClient) -> None:
    key = await client.revoke_key(args.id)
    if args.json:
        print_json(as_json(key))
    else:
        print(f"revoked key {key.id} of tenant {key.tenant}")


async def _usage(args: argparse.Namespace, client: AdminClient) -> None:
    if args.hours < 0:
        raise _UsageError("--hours must not be negative")
    since = datetime.now(UTC) - timedelta(hours=args.hours) if args.hours else None
    usage = await client.usage(
        key_id=args.key or "",
        tenant=args.tenant or "",
        model=args.model or "",
        since=since,
        hourly=args.hourly,
    )
    if args.json:
        print_json([as_json(u) for u in usage])
        return
    print("\n".join(usage_lines(usage, hourly=args.hourly)))


# training, through the training service


def _run_training_command(
    command: Callable[[argparse.Namespace, TrainingClient], Coroutine[Any, Any, int]],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        async def main() -> int:
            settings = MeshSettings.from_env()
            address = env_str(os.environ, "SCOREMESH_TRAINING_ADDR", "127.0.0.1:50053")
            async with open_channel(address, settings) as channel:
                return await command(args, TrainingClient(channel, _caller()))

        return asyncio.run(main())

    return run


class _UsageError(Exception):
    pass


class _Failure(Exception):
    pass


def _run_registry_command(
    command: Callable[[argparse.Namespace, RegistryClient], Coroutine[Any, Any, None]],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        async def main() -> None:
            settings = MeshSettings.from_env()
            async with open_channel(_registry_address(), settings) as channel:
                await command(args, RegistryClient(channel, _caller()))

        asyncio.run(main())
        return 0

    return run


# services


def _serve(args: argparse.Namespace) -> int:
    if args.service == "registry":
        from services.registry.main import main as registry_main

        registry_main()
        return 0
    if args.service == "scoring":
        from services.scoring.main import main as scoring_main

        scoring_main()
        return 0
    if args.service == "training":
        from services.training.main import main as training_main

        training_main()
        return 0
    if args.service == "training-worker":
        from services.training.main import worker_main

        worker_main()
        return 0
    if args.service == "gateway":
        from services.gateway.main import main as gateway_main

        gateway_main()
        return 0
    raise _UsageError(f"unknown service {args.service!r}")


def _score(args: argparse.Namespace) -> int:
    from services.scoring.score_command import score

    reference = Reference.parse(args.reference)
    inputs = dict(_named_file(text) for text in args.input)
    settings = MeshSettings.from_env()
    address = env_str(os.environ, "SCOREMESH_SCORING_ADDR", "127.0.0.1:50052")
    result = asyncio.run(score(address, settings, _caller(), reference, inputs, timeout_s=args.timeout))
    if args.json:
        print_json(result)
        return 0
    print(f"{result['model']} version {result['version']} ({result['backend']})")
    for output in result["outputs"]:
        print(f"{output['name']} {output['datatype']} {output['shape']}: {output['data']}")
    return 0


def _named_file(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise _UsageError(f"--input takes NAME=FILE.npy, not {text!r}")
    return name, Path(path)


def _up(args: argparse.Namespace) -> int:
    from services.up import run_up

    return asyncio.run(run_up())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scoremesh", description="A serving mesh for ML models.")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the whole mesh in the foreground (Ctrl-C stops it)")
    up.set_defaults(run=_up)

    serve = commands.add_parser("serve", help="run one service")
    serve.add_argument("service", choices=["registry", "scoring", "training", "training-worker", "gateway"])
    serve.set_defaults(run=_serve)

    score = commands.add_parser("score", help="score a model with inputs from .npy files")
    score.add_argument("reference", metavar="NAME[@ALIAS|:VERSION]")
    score.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy", help="one per input")
    score.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    score.add_argument("--json", action="store_true", help="print machine-readable JSON")
    score.set_defaults(run=_score)

    models = commands.add_parser("models", help="push, list, show, alias and pull models")
    verbs = models.add_subparsers(dest="verb", required=True)

    def verb(name: str, help_text: str, command: Any) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help_text)
        sub.add_argument("--json", action="store_true", help="print machine-readable JSON")
        sub.set_defaults(run=_run_registry_command(command))
        return sub

    push = verb("push", "upload an ONNX file as a new version", _models_push)
    push.add_argument("name")
    push.add_argument("file")
    push.add_argument("--alias", help="point this alias at the version once it is verified")
    push.add_argument("--description", help="description of a model this push creates")
    verb("list", "list the models you can see", _models_list)
    show = verb("show", "show a model with its versions and aliases", _models_show)
    show.add_argument("name")
    alias = verb("alias", "point an alias at a version", _models_alias)
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version", type=int)
    alias.add_argument("--expect", type=int, help="only if the alias points at this version now (0: absent)")
    pull = verb("pull", "download NAME, NAME:VERSION or NAME@ALIAS", _models_pull)
    pull.add_argument("reference")
    pull.add_argument("file")

    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    key_verbs = keys.add_subparsers(dest="verb", required=True)

    def key_verb(name: str, help_text: str, command: Any) -> argparse.ArgumentParser:
        sub = key_verbs.add_parser(name, help=help_text)
        sub.add_argument("--json", action="store_true", help="print machine-readable JSON")
        sub.set_defaults(run=_run_admin_command(command))
        return sub

    create = key_verb("create", "create a key; its token is printed once", _keys_create)
    create.add_argument("--tenant", required=True)
    create.add_argument(
        "--scopes", required=True, metavar="SCOPE[,SCOPE…]", help=f"of {', '.join(s.value for s in Scope)}"
    )
    create.add_argument("--description", default="")
    create.add_argument("--rate", type=float, help="its own requests per second (with --burst)")
    create.add_argument("--burst", type=int, help="its own burst (with --rate)")
    listing = key_verb("list", "list keys", _keys_list)
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    revoke = key_verb("revoke", "revoke a key for good", _keys_revoke)
    revoke.add_argument("id", help="the key's id (the 12 hex characters after smk_)")

    training_commands.add_commands(commands, _run_training_command)
    traces_command.add_command(commands)
    envoy_command.add_command(commands)
    certs.add_command(commands)

    usage = commands.add_parser("usage", help="requests and rows scored per key and model")
    usage.add_argument("--key", help="only this key id")
    usage.add_argument("--tenant", help="only this tenant")
    usage.add_argument("--model", help="only this model")
    usage.add_argument("--hours", type=int, default=0, help="only the last N hours (default: all)")
    usage.add_argument("--hourly", action="store_true", help="one line per hour")
    usage.add_argument("--json", action="store_true", help="print machine-readable JSON")
    usage.set_defaults(run=_run_admin_command(_usage))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.run(args)
        return code
    except grpc.aio.AioRpcError as error:
        print(f"scoremesh: {describe(error)}", file=sys.stderr)
    except (MeshError, _Failure) as error:
        print(f"scoremesh: {error}", file=sys.stderr)
    except (_UsageError, SettingsError) as error:
        print(f"scoremesh: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
