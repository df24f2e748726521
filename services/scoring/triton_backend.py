"""The Triton backend: runs registry versions on an NVIDIA Triton server over gRPC.

Each registry version becomes one Triton model (``triton_config.triton_model_name``), loaded
with ``load_model(config=..., files=...)`` so that nothing needs to be on Triton's disk.
A load is confirmed by a real inference on generated inputs: Triton keeps saying
"model ready" after a python backend stub died, so only an inference proves it can serve.

The backend remembers what it loaded. After Triton restarts (``LocalTriton`` calls
:meth:`TritonBackend.reload_all`), every remembered version is loaded again; until then an
inference on one of them fails with ``Unavailable``, not ``NotFound``: the version is still
meant to be served, Triton just lost it.

tritonclient reports every failure as ``InferenceServerException`` with the gRPC code as a
string (``"StatusCode.UNAVAILABLE"``); :func:`translate_error` turns those into mesh errors.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Final

import numpy as np
import tritonclient.grpc.aio as triton_grpc
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from services.mesh.errors import DeadlineExceeded, InvalidArgument, MeshError, NotFound, Unavailable
from services.mesh.settings import TlsSettings
from services.mesh.tls import channel_credentials, tls_channel_options
from services.registry.domain import TensorSpec
from services.scoring import tensors, triton_config
from services.scoring.backend import Array, LoadedVersion
from services.scoring.triton_config import TritonBackendKind

log = logging.getLogger(__name__)

__all__ = ["TritonBackend", "translate_error"]

MAX_TIMEOUT_S: Final = 60.0
"""The deadline of an inference whose caller gave none (the service always gives one)."""
LOAD_TIMEOUT_S: Final = 300.0
ADMIN_TIMEOUT_S: Final = 30.0
HEALTH_TIMEOUT_S: Final = 2.0
_RECONNECT_POLL_S: Final = 0.05
# what Triton answers, as INTERNAL, once a python-backend model's stub process has died
_STUB_DIED: Final = "is not healthy"
# what Triton answers when a model config names a backend the server was built without
_NO_BACKEND: Final = "unable to find backend library"

# Reconnect quickly after Triton restarts (gRPC's default backoff grows to two minutes);
# calls during an outage still fail at once, as UNAVAILABLE, since they do not wait for ready.
_RECONNECT_ARGS: Final = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class TritonBackend:
    """A :class:`~services.scoring.backend.Backend` over ``tritonclient.grpc.aio``.

    ``max_message_bytes`` is the scoring service's gRPC message limit, used both ways on the
    channel to Triton. ``admin_headers`` unlock Triton's model-repository API
    (``LocalTriton.admin_headers``). ``gpu`` asks for ``KIND_GPU`` instances. ``kind`` None
    uses Triton's onnxruntime backend when the server has one and the python backend (which
    runs onnxruntime in a stub process) otherwise. ``tls`` makes the channel mutual TLS with
    the mesh's certificate (a remote Triton started with ``--grpc-use-ssl-mutual``)."""

    name = "triton"

    def __init__(
        self,
        url: str,
        *,
        max_message_bytes: int,
        admin_headers: Mapping[str, str] | None = None,
        gpu: bool = False,
        kind: TritonBackendKind | None = TritonBackendKind.PYTHON,
        instance_count: int = 1,
        queue_delay_us: int = triton_config.DEFAULT_QUEUE_DELAY_US,
        load_timeout_s: float = LOAD_TIMEOUT_S,
        tls: TlsSettings | None = None,
    ) -> None:
        self._url = url
        self._tls = tls
        self._max_message_bytes = max_message_bytes
        self._admin_headers = dict(admin_headers or {})
        self._gpu = gpu
        # None: Triton's onnxruntime backend where the server has it, else the python one,
        # learnt from the first load
        self._kind = kind
        self._instance_count = instance_count
        self._queue_delay_us = queue_delay_us
        self._load_timeout_s = load_timeout_s
        self._client = self._connect(url)
        self._loaded: dict[tuple[str, int], LoadedVersion] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._repairing: set[tuple[str, int]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return self._url

    @property
    def kind(self) -> TritonBackendKind | None:
        """How Triton runs the models; None until the first load has found out."""
        return self._kind

    @property
    def loaded(self) -> frozenset[tuple[str, int]]:
        """The (model, version) pairs this backend has loaded and not unloaded."""
        return frozenset(self._loaded)

    def _connect(self, url: str) -> triton_grpc.InferenceServerClient:
        return triton_grpc.InferenceServerClient(
            url,
            creds=channel_credentials(self._tls) if self._tls is not None else None,
            channel_args=[
                ("grpc.max_send_message_length", self._max_message_bytes),
                ("grpc.max_receive_message_length", self._max_message_bytes),
                *_RECONNECT_ARGS,
                *tls_channel_options(self._tls),
            ],
        )

    # Backend

    async def load(self, version: LoadedVersion) -> None:
        """Loads ``version`` into Triton and runs a canary inference on it. Idempotent: a
        version already loaded (same digest) returns at once."""
        async with self._lock(version.key):
            current = self._loaded.get(version.key)
            if current is not None and current.sha256 == version.sha256:
                return
            await self._load_into_triton(version)
            self._loaded[version.key] = version

    async def unload(self, model: str, version: int) -> None:
        """Unloads the version from Triton (idempotent; Triton lets in-flight requests finish)."""
        key = (model, version)
        async with self._lock(key):
            if self._loaded.pop(key, None) is None:
                return
            name = triton_config.triton_model_name(model, version)
            try:
                await self._client.unload_model(
                    name, headers=self._admin_headers, client_timeout=ADMIN_TIMEOUT_S
                )
            except InferenceServerException as exc:
                # forgotten either way: a Triton that restarted no longer has it
                log.warning("unloading %s from Triton failed: %s", name, exc)
        self._locks.pop(key, None)

    async def infer(
        self,
        version: LoadedVersion,
        inputs: Mapping[str, Array],
        outputs: Sequence[str],
        *,
        timeout_s: float | None,
        trace_headers: Mapping[str, str] | None = None,
    ) -> dict[str, Array]:
        if version.key not in self._loaded:
            raise NotFound(
                f"model {version.model} version {version.version} is not loaded on Triton",
                reason="VERSION_NOT_LOADED",
            )
        return await self._infer(version, inputs, outputs, timeout_s=timeout_s, headers=trace_headers)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.close()

    # beyond the protocol

    async def healthy(self, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
        """Whether Triton answers ServerLive (it says nothing about each model: see
        :meth:`load`)."""
        try:
            return bool(await self._client.is_server_live(client_timeout=timeout_s))
        except InferenceServerException:
            return False

    async def reload_all(self, url: str | None = None) -> None:
        """Loads every remembered version again, after Triton restarted (``LocalTriton``'s
        ``on_restart``). A different ``url`` replaces the channel first. Versions that fail
        stay remembered (their inferences fail with ``Unavailable``) and are logged."""
        if url is not None and url != self._url:
            old, self._client, self._url = self._client, self._connect(url), url
            await old.close()
        # the channel may still be backing off from the outage, and a load does not wait for
        # it to reconnect: wait here until Triton answers
        deadline = time.monotonic() + self._load_timeout_s
        while not await self.healthy():
            if time.monotonic() > deadline:
                log.error(
                    "Triton at %s did not answer; %d versions not reloaded", self._url, len(self._loaded)
                )
                return
            await asyncio.sleep(_RECONNECT_POLL_S)
        failures = 0
        for key, version in list(self._loaded.items()):
            async with self._lock(key):
                if self._loaded.get(key) is not version:
                    continue  # unloaded or replaced meanwhile
                try:
                    await self._load_into_triton(version)
                except MeshError as exc:
                    failures += 1
                    log.error("reloading %s version %s into Triton failed: %s", key[0], key[1], exc.message)
        log.info("reloaded %d of %d versions into Triton", len(self._loaded) - failures, len(self._loaded))

    # internals

    def _repair(self, version: LoadedVersion) -> None:
        """Reloads a version whose python-backend stub died. Triton never restarts such a stub
        by itself and keeps calling the model ready, while every inference fails after a
        second; a load of the unchanged model does nothing, so it is unloaded first."""
        if version.key in self._repairing:
            return
        self._repairing.add(version.key)
        task = asyncio.ensure_future(self._reload_one(version))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload_one(self, version: LoadedVersion) -> None:
        name = triton_config.triton_model_name(version.model, version.version)
        try:
            async with self._lock(version.key):
                if self._loaded.get(version.key) is not version:
                    return
                log.warning("the python backend stub of %s died; reloading it into Triton", name)
                await self._client.unload_model(
                    name, headers=self._admin_headers, client_timeout=ADMIN_TIMEOUT_S
                )
                await self._load_into_triton(version)
                log.info("reloaded %s into Triton", name)
        except (MeshError, InferenceServerException) as exc:
            log.error("reloading %s into Triton failed: %s", name, exc)
        finally:
            self._repairing.discard(version.key)

    def _lock(self, key: tuple[str, int]) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def _load_into_triton(self, version: LoadedVersion) -> None:
        name = triton_config.triton_model_name(version.model, version.version)
        try:
            await self._send_model(name, version, self._kind or TritonBackendKind.ONNXRUNTIME)
            self._kind = self._kind or TritonBackendKind.ONNXRUNTIME
        except InferenceServerException as exc:
            if self._kind is not None or _NO_BACKEND not in (exc.message() or ""):
                raise _load_failed(name, exc) from None
            log.info("Triton at %s has no onnxruntime backend; models run in its python backend", self._url)
            self._kind = TritonBackendKind.PYTHON
            try:
                await self._send_model(name, version, self._kind)
            except InferenceServerException as retry:
                raise _load_failed(name, retry) from None
        try:
            sample = tensors.sample_inputs(version.signature)
            await self._infer(version, sample, (), timeout_s=self._load_timeout_s, headers=None)
        except MeshError as exc:
            raise Unavailable(
                f"Triton loaded {name} but its canary inference failed: {exc.message}",
                reason="TRITON_CANARY_FAILED",
            ) from None

    async def _send_model(self, name: str, version: LoadedVersion, kind: TritonBackendKind) -> None:
        try:
            config = triton_config.model_config_json(
                version,
                gpu=self._gpu,
                kind=kind,
                instance_count=self._instance_count,
                queue_delay_us=self._queue_delay_us,
            )
        except ValueError as exc:
            raise InvalidArgument(str(exc), reason="UNSUPPORTED_SIGNATURE") from None
        await self._client.load_model(
            name,
            config=config,
            files=triton_config.model_files(version, kind),
            headers=self._admin_headers,
            client_timeout=self._load_timeout_s,
        )

    async def _infer(
        self,
        version: LoadedVersion,
        inputs: Mapping[str, Array],
        outputs: Sequence[str],
        *,
        timeout_s: float | None,
        headers: Mapping[str, str] | None,
    ) -> dict[str, Array]:
        name = triton_config.triton_model_name(version.model, version.version)
        batching = version.max_batch_size > 0
        specs = {spec.name: spec for spec in version.signature.inputs}
        output_specs = {spec.name: spec for spec in version.signature.outputs}
        wanted = list(outputs) or list(output_specs)
        request = [_infer_input(name_, array, specs.get(name_), batching) for name_, array in inputs.items()]
        timeout = MAX_TIMEOUT_S if timeout_s is None else min(max(timeout_s, 0.0), MAX_TIMEOUT_S)
        if timeout <= 0:
            raise DeadlineExceeded(f"no time left to run {name} on Triton")
        try:
            result = await self._client.infer(
                name,
                request,
                outputs=[InferRequestedOutput(output) for output in wanted],
                client_timeout=timeout,
                # a call outside any trace (load canaries, health canaries) says "not
                # sampled": Triton, which traces every request it sees, then leaves it alone
                headers=dict(headers) if headers else _untraced(),
            )
        except InferenceServerException as exc:
            if _STUB_DIED in (exc.message() or "") and version.key in self._loaded:
                self._repair(version)
            raise translate_error(exc, name, loaded=version.key in self._loaded) from None
        arrays: dict[str, Array] = {}
        for output in wanted:
            array = result.as_numpy(output)
            if array is None:
                raise Unavailable(f"Triton's answer from {name} lacks output {output!r}")
            spec = output_specs.get(output)
            if spec is not None and triton_config.needs_unit_axis(spec, batching):
                array = array.reshape(array.shape[:-1])
            arrays[output] = array
        return arrays


def _infer_input(name: str, array: Array, spec: TensorSpec | None, batching: bool) -> InferInput:
    array = np.asarray(array)
    if array.dtype.kind == "U":
        array = array.astype(np.object_)  # tritonclient sends str elements as UTF-8
    datatype = np_to_triton_dtype(array.dtype)
    if datatype is None:
        raise InvalidArgument.for_field(f"inputs.{name}", f"numpy dtype {array.dtype} has no Triton datatype")
    if spec is not None and triton_config.needs_unit_axis(spec, batching):
        # declared [1] reshaped to [] in the model config (see triton_config)
        array = array.reshape((*array.shape, 1))
    infer_input = InferInput(name, list(array.shape), datatype)
    try:
        infer_input.set_data_from_numpy(np.ascontiguousarray(array))
    except InferenceServerException as exc:
        raise InvalidArgument.for_field(f"inputs.{name}", exc.message()) from None
    return infer_input


def _load_failed(name: str, exc: InferenceServerException) -> Unavailable:
    return Unavailable(f"Triton could not load {name}: {exc.message()}", reason="TRITON_LOAD_FAILED")


def translate_error(exc: InferenceServerException, model_name: str, *, loaded: bool) -> MeshError:
    """Maps a tritonclient failure to the mesh error a Backend raises.

    ``loaded`` says whether this backend believes the model is loaded: Triton's NOT_FOUND is
    then an outage (Triton restarted and lost it), not a missing version."""
    status = exc.status() or ""
    message = exc.message() or str(exc)
    code = status.removeprefix("StatusCode.")
    if code == "INVALID_ARGUMENT":
        return InvalidArgument(f"{model_name}: {message}", reason="TRITON_INVALID_INPUT")
    if code == "DEADLINE_EXCEEDED":
        return DeadlineExceeded(f"{model_name} did not answer in time on Triton")
    if code == "NOT_FOUND":
        if loaded:
            return Unavailable(
                f"Triton does not have {model_name} (restarted?): {message}", reason="TRITON_LOST_MODEL"
            )
        return NotFound(f"Triton does not have {model_name}: {message}", reason="VERSION_NOT_LOADED")
    if code == "RESOURCE_EXHAUSTED" and "larger than max" in message:
        return InvalidArgument(f"{model_name}: {message}", reason="MESSAGE_TOO_LARGE")
    if code == "UNAVAILABLE":
        return Unavailable(f"Triton is unavailable: {message}", reason="TRITON_UNAVAILABLE")
    # INTERNAL, UNKNOWN, CANCELLED…: the backend failed, not the request (the breaker counts it)
    return Unavailable(
        f"Triton failed to run {model_name} ({code or 'no status'}): {message}", reason="TRITON_FAILED"
    )


def _untraced() -> dict[str, str]:
    """A W3C traceparent that Triton continues without recording (flags 00)."""
    return {"traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"}
