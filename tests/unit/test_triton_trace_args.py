"""Triton's trace flags follow the OpenTelemetry variables the services read."""

from __future__ import annotations

import pytest

from services.scoring.triton_server import opentelemetry_trace_args, trace_args_from_env

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, []),
        (ENDPOINT, opentelemetry_trace_args("127.0.0.1:4318/v1/traces", rate=1)),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"},
            opentelemetry_trace_args("c:4318/v1/traces"),
        ),
        (
            {**ENDPOINT, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
            # Triton follows the traceparent's sampled flag: it traces whatever the mesh keeps
            opentelemetry_trace_args("127.0.0.1:4318/v1/traces", rate=1),
        ),
        ({**ENDPOINT, "OTEL_TRACES_SAMPLER": "always_off"}, []),
        ({**ENDPOINT, "OTEL_SDK_DISABLED": "true"}, []),
        ({**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, []),
        ({**ENDPOINT, "OTEL_TRACES_EXPORTER": "none"}, []),
    ],
)
def test_trace_args_follow_the_standard_variables(env: dict[str, str], expected: list[str]) -> None:
    assert trace_args_from_env(env) == expected
