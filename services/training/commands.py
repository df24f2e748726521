"""``scoremesh train …`` and ``scoremesh datasets …``: the training service from a terminal."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from google.protobuf import json_format
from scoremesh.training.v1 import training_pb2 as pb

from services.mesh.errors import InvalidArgument
from services.terminal import as_json, print_json
from services.training.client import TrainingClient

EXIT_OK = 0
EXIT_FAILED = 1


def parse_arguments(pairs: Sequence[str]) -> dict[str, str]:
    """``k=v`` pairs; the service reads each value as the type the plugin declares."""
    arguments: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise InvalidArgument.for_field("arguments", f"--arg takes NAME=VALUE, not {pair!r}")
        arguments[name] = value
    return arguments


async def plugins(args: argparse.Namespace, client: TrainingClient) -> int:
    found = await client.plugins()
    if args.json:
        print_json([as_json(p) for p in found])
        return EXIT_OK
    for plugin in found:
        needs = [
            n
            for n, wanted in (
                ("a dataset", plugin.dataset_required),
                ("a base model", plugin.base_model_required),
            )
            if wanted
        ]
        print(
            f"{plugin.name} {plugin.version}: {plugin.description}"
            + (f" (needs {' and '.join(needs)})" if needs else "")
        )
        for argument in plugin.arguments:
            default = (
                "required"
                if argument.required
                else f"default {json_format.MessageToJson(argument.default_value).strip()}"
            )
            choices = f" one of {', '.join(argument.choices)};" if argument.choices else ""
            print(f"  --arg {argument.name}=<{argument.type}>  {argument.description} ({choices} {default})")
    return EXIT_OK


async def submit(args: argparse.Namespace, client: TrainingClient) -> int:
    job = await client.submit(
        args.plugin,
        parse_arguments(args.arg),
        model=args.model or "",
        alias=args.alias or "",
        promote_if=args.promote_if or "",
        dataset=args.dataset or "",
        base_model=args.base_model or "",
        idempotency_key=args.idempotency_key or "",
        max_attempts=args.max_attempts,
        time_limit_s=args.time_limit,
    )
    if args.json:
        print_json(as_json(job))
    else:
        print(f"job {job.id} {pb.JobState.Name(job.state)} ({job.plugin} → {job.registration.model})")
    return EXIT_OK


class _Bar:
    """A live progress line on ``out`` (stderr) for a terminal, nothing otherwise; the other
    lines go to stdout."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._live = out.isatty()
        self._drawn = False

    def draw(self, fraction: float, message: str) -> None:
        if self._live:
            bar = "#" * int(max(0.0, min(fraction, 1.0)) * 30)
            self._out.write(f"\r[{bar:<30}] {fraction:6.1%} {message[:60]:<60}")
            self._out.flush()
            self._drawn = True

    def line(self, text: str) -> None:
        """``text`` on stdout, the bar (if drawn) cleared first."""
        if self._drawn:
            self._out.write("\r" + " " * 100 + "\r")
            self._out.flush()
            self._drawn = False
        print(text, flush=True)


def describe_event(event: pb.JobEvent) -> str | None:
    """A line for a state change, a metric or a log; None for progress (drawn as a bar)."""
    kind = event.WhichOneof("event")
    if kind == "state":
        state = pb.JobState.Name(event.state.state)
        extra = f" version {event.state.version}" if event.state.version else ""
        detail = f": {event.state.detail}" if event.state.detail else ""
        return f"{state}{extra}{detail}"
    if kind == "metric":
        step = f" (step {event.metric.step})" if event.metric.step else ""
        return f"{event.metric.name} = {event.metric.value:.6g}{step}"
    if kind == "log":
        return str(event.log)
    return None


async def watch(args: argparse.Namespace, client: TrainingClient) -> int:
    """Follows a job to its end: exit 0 when it SUCCEEDED, 1 when it FAILED or was CANCELLED."""
    bar = _Bar(sys.stderr)
    async for event in client.watch(args.job):
        if args.json:
            print(json.dumps(as_json(event), sort_keys=True), flush=True)
        elif event.WhichOneof("event") == "progress":
            bar.draw(event.progress.fraction, event.progress.message)
        else:
            text = describe_event(event)
            if text is not None:
                bar.line(text)
    job = await client.get(args.job)
    return EXIT_OK if job.state == pb.SUCCEEDED else EXIT_FAILED


async def list_jobs(args: argparse.Namespace, client: TrainingClient) -> int:
    state = pb.JobState.Value(args.state.upper()) if args.state else pb.JOB_STATE_UNSPECIFIED
    jobs = await client.jobs(state)
    if args.json:
        print_json([as_json(j) for j in jobs])
        return EXIT_OK
    print(f"{'ID':<36}  {'STATE':<9} {'PLUGIN':<16} {'MODEL':<24} {'VERSION':>7}  {'PROGRESS':>8}  ERROR")
    for job in jobs:
        version = str(job.version) if job.version else "-"
        print(
            f"{job.id:<36}  {pb.JobState.Name(job.state):<9} {job.plugin:<16} {job.registration.model:<24}"
            f" {version:>7}  {job.progress:8.0%}  {job.error}"
        )
    return EXIT_OK


