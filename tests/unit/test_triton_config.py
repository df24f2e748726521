"""What Triton is told about a version: model names, model configs and files."""

from __future__ import annotations

import ast
import json

import pytest

from services.registry.domain import MODEL_NAME_PATTERN, Signature, TensorSpec
from services.scoring.backend import LoadedVersion
from services.scoring.triton_config import (
    PYTHON_MODEL_SOURCE,
    TRITON_DATATYPES,
    TritonBackendKind,
    model_config,
    model_config_json,
    model_files,
    needs_unit_axis,
    triton_model_name,
)


def _version(
    inputs: tuple[TensorSpec, ...] = (TensorSpec("input", "FP32", (-1, 4)),),
    outputs: tuple[TensorSpec, ...] = (TensorSpec("probabilities", "FP32", (-1, 3)),),
    max_batch_size: int = 16,
    model: str = "fraud",
    version: int = 3,
) -> LoadedVersion:
    return LoadedVersion(
        model=model,
        version=version,
        sha256="0" * 64,
        signature=Signature(inputs, outputs),
        onnx_bytes=b"onnx",
        max_batch_size=max_batch_size,
    )


def test_batching_config_drops_the_batch_dimension_and_turns_on_dynamic_batching() -> None:
    config = model_config(_version(), gpu=False, queue_delay_us=250)

    assert config["name"] == "fraud.v3"
    assert config["backend"] == "python"
    assert "platform" not in config
    assert config["max_batch_size"] == 16
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [4]}]
    assert config["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [3]}]
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 250}
    assert config["instance_group"] == [{"kind": "KIND_CPU", "count": 1}]


def test_non_batching_config_keeps_every_dimension_and_has_no_batcher() -> None:
    version = _version(
        inputs=(TensorSpec("input", "FP32", (2, -1)),),
        outputs=(TensorSpec("output", "FP32", (2, -1)),),
        max_batch_size=0,
    )

    config = model_config(version, gpu=False)

    assert config["max_batch_size"] == 0
    assert config["input"][0]["dims"] == [2, -1]
    assert config["output"][0]["dims"] == [2, -1]
    assert "dynamic_batching" not in config


def test_gpu_flag_asks_for_gpu_instances() -> None:
    config = model_config(_version(), gpu=True, instance_count=2)

    assert config["instance_group"] == [{"kind": "KIND_GPU", "count": 2}]


def test_onnxruntime_kind_names_the_platform_and_ships_only_the_graph() -> None:
    version = _version()

    config = model_config(version, gpu=True, kind=TritonBackendKind.ONNXRUNTIME)
    files = model_files(version, TritonBackendKind.ONNXRUNTIME)

    assert config["platform"] == "onnxruntime_onnx"
    assert config["backend"] == "onnxruntime"
    assert files == {"file:1/model.onnx": b"onnx"}


def test_python_kind_ships_the_graph_and_the_model_source() -> None:
    files = model_files(_version())

    assert files == {"file:1/model.onnx": b"onnx", "file:1/model.py": PYTHON_MODEL_SOURCE.encode()}
    ast.parse(PYTHON_MODEL_SOURCE)  # the generated model is valid Python


@pytest.mark.parametrize(("datatype", "triton_type"), sorted(TRITON_DATATYPES.items()))
def test_every_datatype_maps_to_its_triton_type(datatype: str, triton_type: str) -> None:
    version = _version(
        inputs=(TensorSpec("x", datatype, (-1, 2)),), outputs=(TensorSpec("y", datatype, (-1, 2)),)
    )

    config = model_config(version, gpu=False, kind=TritonBackendKind.ONNXRUNTIME)

    assert config["input"][0]["data_type"] == triton_type
    assert config["output"][0]["data_type"] == triton_type


def test_the_datatype_table_covers_every_oip_type() -> None:
    assert TRITON_DATATYPES["BYTES"] == TRITON_DATATYPES["STRING"] == "TYPE_STRING"
    assert {
        "BOOL",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "FP16",
        "BF16",
        "FP32",
        "FP64",
        "BYTES",
    } <= set(TRITON_DATATYPES)


def test_unknown_datatype_is_refused() -> None:
    version = _version(inputs=(TensorSpec("x", "COMPLEX64", (-1,)),))

    with pytest.raises(ValueError, match="COMPLEX64"):
        model_config(version, gpu=False)


def test_tensors_without_dims_besides_the_batch_travel_as_unit_axis_reshaped_away() -> None:
    per_row = TensorSpec("ids", "INT64", (-1,))
    scalar = TensorSpec("scale", "FP32", ())
    batching = model_config(_version(inputs=(per_row,)), gpu=False)
    plain = model_config(_version(inputs=(scalar,), max_batch_size=0), gpu=False)

    assert batching["input"][0] == {
        "name": "ids",
        "data_type": "TYPE_INT64",
        "dims": [1],
        "reshape": {"shape": []},
    }
    assert plain["input"][0]["dims"] == [1]
    assert plain["input"][0]["reshape"] == {"shape": []}
    assert needs_unit_axis(per_row, batching=True)
    assert needs_unit_axis(scalar, batching=False)
    assert not needs_unit_axis(per_row, batching=False)
    assert not needs_unit_axis(TensorSpec("x", "FP32", (-1, 4)), batching=True)


def test_a_scalar_cannot_carry_a_batch() -> None:
    with pytest.raises(ValueError, match="scalar"):
        model_config(_version(inputs=(TensorSpec("scale", "FP32", ()),)), gpu=False)


def test_config_json_round_trips() -> None:
    version = _version()

    assert json.loads(model_config_json(version, gpu=False)) == model_config(version, gpu=False)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("a", 12), ("a", 1)),
        (("a.v1", 2), ("a", 12)),
        (("a.v1", 2), ("a.v12", 1)),
        (("a-v", 1), ("a", 1)),
        (("model", 10), ("model", 1)),
    ],
)
def test_model_names_are_injective(first: tuple[str, int], second: tuple[str, int]) -> None:
    assert triton_model_name(*first) != triton_model_name(*second)


def test_model_names_decode_back_to_model_and_version() -> None:
    for model, version in [("a", 1), ("a.v1", 2), ("x.v", 30), ("A_b-c.d", 999)]:
        name = triton_model_name(model, version)
        decoded_model, decoded_version = name.rsplit(".v", 1)
        assert (decoded_model, int(decoded_version)) == (model, version)
        assert MODEL_NAME_PATTERN.fullmatch(name)


def test_model_names_need_a_positive_version() -> None:
    with pytest.raises(ValueError, match="positive"):
        triton_model_name("a", 0)


def test_the_python_backend_refuses_bf16_signatures() -> None:
    signature = Signature((TensorSpec("x", "BF16", (-1, 2)),), (TensorSpec("y", "BF16", (-1, 2)),))
    version = LoadedVersion("m", 1, "0" * 64, signature, b"", 8)
    with pytest.raises(ValueError, match="BF16"):
        model_config(version, gpu=False, kind=TritonBackendKind.PYTHON)
    config = model_config(version, gpu=False, kind=TritonBackendKind.ONNXRUNTIME)
    assert config["input"][0]["data_type"] == "TYPE_BF16"
