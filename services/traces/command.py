"""``scoremesh traces``: the traces stored under ``$SCOREMESH_HOME/traces``, read straight
from the store (no server needed; safe while the receiver writes)."""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Any, Final

from services.mesh.errors import InvalidArgument, NotFound
from services.mesh.settings import MeshSettings
from services.terminal import print_json
from services.traces.model import MODEL_ATTRIBUTE, TraceQuery
from services.traces.render import span_json, summary_json, trace_table, tree_order, waterfall
from services.traces.settings import TracesSettings
from services.traces.store import TraceStore

__all__ = ["add_command", "parse_since"]

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SINCE: Final = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_TRACE_ID: Final = re.compile(r"[0-9a-f]{4,32}")
DEFAULT_LIMIT: Final = 20


def parse_since(text: str) -> float:
    """``90s``, ``10m``, ``2h``, ``7d`` → seconds."""
    match = _SINCE.fullmatch(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 10m, 2h or 7d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _trace_id(text: str) -> str:
    value = text.strip().lower()
    if not _TRACE_ID.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a trace id (32 hex digits, or the first few)")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def add_command(commands: Any) -> None:
    """Adds ``traces`` to the CLI's subcommands (``argparse`` subparsers)."""
    traces = commands.add_parser(
        "traces",
        help="list stored traces, or show one as a waterfall",
        description=(
            "Lists the traces `scoremesh up` stored under $SCOREMESH_HOME/traces, slowest first, or"
            " shows one trace as a waterfall of its spans."
        ),
    )
    traces.add_argument("trace_id", nargs="?", type=_trace_id, metavar="TRACE_ID", help="show this trace")
    traces.add_argument(
        "--service", help="only traces with a span of this service (scoring = scoremesh-scoring)"
    )
    traces.add_argument("--model", help=f"only traces with a span whose {MODEL_ATTRIBUTE} is this")
    traces.add_argument("--status", choices=["ok", "error"], help="only traces without or with an error")
    traces.add_argument(
        "--since", type=parse_since, metavar="DURATION", help="only traces started since (10m, 2h, 7d)"
    )
    traces.add_argument(
        "--limit", type=_positive, metavar="N", help=f"at most N traces (default {DEFAULT_LIMIT})"
    )
    traces.add_argument(
        "--sort", choices=["duration", "start"], default="duration", help="slowest (default) or newest first"
    )
    traces.add_argument("--json", action="store_true", help="print machine-readable JSON")
    traces.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = TracesSettings.from_env(MeshSettings.from_env().home)
    store = TraceStore.open_reader(settings.store_path)
    try:
        if args.trace_id is not None:
            filters = [
                f"--{name}"
                for name in ("service", "model", "status", "since", "limit")
                if getattr(args, name) is not None
            ]
            if filters:
                print(f"scoremesh: {', '.join(filters)} only apply to the list of traces", file=sys.stderr)
                return 2
            return _show(args, store, settings)
        return _list(args, store, settings)
    finally:
        if store is not None:
            store.close()


def _list(args: argparse.Namespace, store: TraceStore | None, settings: TracesSettings) -> int:
    query = TraceQuery(
        service=args.service,
        model=args.model,
        failed=None if args.status is None else args.status == "error",
        since_ns=None if args.since is None else time.time_ns() - int(args.since * 1e9),
        limit=args.limit or DEFAULT_LIMIT,
        order=args.sort,
    )
    found = store.traces(query) if store is not None else []
    if args.json:
        print_json([summary_json(t) for t in found])
        return 0
    if not found:
        stored = store.count()[0] if store is not None else 0
        where = settings.directory
        print(
            f"no traces match ({stored} stored in {where})" if stored else f"no traces stored in {where} yet",
            file=sys.stderr,
        )
        return 0
    print("\n".join(trace_table(found)))
    return 0


def _show(args: argparse.Namespace, store: TraceStore | None, settings: TracesSettings) -> int:
    ids = store.resolve(args.trace_id) if store is not None else []
    if len(ids) > 1:
        raise InvalidArgument(f"{args.trace_id} starts more than one trace id; give more of its digits")
    spans = store.spans(ids[0]) if store is not None and ids else []
    if not spans:
        raise NotFound(f"no trace {args.trace_id} in {settings.directory}")
    if args.json:
        start = min(s.start_ns for s in spans)
        print_json([span_json(span, depth=depth, trace_start_ns=start) for span, depth in tree_order(spans)])
        return 0
    print("\n".join(waterfall(spans)))
    return 0
