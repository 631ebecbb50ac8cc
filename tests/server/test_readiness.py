"""Per-model readiness: one unreadable checkpoint does not take the others down (unless --strict-models)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import grpc
import pytest

from server.client import FastAdaptClient
from server.wire import pb
from tests.server.conftest import TINY_SPECS, random_task


@pytest.fixture
def zoo_with_a_broken_checkpoint(tmp_path, tiny_model_dir):
    folder = tmp_path / "zoo"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "broken.pt").write_bytes(b"not a checkpoint, truncated")
    return folder


def test_the_other_models_serve_and_the_broken_one_is_reported_not_ready(make_server, zoo_with_a_broken_checkpoint,
                                                                         caplog):
    server = make_server(model_dir=zoo_with_a_broken_checkpoint)
    with FastAdaptClient(server.address, timeout=30) as client:
        infos = {m.name: m for m in client.stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
        assert set(infos) == {*TINY_SPECS, "broken"}
        assert all(infos[name].ready for name in TINY_SPECS)
        assert not infos["broken"].ready and "broken.pt" in infos["broken"].not_ready_reason
        got = client.stub.GetModel(pb.GetModelRequest(model="broken"), timeout=30).model
        assert not got.ready and got.not_ready_reason == infos["broken"].not_ready_reason
        sx, sy, qx = random_task(TINY_SPECS["tiny-5w"])
        _, prediction = client.adapt_and_predict("tiny-5w", sx, sy, qx)
        assert len(prediction.labels) == len(qx)  # the others serve
        with pytest.raises(grpc.RpcError) as err:
            client.adapt("broken", sx, sy)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "is not ready" in err.value.details()
    assert any("model not ready" in r.getMessage() for r in caplog.records)


def test_strict_models_refuses_to_start_naming_the_file(zoo_with_a_broken_checkpoint):
    result = subprocess.run(
        [sys.executable, "-m", "server", "--model-dir", str(zoo_with_a_broken_checkpoint), "--port", "0",
         "--device", "cpu", "--warmup", "none", "--strict-models"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "broken.pt" in result.stderr + result.stdout


def test_a_folder_of_only_broken_checkpoints_is_refused(tmp_path, make_server):
    folder = tmp_path / "only-broken"
    folder.mkdir()
    (folder / "a.pt").write_bytes(b"junk")
    with pytest.raises(FileNotFoundError, match="holds no servable checkpoint.*a.pt"):
        make_server(model_dir=folder)