async def cancel(args: argparse.Namespace, client: TrainingClient) -> int:
    job = await client.cancel(args.job)
    if args.json:
        print_json(as_json(job))
    elif job.state == pb.RUNNING:
        print(f"job {job.id}: cancel requested; its worker stops it within seconds")
    else:
        print(f"job {job.id} {pb.JobState.Name(job.state)}")
    return EXIT_OK


async def push_dataset(args: argparse.Namespace, client: TrainingClient) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise InvalidArgument.for_field("file", f"{path}: no such file")
    dataset = await client.push_dataset(args.name, path, args.format or "")
    if args.json:
        print_json(as_json(dataset))
    else:
        print(
            f"dataset {dataset.name}: {dataset.rows} rows x {dataset.columns} columns ({dataset.sha256[:12]})"
        )
    return EXIT_OK


async def feedback_dataset(args: argparse.Namespace, client: TrainingClient) -> int:
    dataset = await client.feedback_dataset(args.name, args.model, args.version)
    if args.json:
        print_json(as_json(dataset))
    else:
        shape = f"{dataset.rows} labelled rows x {dataset.columns} columns"
        print(f"dataset {dataset.name}: {shape} from {args.model}")
    return EXIT_OK


async def list_datasets(args: argparse.Namespace, client: TrainingClient) -> int:
    datasets = await client.datasets()
    if args.json:
        print_json([as_json(d) for d in datasets])
        return EXIT_OK
    print(f"{'NAME':<32} {'FORMAT':<6} {'ROWS':>9} {'COLUMNS':>7}  {'SHA256':<12}  SOURCE")
    for dataset in datasets:
        print(
            f"{dataset.name:<32} {dataset.format:<6} {dataset.rows:>9} {dataset.columns:>7}"
            f"  {dataset.sha256[:12]:<12}  {dataset.source}"
        )
    return EXIT_OK


def add_commands(commands: Any, run: Any) -> None:
    """Adds ``train`` and ``datasets`` to the CLI's subcommands; ``run(handler)`` makes the
    function argparse calls."""
    train = commands.add_parser("train", help="run training jobs")
    verbs = train.add_subparsers(dest="verb", required=True)

    def verb(parent: Any, name: str, help_text: str, handler: Any) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(name, help=help_text)
        sub.add_argument("--json", action="store_true", help="print machine-readable JSON")
        sub.set_defaults(run=run(handler))
        return sub

    verb(verbs, "plugins", "list the plugins and their arguments", plugins)
    submitting = verb(verbs, "submit", "queue a training job", submit)
    submitting.add_argument("plugin")
    submitting.add_argument(
        "--arg", action="append", default=[], metavar="NAME=VALUE", help="one per argument"
    )
    submitting.add_argument("--dataset", help="a dataset of yours")
    submitting.add_argument("--base-model", help="MODEL, MODEL:VERSION or MODEL@ALIAS to start from")
    submitting.add_argument("--model", help="the model the new version joins (default: the base model's)")
    submitting.add_argument("--alias", help="move this alias to the new version")
    submitting.add_argument("--promote-if", help="only if this holds, e.g. 'accuracy >= 0.9'")
    submitting.add_argument("--idempotency-key", help="resubmitting with it returns the same job")
    submitting.add_argument("--max-attempts", type=int, default=0)
    submitting.add_argument("--time-limit", type=int, default=0, help="seconds per attempt")
    watching = verb(verbs, "watch", "follow a job; exit 0 when it succeeds", watch)
    watching.add_argument("job")
    listing = verb(verbs, "list", "list your jobs, newest first", list_jobs)
    listing.add_argument("--state", choices=[s.lower() for s in pb.JobState.keys()[1:]])
    cancelling = verb(verbs, "cancel", "cancel a job", cancel)
    cancelling.add_argument("job")

    datasets = commands.add_parser("datasets", help="push and list training datasets")
    dataset_verbs = datasets.add_subparsers(dest="verb", required=True)
    pushing = verb(dataset_verbs, "push", "upload a CSV (header row) or NPZ (X, y) file", push_dataset)
    pushing.add_argument("name")
    pushing.add_argument("file")
    pushing.add_argument("--format", choices=["csv", "npz"], help="default: the file's suffix")
    verb(dataset_verbs, "list", "list your datasets", list_datasets)
    from_feedback = verb(
        dataset_verbs, "from-feedback", "build a dataset from a model's feedback", feedback_dataset
    )
    from_feedback.add_argument("name")
    from_feedback.add_argument("--model", required=True)
    from_feedback.add_argument("--version", type=int, default=0, help="only this version's predictions")
