"""The Open Inference Protocol's messages inside the scoring service.

tritonclient ships its own generated ``inference`` messages, and a process can hold only one
definition of each protobuf symbol: ours (``gen/inference``) and tritonclient's cannot be
imported side by side. The scoring service talks to Triton through ``tritonclient.grpc.aio``,
so it also serves with tritonclient's messages. They are the same wire format as
``protos/inference/grpc_service.proto`` (same names and field numbers; a test holds them to
it), so callers with either set of stubs, or stock tritonclient, interoperate.
"""

from __future__ import annotations

from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

SERVICE_NAME = "inference.GRPCInferenceService"

__all__ = ["SERVICE_NAME", "pb", "pb_grpc"]
