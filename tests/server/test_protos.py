"""The wire contract: the committed stubs match the proto, and the names clients depend on exist."""

from __future__ import annotations

import importlib.util

from server.protogen import PROTO_FILES, PROTOS_DIR, generate, generated_files
from server.wire import SERVICE_NAME, pb, pb_grpc


def test_committed_stubs_are_not_stale(tmp_path):
    # grpcio-tools is pinned (requirements.txt): without it this check would silently not run, so it fails instead
    assert importlib.util.find_spec("grpc_tools") is not None, (
        "grpcio-tools is not installed, so the committed stubs cannot be checked: run `make setup`")
    generate(tmp_path)
    for proto in PROTO_FILES:
        for name in generated_files(proto):
            committed = PROTOS_DIR / name
            assert committed.exists(), f"{committed} is missing: run `make protos`"
            assert committed.read_bytes() == (tmp_path / name).read_bytes(), (
                f"{committed} is stale: it differs from what protoc generates from {proto}; run `make protos`"
            )


def test_contract_names():
    assert SERVICE_NAME == "fastadapt.v1.FastAdapt"
    service = pb.DESCRIPTOR.services_by_name["FastAdapt"]
    methods = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert methods == {
        "Adapt": ("AdaptRequest", "AdaptResponse"),
        "Predict": ("PredictRequest", "PredictResponse"),
        "AdaptAndPredict": ("AdaptAndPredictRequest", "AdaptAndPredictResponse"),
        "ListModels": ("ListModelsRequest", "ListModelsResponse"),
        "GetModel": ("GetModelRequest", "GetModelResponse"),
        "ExportAdapted": ("ExportAdaptedRequest", "ExportAdaptedResponse"),
        "Release": ("ReleaseRequest", "ReleaseResponse"),
    }
    tensor = {f.name: f.number for f in pb.Tensor.DESCRIPTOR.fields}
    assert tensor == {"dtype": 1, "shape": 2, "data": 3}
    assert {v.name: v.number for v in pb.DType.DESCRIPTOR.values} == {
        "DTYPE_UNSPECIFIED": 0, "UINT8": 1, "FLOAT16": 2, "FLOAT32": 3,
    }
    combined = {f.name: f.number for f in pb.AdaptAndPredictRequest.DESCRIPTOR.fields}
    assert combined["adapt"] == 1 and combined["query_x"] == 2
    response = {f.name: f.number for f in pb.AdaptAndPredictResponse.DESCRIPTOR.fields}
    assert response == {"adapt": 1, "predict": 2}
    adapt = {f.name for f in pb.AdaptRequest.DESCRIPTOR.fields}
    assert {"model", "support_x", "support_y", "steps", "inner_lr"} <= adapt
    assert hasattr(pb_grpc, "FastAdaptStub") and hasattr(pb_grpc, "add_FastAdaptServicer_to_server")
