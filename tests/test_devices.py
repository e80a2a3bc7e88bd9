"""Device names are checked against the devices that exist: a missing GPU is a clear error that
lists what is there (settings: a configuration error; LoadModel: INVALID_ARGUMENT with reason
DEVICE_NOT_AVAILABLE), never torch's raw AssertionError from deep in a load."""
from __future__ import annotations

import grpc
import pytest
import torch

from grpc_testing import error_reason, load_model
from ops_testing import build_tiny_vit
from pipeserve.devices import DeviceNotAvailable, available_devices, device_problem
from pipeserve.pipelines.base import LoadOptions

MISSING_GPU = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 7}"


def test_names_that_exist_are_accepted():
    assert device_problem("cpu") is None and device_problem("auto") is None
    assert available_devices()[0] == "cpu" and available_devices()[-1] == "auto"
    for name in available_devices():
        assert device_problem(name) is None
    if torch.cuda.is_available():
        assert device_problem("cuda") is None


def test_missing_or_malformed_devices_say_which_exist():
    for name in (MISSING_GPU, "cuda:99", *(() if torch.cuda.is_available() else ("cuda",))):
        problem = device_problem(name)
        assert problem and "not available" in problem and "devices here: cpu" in problem, name
    for name in ("tpu", "gpu", "cuda:-1", "cuda:x", "cpu:1", "", "auto:0"):
        problem = device_problem(name)
        assert problem and "not a device name" in problem and "devices here: cpu" in problem, name
    with pytest.raises(DeviceNotAvailable) as info:
        LoadOptions(device=MISSING_GPU)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.reason == "DEVICE_NOT_AVAILABLE"


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return build_tiny_vit(tmp_path_factory.mktemp("devices_vit"))


@pytest.fixture
def own_server():
    """Not the shared session server: the model loaded here must not change other tests' health."""
    from grpc_testing import make_server

    server = make_server()
    yield server
    server.stop()


def test_load_model_on_a_missing_device_is_invalid_argument(own_server, vit_dir):
    for device in (MISSING_GPU, "tpu"):
        with pytest.raises(grpc.RpcError) as info:
            load_model(own_server, vit_dir, device=device)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert error_reason(info.value) == "DEVICE_NOT_AVAILABLE"
        assert "devices here: cpu" in info.value.details()
    assert own_server.manager.entries() == []  # nothing was left behind
    assert load_model(own_server, vit_dir, device="cpu").device == "cpu"
