"""Who may load what, through real channels (issue #12 items 2, 3, 4, 9, 10): task calls load
nothing unless the settings and the caller allow it, and a user token gets the same NOT_FOUND
for a directory that exists as for one that does not; every spelling of a model is one
entry; bad names cannot grow the server's lists; allow_pickle is a ceiling; model_root bounds
LoadModel; the budget holds on resident bytes; a reload with other options is refused; an
evicted default is reloaded and its task stays SERVING; a failed preload is reported."""
from __future__ import annotations

import os
import shutil

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpc_testing import error_reason, load_model, make_server
from ops_testing import build_tiny_vit, classify_request

pytest.importorskip("transformers")

IMAGES = "pipeserve.v1.ImageClassificationService"


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return build_tiny_vit(tmp_path_factory.mktemp("access") / "vit")


@pytest.fixture(scope="module")
def vit_copy(tmp_path_factory, vit_dir):
    """A second checkpoint: another directory holding the same files."""
    return shutil.copytree(vit_dir, tmp_path_factory.mktemp("access_copy") / "vit")


@pytest.fixture
def server_factory():
    servers = []

    def start(**settings):
        servers.append(make_server(**settings))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def _bearer(token: str):
    return (("authorization", f"Bearer {token}"),)


def _models(server):
    from pipeserve.v1 import model_pb2_grpc

    return model_pb2_grpc.ModelServiceStub(server.channel)


def _images(server):
    from pipeserve.v1 import image_classification_pb2_grpc

    return image_classification_pb2_grpc.ImageClassificationServiceStub(server.channel)


def _listed(server, **kwargs):
    from pipeserve.v1 import model_pb2

    return [m for m in _models(server).ListModels(model_pb2.ListModelsRequest(), timeout=10, **kwargs).models]


