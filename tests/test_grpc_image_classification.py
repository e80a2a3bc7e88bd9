"""Image classification end to end through gRPC: a tiny random ViT loaded with LoadModel from a
local path classifies exactly as transformers.pipeline does; health flips with load/unload;
bad input gets a specific status and the next call works."""
from __future__ import annotations

import io

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from grpc_testing import error_reason, load_model
from harness import save_checkpoint
from ops_testing import build_tiny_vit

transformers = pytest.importorskip("transformers")

SERVICE = "pipeserve.v1.ImageClassificationService"


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return build_tiny_vit(tmp_path_factory.mktemp("grpc_vit"))


def _png(seed: int, size=(64, 48)) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _stubs(server):
    from pipeserve.v1 import image_classification_pb2_grpc, model_pb2_grpc

    return (image_classification_pb2_grpc.ImageClassificationServiceStub(server.channel),
            model_pb2_grpc.ModelServiceStub(server.channel),
            health_pb2_grpc.HealthStub(server.channel))


def _health(stub) -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10).status


def test_classifies_as_transformers_and_health_follows_load_unload(grpc_server, vit_dir):
    from pipeserve.v1 import common_pb2, image_classification_pb2 as pb, model_pb2

    images, models, health = _stubs(grpc_server)
    assert _health(health) == health_pb2.HealthCheckResponse.NOT_SERVING
    info = load_model(grpc_server, vit_dir)
    assert info.state == model_pb2.MODEL_STATE_READY
    assert info.task == model_pb2.TASK_IMAGE_CLASSIFICATION
    assert info.family == "vit" and info.bytes > 0
    assert _health(health) == health_pb2.HealthCheckResponse.SERVING

    reference = transformers.pipeline("image-classification", model=str(vit_dir), device="cpu")
    for seed, top_k in [(1, None), (2, 3), (3, 100)]:
        data = _png(seed)
        request = pb.ClassifyImageRequest(model=str(vit_dir), request_id=f"r{seed}",
                                          image=common_pb2.ImageInput(data=data))
        if top_k is not None:
            request.top_k = top_k
        response = images.ClassifyImage(request, timeout=60)
        expected = reference(Image.open(io.BytesIO(data)), **({"top_k": top_k} if top_k else {}))
        assert response.request_id == f"r{seed}"
        assert [label.label for label in response.labels] == [e["label"] for e in expected]
        for label, e in zip(response.labels, expected):
            assert abs(label.score - e["score"]) <= 1e-4
        assert response.run.model == str(vit_dir)

    # The empty model name means the task's default: the first model loaded for it.
    default = images.ClassifyImage(pb.ClassifyImageRequest(image=common_pb2.ImageInput(data=_png(1))), timeout=60)
    assert default.run.model == str(vit_dir)

    listed = models.ListModels(model_pb2.ListModelsRequest(task=model_pb2.TASK_IMAGE_CLASSIFICATION), timeout=10)
    assert [m.name for m in listed.models] == [str(vit_dir)] and listed.models[0].is_default

    models.UnloadModel(model_pb2.UnloadModelRequest(model=str(vit_dir)), timeout=30)
    assert _health(health) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as info:
        images.ClassifyImage(pb.ClassifyImageRequest(image=common_pb2.ImageInput(data=_png(1))), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _bomb_png() -> bytes:
    """A 20000x20000 grayscale PNG that compresses to a few hundred KiB."""
    buffer = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buffer, format="PNG", optimize=False, compress_level=9)
    return buffer.getvalue()


