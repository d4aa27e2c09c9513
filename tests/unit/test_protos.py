"""The protobuf contract: stubs are up to date, and the services have the shapes the design promises."""

from __future__ import annotations

import pytest

from raffm import protogen
from raffm.v1 import aggregator_pb2, common_pb2, extractor_pb2, registry_pb2


def test_committed_stubs_equal_freshly_generated_ones():
    assert protogen.stale_stubs() == [], "stubs are stale: run `make protos`"


def test_stale_stub_is_detected(tmp_path):
    """The check can fail: copy the repo's protos and stubs, edit one stub, expect it reported."""
    import shutil

    shutil.copytree(protogen.PROTO_ROOT, tmp_path / "protos")
    shutil.copytree(protogen.REPO_ROOT / protogen.PACKAGE_DIR, tmp_path / protogen.PACKAGE_DIR)
    stub = tmp_path / protogen.PACKAGE_DIR / "registry_pb2.py"
    stub.write_text(stub.read_text() + "\n# edited by hand\n")
    (tmp_path / protogen.PACKAGE_DIR / "common_pb2_grpc.py").unlink()
    assert protogen.stale_stubs(tmp_path) == ["raffm/v1/common_pb2_grpc.py", "raffm/v1/registry_pb2.py"]


def _methods(module, service: str) -> dict[str, tuple[bool, bool, str, str]]:
    desc = module.DESCRIPTOR.services_by_name[service]
    return {m.name: (m.client_streaming, m.server_streaming, m.input_type.name, m.output_type.name)
            for m in desc.methods}


def test_registry_service_shape():
    assert _methods(registry_pb2, "RegistryService") == {
        "Register": (False, False, "RegisterRequest", "RegisterReply"),
        "Heartbeat": (False, False, "HeartbeatRequest", "HeartbeatReply"),
        "UpdateProfile": (False, False, "UpdateProfileRequest", "UpdateProfileReply"),
        "GetDevice": (False, False, "GetDeviceRequest", "GetDeviceReply"),
        "ListDevices": (False, False, "ListDevicesRequest", "ListDevicesReply"),
        "Deregister": (False, False, "DeregisterRequest", "DeregisterReply"),
        "VerifyToken": (False, False, "VerifyTokenRequest", "VerifyTokenReply"),
        "WatchRevocations": (False, True, "WatchRevocationsRequest", "RevocationEvent"),
    }


def test_extractor_streams_slices_down():
    methods = _methods(extractor_pb2, "ExtractorService")
    assert methods["Plan"] == (False, False, "PlanRequest", "PlanReply")
    assert methods["DownloadSlice"] == (False, True, "DownloadRequest", "SliceMessage")
    assert [f.name for f in extractor_pb2.SliceMessage.DESCRIPTOR.oneofs_by_name["body"].fields] == [
        "manifest", "chunk"]


def test_aggregator_streams_updates_up_and_can_resume():
    methods = _methods(aggregator_pb2, "AggregatorService")
    assert methods["UploadUpdate"] == (True, False, "UploadMessage", "UploadAck")
    assert set(methods) == {"PollRound", "UploadUpdate", "QueryUpload", "ReportFailure", "GetJob", "GetRound",
                            "ListRounds"}
    assert [f.name for f in aggregator_pb2.PollReply.DESCRIPTOR.oneofs_by_name["action"].fields] == [
        "wait", "assignment"]
    assert [f.name for f in aggregator_pb2.UploadMessage.DESCRIPTOR.oneofs_by_name["body"].fields] == [
        "header", "manifest", "chunk"]
    assert "resume_from" in aggregator_pb2.QueryUploadReply.DESCRIPTOR.fields_by_name


@pytest.mark.parametrize("message, fields", [
    (common_pb2.LayerSpec, ["heads", "head_dim", "ffn"]),
    (common_pb2.ElasticSpec, ["hidden", "layers"]),
    (common_pb2.TensorInfo, ["name", "dtype", "shape", "nbytes", "sha256"]),
    (common_pb2.TensorChunk, ["tensor", "offset", "data"]),
])
def test_wire_messages_have_the_agreed_fields(message, fields):
    assert [f.name for f in message.DESCRIPTOR.fields] == fields


def test_large_models_fit_the_wire_types():
    """Offsets and sizes are uint64, so tensors and models beyond 2 GiB are representable."""
    chunk = common_pb2.TensorChunk(tensor="w", offset=5 * 2**30, data=b"x")
    assert common_pb2.TensorChunk.FromString(chunk.SerializeToString()).offset == 5 * 2**30
    manifest = common_pb2.Manifest(total_bytes=3 * 2**40)
    assert common_pb2.Manifest.FromString(manifest.SerializeToString()).total_bytes == 3 * 2**40


def test_every_message_and_rpc_is_documented():
    """Each proto's services and top-level messages carry a leading comment (the contract is the documentation)."""
    for proto in protogen.proto_files():
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            is_message = line.startswith(("message ", "enum ")) and not stripped.split()[1].endswith(
                ("Request", "Reply"))  # request/reply pairs are documented at their rpc
            if stripped.startswith(("rpc ", "service ")) or is_message:
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} {stripped!r} has no comment"