def _refusal(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call(*args, **kwargs)
    return error.value


def test_a_user_token_cannot_load_a_model_by_naming_it(server_factory, vit_dir, tmp_path):
    """With auth on, even with on_demand_loading="any", a user token naming a server directory
    (or a Hub id, or a path that does not exist) in ClassifyImage gets NOT_FOUND and nothing is
    loaded; the answers differ only by the name echoed. An admin token may load on demand;
    that model serves its spellings but does not become the task's default."""
    server = server_factory(auth_tokens=("user-secret",), admin_tokens=("admin-secret",), on_demand_loading="any")
    user, admin = _bearer("user-secret"), _bearer("admin-secret")
    details = {}
    for name in (str(vit_dir), str(vit_dir) + "/", str(tmp_path / "no-such-dir"), "/etc/", "some-org/some-model"):
        error = _refusal(_images(server).ClassifyImage, classify_request(model=name), timeout=30, metadata=user)
        assert error.code() == grpc.StatusCode.NOT_FOUND, name
        assert error_reason(error) == "MODEL_NOT_LOADED"
        assert "LoadModel" in error.details()
        details[name] = error.details().replace(repr(name), "NAME")
    assert len(set(details.values())) == 1, details  # nothing tells which server paths exist
    assert _listed(server, metadata=admin) == []

    response = _images(server).ClassifyImage(classify_request(model=str(vit_dir)), timeout=60, metadata=admin)
    assert response.labels and response.run.model == os.path.realpath(vit_dir)
    assert _images(server).ClassifyImage(classify_request(model=str(vit_dir) + "//"), timeout=30,
                                         metadata=user).labels
    error = _refusal(_images(server).ClassifyImage, classify_request(), timeout=30, metadata=user)
    assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == "NO_DEFAULT_MODEL"
    [info] = _listed(server, metadata=user)
    assert not info.is_default


def test_the_default_setting_loads_nothing_on_demand(server_factory, vit_dir):
    server = server_factory(on_demand_loading="off")  # the Settings default; auth off
    error = _refusal(_images(server).ClassifyImage, classify_request(model=str(vit_dir)), timeout=30)
    assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == "MODEL_NOT_LOADED"
    assert _listed(server) == []
    load_model(server, vit_dir)  # LoadModel decides; then task calls use it by any spelling
    assert _images(server).ClassifyImage(classify_request(model=f"{vit_dir}/./"), timeout=30).labels


def test_thirty_spellings_of_one_directory_are_one_model(server_factory, vit_dir, tmp_path):
    server = server_factory(on_demand_loading="any")
    link = tmp_path / "link"
    link.symlink_to(vit_dir)
    parent, leaf = str(vit_dir.parent), vit_dir.name
    spellings = [str(vit_dir), f"{vit_dir}/", f"{vit_dir}//", f"{vit_dir}/.", f"{parent}//{leaf}",
                 f"{parent}/./{leaf}", f"{parent}/{leaf}/../{leaf}", str(link), f"{link}/", f" {vit_dir} "]
    spellings += [f"{vit_dir}" + "/" * k for k in range(3, 13)] + [f"{vit_dir}" + "/." * k for k in range(2, 12)]
    assert len(spellings) == 30
    for name in spellings:
        assert _images(server).ClassifyImage(classify_request(model=name), timeout=60).labels
    [info] = _listed(server)
    assert info.name == os.path.realpath(vit_dir)
    from pipeserve.v1 import model_pb2

    for name in spellings[:5]:
        assert _models(server).GetModel(model_pb2.GetModelRequest(model=name), timeout=10).model.name == info.name


def test_bad_names_cannot_grow_the_server(server_factory, tmp_path):
    """200 names that are not models (spellings of /etc/, directories without a checkpoint,
    missing paths) leave at most FAILED_ENTRIES_MAX failed entries; GetModel and UnloadModel
    still answer NOT_FOUND, and oversized or control-character names INVALID_ARGUMENT."""
    from pipeserve.runtime.manager import FAILED_ENTRIES_MAX
    from pipeserve.v1 import model_pb2

    server = server_factory(on_demand_loading="any")  # the most permissive setting, auth off
    names = [f"/etc{'/' * k}" for k in range(1, 51)] + [f"/etc/{'./' * k}" for k in range(50)]
    for i in range(50):
        (tmp_path / f"empty{i}").mkdir()
        names.append(str(tmp_path / f"empty{i}"))
    names += [str(tmp_path / f"missing{i}") for i in range(50)]
    for name in names:
        error = _refusal(_images(server).ClassifyImage, classify_request(model=name), timeout=30)
        assert error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION), name
    assert len(_listed(server)) <= FAILED_ENTRIES_MAX
    for call, request in [(_models(server).GetModel, model_pb2.GetModelRequest(model="/nowhere")),
                          (_models(server).UnloadModel, model_pb2.UnloadModelRequest(model="/nowhere"))]:
        error = _refusal(call, request, timeout=10)
        assert error.code() == grpc.StatusCode.NOT_FOUND and len(error.details()) < 300

    long, nul = "/" + "a" * 4000, str(tmp_path) + "\0x"
    for name, reason in [(long, "MODEL_NAME_TOO_LONG"), (nul, "INVALID_MODEL_NAME"),
                         ("a\r\nInjected: log line", "INVALID_MODEL_NAME")]:
        for call, request in [(_images(server).ClassifyImage, classify_request(model=name)),
                              (_models(server).GetModel, model_pb2.GetModelRequest(model=name)),
                              (_models(server).LoadModel, model_pb2.LoadModelRequest(model=name)),
                              (_models(server).UnloadModel, model_pb2.UnloadModelRequest(model=name))]:
            error = _refusal(call, request, timeout=10)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(error) == reason
            assert len(error.details()) < 300
    # Before anything else: not the URI allowlist's PERMISSION_DENIED, nor a streaming config's work.
    from pipeserve.v1 import common_pb2, image_classification_pb2, speech_recognition_pb2 as asr
    from pipeserve.v1 import speech_recognition_pb2_grpc as asr_grpc

    request = image_classification_pb2.ClassifyImageRequest(
        model=long, image=common_pb2.ImageInput(uri="http://169.254.169.254/latest/meta-data"))
    error = _refusal(_images(server).ClassifyImage, request, timeout=10)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(error) == "MODEL_NAME_TOO_LONG"
    stream = asr_grpc.SpeechRecognitionServiceStub(server.channel).StreamingTranscribe(
        iter([asr.StreamingTranscribeRequest(config=asr.StreamingConfig(model=nul))]), timeout=10)
    error = _refusal(list, stream)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(error) == "INVALID_MODEL_NAME"