BAD_IMAGES = {
    "corrupt": (b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20, grpc.StatusCode.INVALID_ARGUMENT),
    "truncated": (None, grpc.StatusCode.INVALID_ARGUMENT),
    "text file": (b"hello, I am a text file, not an image\n" * 10, grpc.StatusCode.INVALID_ARGUMENT),
    "empty": (b"", grpc.StatusCode.INVALID_ARGUMENT),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_get_invalid_argument_and_next_call_works(grpc_server, vit_dir, case):
    from pipeserve.v1 import common_pb2, image_classification_pb2 as pb

    images, _, _ = _stubs(grpc_server)
    load_model(grpc_server, vit_dir)
    data, code = BAD_IMAGES[case]
    if data is None:
        data = _png(5)[:200]
    with pytest.raises(grpc.RpcError) as info:
        images.ClassifyImage(pb.ClassifyImageRequest(model=str(vit_dir), image=common_pb2.ImageInput(data=data)),
                             timeout=30)
    assert info.value.code() == code, info.value.details()
    assert error_reason(info.value)
    ok = images.ClassifyImage(pb.ClassifyImageRequest(model=str(vit_dir), image=common_pb2.ImageInput(data=_png(6))),
                              timeout=30)
    assert len(ok.labels) == 5


def test_decompression_bomb_top_k_uri_and_wrong_task(grpc_server, vit_dir, tmp_path):
    from pipeserve.v1 import common_pb2, image_classification_pb2 as pb

    images, _, _ = _stubs(grpc_server)
    load_model(grpc_server, vit_dir)
    model = str(vit_dir)
    with pytest.raises(grpc.RpcError) as info:
        images.ClassifyImage(pb.ClassifyImageRequest(model=model, image=common_pb2.ImageInput(data=_bomb_png())),
                             timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(info.value) == "INPUT_TOO_LARGE"

    for top_k in (0, -3):
        with pytest.raises(grpc.RpcError) as info:
            images.ClassifyImage(pb.ClassifyImageRequest(model=model, top_k=top_k,
                                                         image=common_pb2.ImageInput(data=_png(1))), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "top_k" in info.value.details()

    # URIs are off by default: neither hosts nor file roots are allowed.
    (tmp_path / "cat.png").write_bytes(_png(1))
    for uri in (f"file://{tmp_path}/cat.png", "http://169.254.169.254/latest/meta-data", "gopher://x/y"):
        with pytest.raises(grpc.RpcError) as info:
            images.ClassifyImage(pb.ClassifyImageRequest(model=model, image=common_pb2.ImageInput(uri=uri)), timeout=30)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_reason(info.value) == "URI_NOT_ALLOWED"

    with pytest.raises(grpc.RpcError) as info:
        images.ClassifyImage(pb.ClassifyImageRequest(model=str(tmp_path / "nope"),
                                                     image=common_pb2.ImageInput(data=_png(1))), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_file_uri_under_allowed_root(vit_dir, tmp_path):
    """With a file root configured, files under it are read and paths escaping it are refused."""
    from grpc_testing import make_server
    from pipeserve.v1 import common_pb2, image_classification_pb2 as pb

    root = tmp_path / "root"
    root.mkdir()
    (root / "cat.png").write_bytes(_png(7))
    (tmp_path / "secret.png").write_bytes(_png(8))
    server = make_server(uri_file_root=str(root))
    try:
        images, _, _ = _stubs(server)
        load_model(server, vit_dir)
        ok = images.ClassifyImage(pb.ClassifyImageRequest(image=common_pb2.ImageInput(uri=f"file://{root}/cat.png")),
                                  timeout=30)
        assert len(ok.labels) == 5
        with pytest.raises(grpc.RpcError) as info:
            images.ClassifyImage(pb.ClassifyImageRequest(
                image=common_pb2.ImageInput(uri=f"file://{root}/../secret.png")), timeout=30)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        server.stop()


def test_model_of_another_task_is_failed_precondition(grpc_server, vit_dir, tmp_path):
    """A text model asked to classify images: FAILED_PRECONDITION / WRONG_TASK."""
    from pipeserve.v1 import common_pb2, image_classification_pb2 as pb

    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=20, num_labels=2)
    path = save_checkpoint(transformers.BertForSequenceClassification(config), tmp_path / "bert")
    images, _, _ = _stubs(grpc_server)
    with pytest.raises(grpc.RpcError) as info:
        images.ClassifyImage(pb.ClassifyImageRequest(model=str(path), image=common_pb2.ImageInput(data=_png(1))),
                             timeout=60)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(info.value) == "WRONG_TASK"
