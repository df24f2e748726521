"""The one place where the mesh's TLS settings become gRPC credentials.

With :class:`~services.mesh.settings.TlsSettings` (``SCOREMESH_TLS_*``), every mesh server
listens with :func:`add_port` (mutual TLS: a client without a certificate signed by the mesh's
CA fails the handshake, so its calls end UNAVAILABLE before reaching any servicer) and every
mesh channel opens with :func:`open_grpc_channel` (it presents the same certificate and checks
the server's). Without TLS settings both are plaintext, as on a developer machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

from services.mesh.settings import TlsSettings

__all__ = ["add_port", "channel_credentials", "open_grpc_channel", "tls_channel_options"]


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    """Presents the mesh certificate; requires and verifies the client's against the CA."""
    return grpc.ssl_server_credentials(
        [(tls.private_key, tls.certificate_chain)],
        root_certificates=tls.root_certificates,
        require_client_auth=True,
    )


def channel_credentials(tls: TlsSettings) -> grpc.ChannelCredentials:
    """Verifies the server's certificate against the CA; presents the mesh certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=tls.root_certificates,
        private_key=tls.private_key,
        certificate_chain=tls.certificate_chain,
    )


def tls_channel_options(tls: TlsSettings | None) -> list[tuple[str, Any]]:
    """Channel arguments that TLS adds: the name to check the server's certificate against,
    when ``SCOREMESH_TLS_SERVER_NAME`` overrides the host dialled."""
    if tls is None or not tls.server_name:
        return []
    return [("grpc.ssl_target_name_override", tls.server_name)]


def add_port(server: grpc.aio.Server, address: str, tls: TlsSettings | None) -> int:
    """Binds ``address`` on ``server``, with mutual TLS when ``tls`` is set; returns the port."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(tls))


def open_grpc_channel(
    target: str,
    tls: TlsSettings | None,
    *,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[Any] = (),
) -> grpc.aio.Channel:
    """A channel to ``target``: mutual TLS when ``tls`` is set, else plaintext. ``options``
    should already hold :func:`tls_channel_options` (``channels.channel_options`` does)."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options), interceptors=list(interceptors))
    return grpc.aio.secure_channel(
        target, channel_credentials(tls), options=list(options), interceptors=list(interceptors)
    )