def test_allow_pickle_and_model_root_are_ceilings(server_factory, vit_dir, tmp_path):
    from pipeserve.v1 import model_pb2

    root = tmp_path / "models"
    root.mkdir()
    inside = shutil.copytree(vit_dir, root / "vit")
    (root / "escape").symlink_to(vit_dir)
    server = server_factory(model_root=str(root))  # allow_pickle is off by default
    error = _refusal(_models(server).LoadModel, model_pb2.LoadModelRequest(model=str(inside), allow_pickle=True),
                     timeout=60)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and error_reason(error) == "PICKLE_NOT_ALLOWED"
    for outside in (str(vit_dir), str(root / "escape"), f"{root}/../{vit_dir.parent.name}/vit"):
        error = _refusal(_models(server).LoadModel, model_pb2.LoadModelRequest(model=outside), timeout=60)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and error_reason(error) == "MODEL_OUTSIDE_ROOT"
    assert _listed(server) == []
    info = load_model(server, inside, allow_pickle=False)  # narrowing is fine
    assert info.state == model_pb2.MODEL_STATE_READY


def test_reloading_with_other_options_is_refused(server_factory, vit_dir):
    from pipeserve.v1 import model_pb2

    server = server_factory()
    first = load_model(server, vit_dir)
    error = _refusal(_models(server).LoadModel, model_pb2.LoadModelRequest(model=str(vit_dir),
                                                                          dtype=model_pb2.D_TYPE_BFLOAT16),
                     timeout=60)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(error) == "MODEL_LOADED_WITH_OTHER_OPTIONS"
    assert "float32 on cpu" in error.details() and "bfloat16" in error.details() and "Unload" in error.details()
    error = _refusal(_models(server).LoadModel, model_pb2.LoadModelRequest(model=str(vit_dir), load_in_8bit=True),
                     timeout=60)
    assert error_reason(error) == "MODEL_LOADED_WITH_OTHER_OPTIONS"
    again = load_model(server, f"{vit_dir}/", dtype=model_pb2.D_TYPE_FLOAT32)  # the same choices: the same model
    assert again.name == first.name and again.loaded_at == first.loaded_at


def test_budget_holds_on_resident_bytes_and_evicted_default_reloads(server_factory, vit_dir, vit_copy):
    """The tiny ViT holds ~82 kB; with int8 requested its file-size estimate is a quarter of
    that, though ViT keeps float weights. Under a 50 kB budget it is refused after loading;
    under 120 kB it evicts the idle default, which stays the default (health SERVING) and is
    loaded again by the next call that names no model."""
    from pipeserve.v1 import model_pb2

    small = server_factory(memory_budget_bytes=50_000)
    error = _refusal(_models(small).LoadModel, model_pb2.LoadModelRequest(model=str(vit_dir), load_in_8bit=True),
                     timeout=60)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error_reason(error) == "MEMORY_BUDGET"
    assert _listed(small) == []

    budget = 120_000
    server = server_factory(memory_budget_bytes=budget)
    default = load_model(server, vit_dir, set_default=True)
    assert default.bytes > budget // 2
    other = load_model(server, vit_copy, load_in_8bit=True)
    listed = _listed(server)
    assert [m.name for m in listed] == [other.name] and sum(m.bytes for m in listed) <= budget
    health = health_pb2_grpc.HealthStub(server.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=IMAGES), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING
    response = _images(server).ClassifyImage(classify_request(), timeout=60)
    assert response.run.model == default.name
    listed = _listed(server)
    assert [m.name for m in listed] == [default.name] and listed[0].is_default
    assert sum(m.bytes for m in listed) <= budget


def test_failed_preload_is_reported_to_calls_naming_no_model(server_factory, tmp_path):
    from pipeserve import server as server_module
    from pipeserve.config import ModelSpec

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    server = server_factory(preload={"image-classification": ModelSpec(model=str(broken), task="image-classification"),
                                     "fill-mask": ModelSpec(model=str(tmp_path / "gone"), task="fill-mask")})
    server.call(server_module.preload(server.running))
    error = _refusal(_images(server).ClassifyImage, classify_request(), timeout=30)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(error) == "DEFAULT_MODEL_FAILED"
    assert "default model for image-classification failed to load" in error.details()
    assert "not valid JSON" in error.details()
